"""The Reg-VQ paper's claims, tested end to end on Fashion-MNIST: the ablation ladder, the
mask ratio and the codebook size, judged on reconstruction *and* generation, with seeds.

  python -m benchmarks.regvq_study                            # everything not yet in the JSON
  python -m benchmarks.regvq_study --sections=ladder --seeds=0  # a subset
  python -m benchmarks.regvq_study --only=ladder_mask_s0        # named rows
  python -m benchmarks.regvq_study --render                   # the doc from the JSON alone
  python -m benchmarks.regvq_study --verify=ladder_mask_s0    # re-run one row, compare

Every row trains a tokenizer on the 60,000 training images and, for most rows, a
class-conditional AR prior (and for the ladder's first and last rungs a diffusion prior)
on its tokens; every metric is measured on the 10,000-image test split, which no row
trains on. The study is resumable: each finished row is written to the JSON at once, and
a rerun skips rows already there (`--rerun` trains them again).

The scale (the `SCALE` dict; the doc states it): 32×32 images, the tokenizer of
configs/demo.py's size (ch 32, ch_mult (1, 2, 2), one residual block, 8×8 tokens of 32
dimensions), K = 1,024, batch 16 — 1,024 token positions per batch, K of them, as the
study's review asked — LPIPS on, GAN off (its discriminator would start after the last
step of runs this short). Why so small: on this project's 2-core CPU one tokenizer step
with LPIPS costs about 2.3 s at this size, of which the VGG16 forward and backward pass
is ~80 %, and LPIPS's cost per token position is fixed by f = 4; the full list of rows is
~40 tokenizers.

Outputs in `--output_dir` (default docs/results): regvq_study.json (settings,
environment, every row's metrics and wall time), regvq_study_*.png, and the generated
part of regvq_study.md between the GENERATED markers (text around them is kept).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
import traceback
from typing import Any

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JSON_NAME = "regvq_study.json"
DOC_NAME = "regvq_study.md"
BEGIN_MARK = "<!-- BEGIN GENERATED (benchmarks/regvq_study.py --render; edits inside are lost) -->"
END_MARK = "<!-- END GENERATED -->"
# The README quotes the verdict table between these markers; `--render` (and every run that
# writes the doc into the repository's docs/results) keeps that quote current.
README_BEGIN = "<!-- regvq_study verdict: begin (benchmarks/regvq_study.py --render) -->"
README_END = "<!-- regvq_study verdict: end -->"

# Everything every row shares. Changing any of it makes the JSON's rows incomparable, so
# the script refuses to merge into a JSON made with other values.
SCALE = dict(
    image_size=32,
    tokenizer_steps=300,
    tokenizer_batch=16,            # 16 × 8 × 8 = 1,024 token positions = K
    tokenizer_lr=2e-4,
    num_codes=1024,
    ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, code_dim=32,
    perceptual_weight=1.0,
    pcl_weight=0.1,                # the +CL / +PCL rungs (mean reduction, VGG16 features)
    eval_images=1024,              # held-out test images per tokenizer/prior evaluation
    eval_batch=64,
    prior_steps=600,
    prior_batch=32,
    prior_width=128, prior_depth=2, prior_heads=4,
    prior_lr=1e-3,
    guidance_scale=2.0,
    diffusion_timesteps=50, diffusion_sample_steps=25,
)


@dataclasses.dataclass(frozen=True)
class Row:
  """One tokenizer (and its priors): a quantizer kind and what differs from the base."""

  key: str                     # the setting, shared by its seeds
  label: str
  sections: tuple[str, ...]
  kind: str = "regvq"
  quantizer: tuple[tuple[str, Any], ...] = ()
  loss: tuple[tuple[str, Any], ...] = ()
  num_codes: int = 1024
  batch: int | None = None     # None: SCALE's tokenizer_batch
  priors: tuple[str, ...] = ("ar",)
  seeds: tuple[int, ...] = (0,)

  def name(self, seed: int) -> str:
    return f"{self.key}_s{seed}"


def _regvq(key, label, sections, *, r=0.4, kl=0.1, seeds=(0,), priors=("ar",), loss=(),
           extra=(), **kwargs):
  quantizer = (("mask_ratio", r), ("prior_kl_weight", kl)) + tuple(extra)
  return Row(key, label, sections, "regvq", quantizer=quantizer, loss=tuple(loss),
             seeds=seeds, priors=priors, **kwargs)


LADDER_SEEDS = (0, 1, 2)
PCL = (("pcl_weight", SCALE["pcl_weight"]),)
ROWS = (
    # 1. The ablation ladder (the paper's Table 2 rungs), three seeds each.
    Row("vqgan", "VQGAN (VQ, β = 0.25)", ("ladder", "codebook"), "vq", seeds=LADDER_SEEDS,
        priors=("ar", "diffusion")),
    _regvq("prior_kl", "+ prior KL (λ_kl 0.1, r = 0)", ("ladder", "mask"), r=0.0,
           seeds=LADDER_SEEDS),
    _regvq("mask", "+ stochastic mask (r = 0.4)", ("ladder", "mask", "codebook"),
           seeds=LADDER_SEEDS),
    _regvq("cl", "+ plain contrastive loss", ("ladder",), seeds=LADDER_SEEDS,
           loss=PCL + (("pcl_weighting", "uniform"),)),
    _regvq("pcl", "+ PCL (full Reg-VQ)", ("ladder",), seeds=LADDER_SEEDS, loss=PCL,
           priors=("ar", "diffusion")),
    # 2. Mask ratio (r = 0 and 0.4 are the ladder's rungs) and the L1 region.
    _regvq("r0.2", "r = 0.2", ("mask",), r=0.2),
    _regvq("r0.6", "r = 0.6", ("mask",), r=0.6),
    _regvq("r1.0", "r = 1.0", ("mask",), r=1.0),
    _regvq("r0.4_l1all", "r = 0.4, L1 on all pixels", ("mask",), r=0.4,
           loss=(("l1_region", "all"),)),
    _regvq("r1.0_l1all", "r = 1.0, L1 on all pixels", ("mask",), r=1.0,
           loss=(("l1_region", "all"),)),
    # 3. Codebook size (K = 1,024: the ladder's VQGAN and +mask rungs, and FQ / Reg-FQ).
    Row("fq", "FQ (2 × 1,024)", ("codebook",), "fq"),
    Row("regfq", "Reg-FQ (2 × 1,024, r = 0.4)", ("codebook",), "regfq"),
    *[row for k in (8192, 16384) for row in (
        Row(f"vq_k{k}", f"VQ, K = {k}", ("codebook",), "vq", num_codes=k, priors=()),
        _regvq(f"regvq_k{k}", f"Reg-VQ, K = {k}", ("codebook",), num_codes=k, priors=()),
        Row(f"fq_k{k}", f"FQ, K = 2 × {k}", ("codebook",), "fq", num_codes=k, priors=()),
        Row(f"regfq_k{k}", f"Reg-FQ, K = 2 × {k}", ("codebook",), "regfq", num_codes=k,
            priors=()))],
    # τ_kl 0.25 is the knob that met the K = 1,024 goal; the K = 16,384 goal gets it too.
    _regvq("regvq_k16384_tau0.25", "Reg-VQ, K = 16384, τ_kl = 0.25", ("codebook",),
           num_codes=16384, priors=(), extra=(("prior_kl_temperature", 0.25),)),
    # 4. Baselines after the previous issue's fixes.
    Row("gumbel", "Gumbel-VQ (taming's schedule)", ("baselines",), "gumbel"),
    Row("vq_ema_cos", "VQ, EMA codebook, cosine codes", ("baselines",), "vq",
        quantizer=(("use_ema", True), ("normalize", True))),
    # 5. Beyond the paper, towards the usage goal.
    # τ_kl 0.25 met the usage goal on its first seed: it gets the ladder's three seeds, so
    # its cost is read against a spread; 0.5 asks whether a milder temperature costs less.
    _regvq("kl_tau0.25", "Reg-VQ + KL on p̄ at τ_kl = 0.25", ("beyond",),
           extra=(("prior_kl_temperature", 0.25),), seeds=LADDER_SEEDS),
    _regvq("kl_tau0.5", "Reg-VQ + KL on p̄ at τ_kl = 0.5", ("beyond",),
           extra=(("prior_kl_temperature", 0.5),)),
    _regvq("entropy0.1", "Reg-VQ + per-position entropy (0.1)", ("beyond",),
           extra=(("position_entropy_weight", 0.1),)),
    _regvq("kl1.0", "Reg-VQ, λ_kl = 1", ("beyond",), kl=1.0),
    _regvq("batch64", "Reg-VQ, batch 64 (4,096 positions)", ("beyond",), batch=64),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}
SECTIONS = ("ladder", "mask", "codebook", "baselines", "beyond")

# The paper's ablation (ADE20K, Table 2): rFID / PSNR / gFID.
PAPER_LADDER = {"vqgan": (28.17, 18.89, 38.53), "prior_kl": (25.92, 18.98, 36.57),
                "mask": (25.11, 18.56, 35.03), "cl": (24.21, 18.50, 34.91),
                "pcl": (23.69, 18.44, 34.47)}


# ------------------------------------------------------------------------------ config


def build_config(row: Row, seed: int, args):
  from benchmarks import common
  from rvq_jax import config as config_lib
  config = common.load_config("fashion_mnist")
  config.seed = seed
  config.stages = ("tokenizer",) + tuple(row.priors)
  if args.idx_dir:
    config.data.idx_path = args.idx_dir
  config.data.update(image_size=SCALE["image_size"], num_workers=2)
  tokenizer = config.tokenizer
  tokenizer.model.update(ch=SCALE["ch"], ch_mult=SCALE["ch_mult"],
                         num_res_blocks=SCALE["num_res_blocks"], attn_resolutions=(),
                         z_channels=SCALE["z_channels"])
  config_lib.set_quantizer(config, row.kind)
  if row.kind in ("vq", "regvq", "gumbel"):
    tokenizer.quantizer.code_dim = SCALE["code_dim"]
  tokenizer.quantizer.num_codes = row.num_codes
  tokenizer.quantizer[row.kind].update(dict(row.quantizer))
  steps = SCALE["tokenizer_steps"]
  tokenizer.loss.update(perceptual_weight=SCALE["perceptual_weight"], pcl_weight=0.0,
                        disc_start=steps + 1)
  tokenizer.loss.update(dict(row.loss))
  tokenizer.optim.update(learning_rate=SCALE["tokenizer_lr"],
                         disc_learning_rate=SCALE["tokenizer_lr"])
  eval_batches = SCALE["eval_images"] // SCALE["eval_batch"]
  tokenizer.train.update(batch_size=row.batch or SCALE["tokenizer_batch"], num_steps=steps,
                         log_every=50, checkpoint_every=steps, eval_every=steps,
                         summary_every=steps, keep_checkpoints=1)
  tokenizer.eval.update(batch_size=SCALE["eval_batch"], num_batches=eval_batches)
  for name in ("ar", "diffusion"):
    prior = config[name]
    prior.model.update(width=SCALE["prior_width"], depth=SCALE["prior_depth"],
                       num_heads=SCALE["prior_heads"])
    prior.optim.update(learning_rate=SCALE["prior_lr"], warmup_steps=50)
    prior.train.update(batch_size=SCALE["prior_batch"], num_steps=SCALE["prior_steps"],
                       log_every=100, checkpoint_every=SCALE["prior_steps"],
                       eval_every=SCALE["prior_steps"], summary_every=SCALE["prior_steps"],
                       keep_checkpoints=1)
    prior.eval.update(batch_size=SCALE["eval_batch"], num_batches=eval_batches,
                      generation_fid=False)
    prior.sample.update(num_samples=20, guidance_scale=SCALE["guidance_scale"])
  config.diffusion.model.num_timesteps = SCALE["diffusion_timesteps"]
  config.diffusion.sample.num_steps = SCALE["diffusion_sample_steps"]
  config.lock()
  config_lib.validate(config)
  return config


# ------------------------------------------------------------------------------ running


def train_row(row: Row, seed: int, args) -> dict:
  """Trains the row's tokenizer and priors in a fresh directory; their final metrics."""
  import jax  # noqa: F401  (after the environment is set)

  from rvq_jax.train import loop
  from rvq_jax.train import stages
  config = build_config(row, seed, args)
  workdir = os.path.join(args.workdir, row.name(seed))
  # A fresh directory: a resumed half-run is not the run the table claims.
  shutil.rmtree(workdir, ignore_errors=True)
  result = {"name": row.name(seed), "key": row.key, "seed": seed, "label": row.label,
            "kind": row.kind, "num_codes": row.num_codes,
            "tokenizer_batch": row.batch or SCALE["tokenizer_batch"],
            "quantizer": config.tokenizer.quantizer[row.kind].to_dict(),
            "loss": {k: config.tokenizer.loss[k] for k in (
                "l1_weight", "l1_region", "perceptual_weight", "pcl_weight", "pcl_weighting",
                "pcl_reduction", "pcl_network")},
            "stages": {}}
  # The eval split's reference statistics (FD-VGG over the 10,000 test images) are the
  # same for every row: computed once, kept beside the rows, copied into each workdir
  # (the stage checks the file's key against its data before using it).
  cache = os.path.join(args.workdir, "_references")
  os.makedirs(cache, exist_ok=True)
  os.makedirs(workdir, exist_ok=True)
  for name in os.listdir(cache):
    shutil.copy(os.path.join(cache, name), os.path.join(workdir, name))
  for stage_name in config.stages:
    start, cpu = time.time(), time.process_time()
    metrics = loop.run(stages.build(config, stage_name, workdir=workdir),
                       loop.loop_config_from(config, stage_name),
                       os.path.join(workdir, stage_name))
    result["stages"][stage_name] = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "wall_s": time.time() - start, "cpu_s": time.process_time() - cpu}
    print(f"[regvq_study] {row.name(seed)} {stage_name}: " + " ".join(
        f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if not k.startswith("train/")),
        flush=True)
  for name in os.listdir(workdir):
    if name.endswith("_reference_eval.npz") and not os.path.exists(os.path.join(cache, name)):
      shutil.copy(os.path.join(workdir, name), os.path.join(cache, name))
  if not args.keep_workdirs:
    shutil.rmtree(workdir, ignore_errors=True)
  return result


def environment() -> dict:
  from benchmarks import common
  return {**common.environment(),
          "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def load_results(path: str) -> dict:
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    if results.get("scale") != json.loads(json.dumps(SCALE)):
      raise SystemExit(f"{path} was made with another SCALE: move it away or restore "
                       "the script's SCALE to merge new rows into it.")
    return results
  return {"scale": SCALE, "rows": {}, "environments": []}


def save_results(results: dict, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(results, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # A crash mid-write never leaves a truncated JSON.


def selected(args) -> list[tuple[Row, int]]:
  names = set(filter(None, (args.only or "").split(",")))
  sections = set(filter(None, (args.sections or "").split(",")))
  seeds = (None if not args.seeds else {int(s) for s in args.seeds.split(",")})
  plan = []
  for row in ROWS:
    for seed in row.seeds:
      if names and row.name(seed) not in names and row.key not in names:
        continue
      if sections and not sections & set(row.sections):
        continue
      if seeds is not None and seed not in seeds:
        continue
      plan.append((row, seed))
  # Most informative first: every setting's first seed, then the ladder's other seeds.
  plan.sort(key=lambda item: (item[1] != item[0].seeds[0], ROWS.index(item[0]), item[1]))
  return plan


# ------------------------------------------------------------------------------ the doc


def _value(results, key, seed, stage, metric):
  row = results["rows"].get(f"{key}_s{seed}")
  if row is None or stage not in row["stages"]:
    return None
  return row["stages"][stage]["metrics"].get(metric)


def _values(results, key, stage, metric):
  row = ROWS_BY_KEY[key]
  values = [_value(results, key, seed, stage, metric) for seed in row.seeds]
  return [v for v in values if v is not None]


def _cell(values, digits=3, scale=1.0):
  if not values:
    return "—"
  values = [v * scale for v in values]
  mean = float(np.mean(values))
  if len(values) == 1:
    return f"{mean:.{digits}g}"
  return f"{mean:.{digits}g} ± {float(np.std(values, ddof=1)):.2g}"


# (column title, stage, metric, scale, digits)
TOKENIZER_COLUMNS = [
    ("usage %", "tokenizer", "usage", 100, 3), ("soft ppl", "tokenizer", "soft_perplexity", 1, 4),
    ("argmax ppl", "tokenizer", "perplexity", 1, 4), ("dead", "tokenizer", "dead_codes", 1, 4),
    ("PSNR", "tokenizer", "psnr", 1, 4), ("LPIPS", "tokenizer", "lpips", 1, 3),
    ("rFD-VGG", "tokenizer", "rfd_vgg", 1, 3)]
PRIOR_COLUMNS = [
    ("bits/token", "bits_per_token", 1, 4), ("gFD-VGG", "gfd_vgg", 1, 3),
    ("precision", "precision", 1, 2), ("recall", "recall", 1, 2),
    ("class acc %", "class_accuracy", 100, 3), ("FD-cls", "fd_classifier", 1, 3)]


def _table(results, keys, *, priors=("ar",), title_col="setting"):
  columns = [c[0] for c in TOKENIZER_COLUMNS]
  for prior in priors:
    columns += [f"{prior} {c[0]}" for c in PRIOR_COLUMNS]
  lines = [f"| {title_col} | seeds | " + " | ".join(columns) + " |",
           "|" + "---|" * (len(columns) + 2)]
  for key in keys:
    row = ROWS_BY_KEY[key]
    done = [s for s in row.seeds if f"{key}_s{s}" in results["rows"]]
    if not done:
      lines.append(f"| {row.label} | 0 | " + " | ".join("not run" for _ in columns) + " |")
      continue
    cells = [_cell(_values(results, key, stage, metric), digits, scale)
             for _, stage, metric, scale, digits in TOKENIZER_COLUMNS]
    for prior in priors:
      cells += [_cell(_values(results, key, prior, metric), digits, scale)
                for _, metric, scale, digits in PRIOR_COLUMNS]
    lines.append(f"| {row.label} | {len(done)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def pooled_std(va: list[float], vb: list[float]) -> float:
  """The pooled sample std of two rows' seeds (equal weights; each row needs ≥ 2 seeds)."""
  return math.sqrt((np.var(va, ddof=1) + np.var(vb, ddof=1)) / 2)


def paired_differences(results, a: str, b: str, stage: str, metric: str) -> list[float]:
  """Per-seed changes b − a, over the seeds both rows have.

  Two rows with the same seed share the data order and the initialization of the networks
  they have in common, so much of the seed spread can be shared by every rung: the change
  within a seed removes that part.
  """
  pairs = [(_value(results, a, seed, stage, metric), _value(results, b, seed, stage, metric))
           for seed in ROWS_BY_KEY[a].seeds if seed in ROWS_BY_KEY[b].seeds]
  return [vb - va for va, vb in pairs if va is not None and vb is not None]


# A paired change is judged only from this many seed pairs on: with 2, the std of the two
# changes is too noisy for the 2 × std rule (p ≈ 0.22 on 1 degree of freedom).
MIN_PAIRS = 3


def judge_paired(changes: list[float]) -> tuple[float, float] | None:
  """(mean change, 2 × sample std of the per-seed changes), or None below MIN_PAIRS.

  |mean| > 2 × std(changes) at 3 pairs is t > 2√3 on 2 degrees of freedom (two-sided
  p ≈ 0.074), about the level of the unpaired rule at 3 seeds a side (t > √6, 4 degrees of
  freedom, p ≈ 0.070), so the two readings are held to about the same bar.
  """
  if len(changes) < MIN_PAIRS:
    return None
  return float(np.mean(changes)), 2 * float(np.std(changes, ddof=1))


def _differences(results, pairs, metrics):
  """Which rung-to-rung changes exceed the seed spread: |Δmean| > 2·pooled std, and the same
  change paired by seed: |mean per-seed Δ| > 2·std of the per-seed Δ."""
  lines = ["| change | metric | Δ mean | 2 × pooled std | beyond the spread? | Δ per seed | "
           "2 × std of the Δs | beyond, paired? |", "|---|---|---|---|---|---|---|---|"]
  for a, b in pairs:
    for stage, metric in metrics:
      va, vb = _values(results, a, stage, metric), _values(results, b, stage, metric)
      if len(va) < 2 or len(vb) < 2:
        continue
      delta = float(np.mean(vb) - np.mean(va))
      pooled = pooled_std(va, vb)
      changes = paired_differences(results, a, b, stage, metric)
      paired = judge_paired(changes)
      per_seed = ", ".join(f"{c:+.3g}" for c in changes)
      paired_cells = (f"{per_seed} | — | — ({len(changes)} pairs)" if paired is None else
                      f"{per_seed} | {paired[1]:.3g} | "
                      f"{'yes' if abs(paired[0]) > paired[1] else 'no'}")
      lines.append(f"| {ROWS_BY_KEY[a].key} → {ROWS_BY_KEY[b].key} | {stage} {metric} | "
                   f"{delta:+.4g} | {2 * pooled:.3g} | "
                   f"{'yes' if abs(delta) > 2 * pooled else 'no'} | {paired_cells} |")
  return "\n".join(lines)


# Each claim of the paper as a change between two rows: (claim, paper's numbers, from-row,
# to-row, stage, metric, the direction the paper reports, scale for display).
CLAIMS = [
    ("1. The prior KL prevents codebook collapse", "near-full usage vs a small fraction",
     "vqgan", "prior_kl", "tokenizer", "usage", "higher", 100),
    ("2a. The mask improves generation", "gFID 36.57 → 35.03", "prior_kl", "mask", "ar",
     "gfd_vgg", "lower", 1),
    ("2b. The mask costs reconstruction", "PSNR 18.98 → 18.56", "prior_kl", "mask",
     "tokenizer", "psnr", "lower", 1),
    ("3a. PCL improves reconstruction over a plain CL", "rFID 24.21 → 23.69", "cl", "pcl",
     "tokenizer", "rfd_vgg", "lower", 1),
    ("3b. PCL improves generation over a plain CL", "gFID 34.91 → 34.47", "cl", "pcl", "ar",
     "gfd_vgg", "lower", 1),
    ("The whole ladder improves generation", "gFID 38.53 → 34.47", "vqgan", "pcl", "ar",
     "gfd_vgg", "lower", 1),
]
# (goal, rows that may reach it, threshold on held-out argmax usage, the paper's setting at
# that K, which the best row's cost is measured against)
# The goals name Reg-VQ's family (Reg-VQ and Reg-FQ); the "any quantizer" lines say which
# row of all comes closest, so a goal the family misses is set against what else reaches it.
USAGE_GOALS = [
    ("≥ 95 % of K = 1,024 in use (Reg-VQ family)",
     ["prior_kl", "r0.2", "mask", "r0.6", "r1.0", "r0.4_l1all", "r1.0_l1all", "cl", "pcl",
      "kl_tau0.25", "kl_tau0.5", "entropy0.1", "kl1.0", "batch64", "regfq"], 0.95, "mask"),
    ("≥ 95 % of K = 1,024 in use (any quantizer)",
     [row.key for row in ROWS if row.num_codes == 1024], 0.95, "mask"),
    ("≥ 90 % of K = 16,384 in use (Reg-VQ family)",
     ["regvq_k16384", "regfq_k16384", "regvq_k16384_tau0.25"], 0.90, "regvq_k16384"),
    ("≥ 90 % of K = 16,384 in use (any quantizer)",
     [row.key for row in ROWS if row.num_codes == 16384], 0.90, "regvq_k16384"),
    ("VQGAN under 10 % of K = 1,024", ["vqgan"], None, "mask"),
]


def compare_rows(va: list[float], vb: list[float], direction: str) -> tuple[str, str]:
  """A claimed change from row a to row b, judged against the seed spread.

  Returns (the measured change as text, verdict). The verdict is 'agrees' / 'disagrees' when
  both rows have ≥ 2 seeds and |Δ mean| exceeds 2 × the pooled sample std in the paper's /
  the opposite direction, 'unresolved' otherwise (within the spread, or too few seeds to
  have one; the text then says which way the means moved).
  """
  if not va or not vb:
    return "not run", "unresolved (not run)"
  delta = float(np.mean(vb) - np.mean(va))
  sign = 1.0 if direction == "higher" else -1.0
  moved = "the paper's way" if sign * delta > 0 else "the other way"
  if len(va) < 2 or len(vb) < 2:
    return (f"Δ {delta:+.3g}", f"unresolved ({min(len(va), len(vb))} seed: means moved "
            f"{moved})")
  spread = 2 * pooled_std(va, vb)
  text = f"Δ {delta:+.3g} (2 × pooled std {spread:.2g})"
  if abs(delta) <= spread:
    return text, f"unresolved (within the spread; means moved {moved})"
  return text, "agrees" if sign * delta > 0 else "disagrees"


def compare_paired(changes: list[float], direction: str) -> str:
  """The same claim judged on the per-seed changes (`judge_paired`): 'agrees' / 'disagrees'
  beyond 2 × their std in the paper's / the other direction, 'unresolved' otherwise."""
  judged = judge_paired(changes)
  if judged is None:
    return f"unresolved ({len(changes)} seed pairs)"
  mean, spread = judged
  per_seed = ", ".join(f"{c:+.3g}" for c in changes)
  sign = 1.0 if direction == "higher" else -1.0
  if abs(mean) <= spread:
    verdict = "unresolved"
  else:
    verdict = "agrees" if sign * mean > 0 else "disagrees"
  return f"{per_seed} (2 × std {spread:.2g}): {verdict}"


def _verdict(results) -> str:
  lines = ["| claim | paper (ADE20K) | rows | measured here (mean ± std, seeds) | change | "
           "verdict | paired by seed: Δ per seed (secondary) |", "|---|---|---|---|---|---|---|"]
  for claim, paper, a, b, stage, metric, direction, scale in CLAIMS:
    va, vb = _values(results, a, stage, metric), _values(results, b, stage, metric)
    text, verdict = compare_rows([v * scale for v in va], [v * scale for v in vb], direction)
    paired = compare_paired([c * scale for c in paired_differences(results, a, b, stage,
                                                                     metric)], direction)
    label = {"usage": "usage %", "gfd_vgg": "AR gFD-VGG", "psnr": "PSNR",
             "rfd_vgg": "rFD-VGG"}[metric]
    measured = (f"{label}: {_cell(va, 3, scale)} ({len(va)}) → {_cell(vb, 3, scale)} "
                f"({len(vb)})")
    lines.append(f"| {claim} | {paper} | {a} → {b} | {measured} | {text} | {verdict} | "
                 f"{paired} |")
  lines += ["", "| goal | best row | held-out argmax usage % | met? | against | PSNR (Δ) | "
            "AR gFD-VGG (Δ) |", "|---|---|---|---|---|---|---|"]
  for goal, keys, threshold, reference in USAGE_GOALS:
    means = [(float(np.mean(v)), key, v) for key in keys
             if (v := _values(results, key, "tokenizer", "usage"))]
    if not means:
      lines.append(f"| {goal} | not run | — | unresolved | {reference} | — | — |")
      continue
    mean, key, values = max(means) if threshold is not None else min(means)
    met = mean >= threshold if threshold is not None else mean < 0.10
    costs = " | ".join(_against_reference(results, key, stage, metric, scale, digits,
                                          reference)
                       for stage, metric, scale, digits in (("tokenizer", "psnr", 1, 4),
                                                            ("ar", "gfd_vgg", 1, 3)))
    lines.append(f"| {goal} | {key} | {_cell(values, 3, 100)} ({len(values)} seed"
                 f"{'s' if len(values) > 1 else ''}) | {'yes' if met else 'no'} | {reference} | "
                 f"{costs} |")
  return "\n".join(lines)


# The paper's setting that the usage knobs are measured against: the mask rung (r = 0.4,
# λ_kl 0.1, τ 1, L1 where the sample matches the argmax, no contrastive loss). Every knob row
# differs from it in exactly one setting.
REFERENCE = "mask"
KNOBS = ["prior_kl", "r0.2", "r0.6", "r1.0", "r0.4_l1all", "r1.0_l1all", "kl_tau0.25",
         "kl_tau0.5", "entropy0.1", "kl1.0", "batch64"]
# (column title, stage, metric, scale, digits)
COST_COLUMNS = [("usage %", "tokenizer", "usage", 100, 3),
                ("soft ppl", "tokenizer", "soft_perplexity", 1, 4),
                ("PSNR", "tokenizer", "psnr", 1, 4), ("LPIPS", "tokenizer", "lpips", 1, 3),
                ("AR gFD-VGG", "ar", "gfd_vgg", 1, 3),
                ("AR bits/token", "ar", "bits_per_token", 1, 3)]


def _against_reference(results, key, stage, metric, scale, digits,
                        reference_key=REFERENCE) -> str:
  """'value (Δ vs the reference row)', the Δ marked † when it exceeds the seed spread.

  The spread is the ladder's: 2 × the pooled sample std when both rows have ≥ 2 seeds. The
  knob rows have one seed, so there the reference row's sample std stands for both (a
  single-seed reference has no spread, so nothing is marked).
  """
  values = _values(results, key, stage, metric)
  reference = _values(results, reference_key, stage, metric)
  if not values:
    return "—"
  if not reference or key == reference_key:
    return _cell(values, digits, scale)
  delta = scale * float(np.mean(values) - np.mean(reference))
  if len(values) >= 2 and len(reference) >= 2:
    std = pooled_std(values, reference)
  else:
    std = float(np.std(reference, ddof=1)) if len(reference) >= 2 else math.inf
  beyond = abs(delta) > 2 * scale * std
  return f"{_cell(values, digits, scale)} ({delta:+.3g}{' †' if beyond else ''})"


def _knob_costs(results) -> str:
  """What each setting that moves usage costs, against the paper's setting (REFERENCE)."""
  lines = ["| setting | seeds | " + " | ".join(c[0] for c in COST_COLUMNS) + " |",
           "|" + "---|" * (len(COST_COLUMNS) + 2)]
  for key in [REFERENCE] + KNOBS:
    seeds = len(_values(results, key, "tokenizer", "usage"))
    if not seeds:
      continue
    label = ROWS_BY_KEY[key].label + (" (reference)" if key == REFERENCE else "")
    cells = [_against_reference(results, key, stage, metric, scale, digits)
             for _, stage, metric, scale, digits in COST_COLUMNS]
    lines.append(f"| {label} | {seeds} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _plots(results, output_dir) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  written = []
  mask_keys = [("prior_kl", 0.0), ("r0.2", 0.2), ("mask", 0.4), ("r0.6", 0.6), ("r1.0", 1.0)]
  points = [(r, _values(results, k, "tokenizer", "usage"),
             _values(results, k, "tokenizer", "soft_perplexity"),
             _values(results, k, "ar", "gfd_vgg"), _values(results, k, "tokenizer", "psnr"))
            for k, r in mask_keys]
  points = [p for p in points if p[1]]
  if len(points) >= 2:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, index, ylabel in ((axes[0], 1, "held-out argmax usage (fraction of K)"),
                              (axes[1], 4, "PSNR (dB)"),
                              (axes[2], 3, "AR gFD-VGG (lower is better)")):
      xs = [p[0] for p in points if p[index]]
      ys = [np.mean(p[index]) for p in points if p[index]]
      errs = [np.std(p[index], ddof=1) if len(p[index]) > 1 else 0 for p in points if p[index]]
      ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3)
      ax.set_xlabel("mask ratio r")
      ax.set_ylabel(ylabel)
      ax.grid(alpha=0.3)
    fig.suptitle("Reg-VQ mask ratio on Fashion-MNIST (λ_kl 0.1; mean ± std over seeds)")
    fig.tight_layout()
    path = os.path.join(output_dir, "regvq_study_mask.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(os.path.basename(path))
  return written


def _machines(results: dict) -> str:
  """Which rows ran on which CPU model, with that run's classifier accuracy on real images."""
  groups: dict[tuple, list[str]] = {}
  for name, row in sorted(results["rows"].items()):
    model = row.get("machine", {}).get("cpu_model") or "not recorded"
    real = row["stages"].get("ar", {}).get("metrics", {}).get("class_accuracy_real")
    groups.setdefault((model, real), []).append(name)
  lines = []
  for (model, real), names in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1] or 0)):
    classifier = f"classifier {100 * real:.2f} % on t10k" if real is not None else "no prior"
    lines.append(f"- {model} ({classifier}): {', '.join(names)}")
  recorded = {row.get("machine", {}).get("date") for row in results["rows"].values()}
  unrecorded = sorted({env.get("cpu_model", "?") for env in results["environments"]
                       if env.get("date") not in recorded})
  if "not recorded" in {m for m, _ in groups}:
    lines.append("- Rows marked \"not recorded\" predate the per-row record; the JSON's "
                 "other environments are: " + ", ".join(unrecorded) + ".")
  return "\n".join(lines)


def render(results: dict, output_dir: str) -> str:
  ladder = ["vqgan", "prior_kl", "mask", "cl", "pcl"]
  parts = []
  env = results["environments"][-1] if results["environments"] else {}
  parts.append(f"Rows in the JSON: {len(results['rows'])} of "
               f"{sum(len(r.seeds) for r in ROWS)}. Machine: {env.get('description', '?')}. "
               f"Scale: `{json.dumps(SCALE)}`.")
  parts.append("Where the rows ran (floating point, and the Fashion-MNIST classifier retrained "
               "on each machine, differ between CPU models):\n\n" + _machines(results))
  parts.append("### Verdict: the paper's claims against these rows\n\n" + _verdict(results))
  parts.append("### The usage goal: what each knob costs\n\nEach setting that moves usage, "
               "against the paper's setting (the mask rung: r = 0.4, λ_kl 0.1, τ 1, L1 where "
               "the sample matches the argmax); each row differs from it in one setting. In "
               "brackets: the change of the mean; † where it exceeds 2 × the pooled seed std "
               "(the ladder's rule; for a single-seed row, the mask rung's std stands for "
               "both):\n\n" + _knob_costs(results))
  parts.append("### 1. The ablation ladder (mean ± sample std over seeds; AR prior)\n\n"
               + _table(results, ladder))
  parts.append("Paper (ADE20K, Table 2), rFID / PSNR / gFID: " + "; ".join(
      f"{ROWS_BY_KEY[k].label}: {v[0]} / {v[1]} / {v[2]}" for k, v in PAPER_LADDER.items()))
  parts.append("Diffusion prior on the first and last rungs:\n\n"
               + _table(results, ["vqgan", "pcl"], priors=("diffusion",)))
  parts.append("Which ladder changes exceed the seed spread (|Δ mean| > 2 × pooled sample "
               "std; rows with at least 2 seeds each, 3 planned). The last three columns pair "
               "the rows by seed, which share the data order and the initialization: "
               f"|mean per-seed Δ| > 2 × the per-seed Δs' sample std, from {MIN_PAIRS} pairs "
               "on. The pairing is a secondary reading, added after the third seeds showed "
               "a seed effect shared by the rungs; at 3 seeds both rules are about a "
               "two-sided 7 % test, so among this table's 35 lines 2 or 3 are expected to "
               "read 'yes' by chance even where nothing changed:\n\n" + _differences(
                   results, list(zip(ladder, ladder[1:])) + [("vqgan", "pcl")],
                   [("tokenizer", "usage"), ("tokenizer", "psnr"), ("tokenizer", "lpips"),
                    ("tokenizer", "rfd_vgg"), ("ar", "gfd_vgg"), ("ar", "bits_per_token"),
                    ("ar", "class_accuracy")]))
  parts.append("### 2. Mask ratio, judged on generation (seed 0 unless the ladder has more)\n\n"
               + _table(results, ["prior_kl", "r0.2", "mask", "r0.6", "r1.0", "r0.4_l1all",
                                  "r1.0_l1all"]))
  parts.append("### 3. Codebook size (reconstruction; generation at K = 1,024)\n\n"
               + _table(results, ["vqgan", "mask", "fq", "regfq", "vq_k8192", "regvq_k8192",
                                  "fq_k8192", "regfq_k8192", "vq_k16384", "regvq_k16384",
                                  "fq_k16384", "regfq_k16384", "regvq_k16384_tau0.25"],
                                 priors=())
               + "\n\nGeneration at K = 1,024 (AR prior; the larger books train no prior):\n\n"
               + _table(results, ["vqgan", "mask", "fq", "regfq"]))
  parts.append("### 4. Baselines\n\n" + _table(results, ["vqgan", "gumbel", "vq_ema_cos",
                                                        "mask"]))
  parts.append("### 5. Beyond the paper\n\n" + _table(results, ["mask", "kl_tau0.25",
                                                               "kl_tau0.5", "entropy0.1",
                                                               "kl1.0", "batch64"]))
  for name, check in sorted(results.get("verifications", {}).items()):
    metrics = check["metrics"]
    differing = [f"{m} ({v['recorded']!r} → {v['rerun']!r})" for m, v in metrics.items()
                 if not v["identical"]]
    parts.append(f"**Determinism.** `--verify={name}` re-trained the row from scratch on "
                 f"{check['date']}: {len(metrics) - len(differing)} of {len(metrics)} "
                 "recorded metrics identical (bit for bit)"
                 + (". Differing: " + "; ".join(differing) + "." if differing else "."))
  timing = [(r["name"], sum(s["wall_s"] for s in r["stages"].values()))
            for r in results["rows"].values()]
  if timing:
    parts.append(f"Wall time: {sum(t for _, t in timing) / 3600:.2f} h for {len(timing)} rows "
                 f"(median {np.median([t for _, t in timing]) / 60:.1f} min per row).")
  for image in _plots(results, output_dir):
    parts.append(f"![mask ratio]({image})")
  return "\n\n".join(parts)


def write_doc(results: dict, output_dir: str) -> str:
  from benchmarks import common
  path = os.path.join(output_dir, DOC_NAME)
  common.write_generated_section(
      path, f"{BEGIN_MARK}\n\n{render(results, output_dir)}\n\n{END_MARK}",
      begin=BEGIN_MARK, end=END_MARK, title="The Reg-VQ study")
  readme = os.path.join(_REPO, "README.md")
  if os.path.abspath(output_dir) == os.path.join(_REPO, "docs", "results") and (
      os.path.exists(readme)):
    with open(readme) as file:
      has_markers = README_BEGIN in file.read()
    if has_markers:
      rows = len(results["rows"])
      common.write_generated_section(
          readme, f"{README_BEGIN}\n{_verdict(results)}\n\n_From {rows} of "
          f"{sum(len(r.seeds) for r in ROWS)} rows of `docs/results/regvq_study.json`._\n"
          f"{README_END}", begin=README_BEGIN, end=README_END, title="")
  return path


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sections", default="", help=f"comma-separated of {SECTIONS}")
  parser.add_argument("--only", default="", help="row keys or names (key_s<seed>)")
  parser.add_argument("--seeds", default="", help="e.g. 0 or 0,1,2")
  parser.add_argument("--output_dir", default=os.path.join(_REPO, "docs", "results"))
  parser.add_argument("--workdir", default="/tmp/regvq_study")
  parser.add_argument("--idx_dir", default="", help="Fashion-MNIST IDX folder (default: "
                      "the config's, /usr/share/datasets/fashion-mnist)")
  parser.add_argument("--render", action="store_true", help="only re-render the doc")
  parser.add_argument("--rerun", action="store_true", help="train rows already in the JSON")
  parser.add_argument("--verify", default="", help="re-run this row name and compare")
  parser.add_argument("--dry_run", action="store_true", help="list the plan, train nothing")
  parser.add_argument("--keep_workdirs", action="store_true")
  parser.add_argument("--smoke", action="store_true",
                      help="a few steps per stage, to check the plumbing (needs --output_dir "
                      "other than docs/results)")
  args = parser.parse_args(argv)
  if args.smoke:
    if os.path.abspath(args.output_dir) == os.path.join(_REPO, "docs", "results"):
      parser.error("--smoke writes a JSON of meaningless numbers: give another --output_dir.")
    SCALE.update(tokenizer_steps=3, prior_steps=3, eval_images=64, eval_batch=32)
  for token in filter(None, args.sections.split(",")):
    if token not in SECTIONS:
      parser.error(f"unknown section {token!r}: choose from {SECTIONS}")
  os.makedirs(args.output_dir, exist_ok=True)
  json_path = os.path.join(args.output_dir, JSON_NAME)
  results = load_results(json_path)
  if args.render:
    print(write_doc(results, args.output_dir))
    return 0
  if args.verify:
    key, seed = args.verify.rsplit("_s", 1)
    recorded = results["rows"].get(args.verify)
    if recorded is None:
      raise SystemExit(f"{args.verify} is not in {json_path}: nothing to compare with.")
    again = train_row(ROWS_BY_KEY[key], int(seed), args)
    report = {}
    for stage, values in recorded["stages"].items():
      for metric, value in values["metrics"].items():
        if metric.startswith("train/"):
          continue
        new = again["stages"][stage]["metrics"].get(metric)
        report[f"{stage}/{metric}"] = {"recorded": value, "rerun": new,
                                       "identical": new == value}
    results = load_results(json_path)  # Rows another process added meanwhile stay.
    results.setdefault("verifications", {})[args.verify] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "all_identical": all(v["identical"] for v in report.values()), "metrics": report}
    save_results(results, json_path)
    write_doc(results, args.output_dir)
    print(json.dumps(results["verifications"][args.verify], indent=1))
    return 0
  plan = [(row, seed) for row, seed in selected(args)
          if args.rerun or row.name(seed) not in results["rows"]]
  print(f"[regvq_study] {len(plan)} rows to train: " + ", ".join(
      row.name(seed) for row, seed in plan), flush=True)
  if args.dry_run:
    return 0
  # Recorded with the first row that lands, not here: a run whose rows all fail must leave
  # the JSON, and the doc rendered from it, as they were.
  this_machine = environment()
  failures = []
  for index, (row, seed) in enumerate(plan):
    print(f"[regvq_study] ({index + 1}/{len(plan)}) {row.name(seed)}: {row.label}", flush=True)
    try:
      record = train_row(row, seed, args)
    except Exception:  # pylint: disable=broad-except
      # One broken row must not cost the night's other rows; it stays out of the JSON,
      # so the next run retries it.
      traceback.print_exc()
      print(f"[regvq_study] {row.name(seed)} FAILED; continuing.", flush=True)
      failures.append(row.name(seed))
      continue
    # Floating point differs between CPU models (and so does the retrained classifier):
    # each row says where it ran, so the doc can say which rows compare bit for bit.
    record["machine"] = {k: this_machine.get(k) for k in ("description", "cpu_model", "date")}
    # Merged into the file as it is now, not as it was at start-up: a row takes ~20
    # minutes, and another process (--verify, a note added by hand) may have written since.
    on_disk = load_results(json_path)
    if this_machine not in on_disk["environments"]:
      on_disk["environments"].append(this_machine)
    on_disk["rows"][row.name(seed)] = record
    results = on_disk
    save_results(results, json_path)
    write_doc(results, args.output_dir)
  write_doc(results, args.output_dir)
  if failures:
    print(f"[regvq_study] failed rows: {', '.join(failures)}", flush=True)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
