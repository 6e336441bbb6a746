"""Codebook study: does Reg-VQ keep its codebook alive where plain VQ collapses?

A script, not a test (see docs/results/codebook_study.md for a run and what it shows):

  python -m benchmarks.codebook_study                          # the whole study
  python -m benchmarks.codebook_study --only=vq,regvq_mask     # re-run a subset
  python -m benchmarks.codebook_study --data=/path/to/images   # an image folder instead
  python -m benchmarks.codebook_study --only=regvq_mask --output_dir=/tmp/rerun \
      --verify_against=docs/results/codebook_study.json        # determinism check

Every run trains the tokenizer of configs/demo.py (the small VQGAN: ch 32, ch_mult
(1, 2, 2), 8×8 tokens for 32×32 images) with K codes for the same fixed number of steps,
on the same data, from the same seed; only the quantizer (and, for the PCL rung, the
loss) changes. It evaluates every `--eval_every` steps and keeps each evaluation's
metrics and code histogram, so codebook usage can be followed over training. The runs:

  methods      vq, vq_l2, gumbel, regvq_r0_kl0, fq, regfq
  ladder       vq → regvq_prior (λ_kl, r = 0) → regvq_mask (r = 0.4) → regvq_pcl (+ PCL;
               only with --only=regvq_pcl, see below)
  mask sweep   r ∈ {0, 0.2, 0.4, 0.6, 0.8, 1.0} at λ_kl = 0.1
  λ_kl sweep   λ_kl ∈ {0, 0.01, 0.1, 1.0} at r = 0.4
  τ sweep      τ ∈ {0.5, 1.0, 2.0} (constant) at r = 0.4, λ_kl = 0.1

A run that is the same setting in several tables (r = 0.4, λ_kl = 0.1, τ = 1 is the
ladder's "+mask" rung, the sweeps' centre and the Reg-VQ default) is trained once.

Outputs in `--output_dir`: codebook_study.json (settings, environment and per run the
final metrics, the evaluation history, the final code histogram, wall time),
PNG plots, and the generated section of codebook_study.md (text outside the
`<!-- BEGIN GENERATED -->` … `<!-- END GENERATED -->` markers is kept, so the analysis
written around the tables survives a re-run). `--only` merges into an existing JSON made
with the same settings.

GAN training is off (the discriminator would start after the last step): in runs this
short it adds cost and noise and says nothing about the codebook. LPIPS (perceptual loss
and metric) is used only when its converted weights exist, rFID when the stage finds
Inception weights. PCL needs VGG-19 weights; when `$RVQ_JAX_WEIGHTS_DIR/vgg19.npz` is
absent the PCL rung runs on randomly initialized VGG-19 features and is marked †
everywhere (it then tests the loss's mechanics, not the paper's perceptual PCL). It is
trained only when named in --only: VGG-19 makes its step about ten times dearer.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any
from typing import Sequence

import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from benchmarks import common
from rvq_jax import config as config_lib
from rvq_jax.models import pretrained
from rvq_jax.train import loop
from rvq_jax.train.tokenizer_stage import TokenizerStage

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JSON_NAME = "codebook_study.json"
DOC_NAME = "codebook_study.md"
BEGIN_MARK = "<!-- BEGIN GENERATED (benchmarks/codebook_study.py; edits inside are lost) -->"
END_MARK = "<!-- END GENERATED -->"
# Settings that must agree before `--only` may merge new runs into an existing JSON.
COMPARABLE_SETTINGS = ("data", "eval_data", "steps", "eval_every", "num_codes", "seed",
                       "batch_size", "image_size", "eval_images", "gan")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: a quantizer kind and the config values that differ from the base."""

  name: str
  label: str
  kind: str
  quantizer: tuple[tuple[str, Any], ...] = ()
  loss: tuple[tuple[str, Any], ...] = ()
  needs_vgg19: bool = False


def _regvq(name, label, *, r=0.4, kl=0.1, tau=1.0, **extra):
  quantizer = (("mask_ratio", r), ("prior_kl_weight", kl), ("temperature_start", tau),
               ("temperature_end", tau), ("temperature_anneal_steps", 0))
  return Run(name, label, "regvq", quantizer=quantizer, **extra)


# Reg-VQ's PCL weight in configs/celebahq.py; the study trains the rung with it.
PCL_WEIGHT = 0.1

RUNS = (
    Run("vq", "VQ", "vq"),
    Run("vq_l2", "VQ, L2-normalized codes", "vq", quantizer=(("normalize", True),)),
    # Taming's GumbelQuantize schedule (the gumbel block's defaults), spelled out.
    Run("gumbel", "Gumbel-VQ", "gumbel",
        quantizer=(("temperature_start", 0.9), ("temperature_end", 1e-6),
                   ("temperature_anneal_steps", 1_000_000))),
    _regvq("regvq_r0_kl0", "categorical, no regularizer (r=0, λ=0)", r=0.0, kl=0.0),
    _regvq("regvq_prior", "Reg-VQ: prior KL only (r=0)", r=0.0),
    _regvq("regvq_mask", "Reg-VQ: + mask r=0.4", r=0.4),
    _regvq("regvq_pcl", "Reg-VQ: + PCL", r=0.4, loss=(("pcl_weight", PCL_WEIGHT),),
           needs_vgg19=True),
    Run("fq", "FQ (2 sub-codebooks)", "fq"),
    Run("regfq", "Reg-FQ (2 sub-codebooks)", "regfq",
        quantizer=(("mask_ratio", 0.4), ("prior_kl_weight", 0.1))),
    _regvq("regvq_r0.2", "Reg-VQ r=0.2", r=0.2),
    _regvq("regvq_r0.6", "Reg-VQ r=0.6", r=0.6),
    _regvq("regvq_r0.8", "Reg-VQ r=0.8", r=0.8),
    _regvq("regvq_r1.0", "Reg-VQ r=1.0", r=1.0),
    _regvq("regvq_kl0", "Reg-VQ λ_kl=0", kl=0.0),
    _regvq("regvq_kl0.01", "Reg-VQ λ_kl=0.01", kl=0.01),
    _regvq("regvq_kl1", "Reg-VQ λ_kl=1", kl=1.0),
    _regvq("regvq_tau0.5", "Reg-VQ τ=0.5", tau=0.5),
    _regvq("regvq_tau2", "Reg-VQ τ=2", tau=2.0),
)
RUNS_BY_NAME = {run.name: run for run in RUNS}
# Trained only when named in --only: without VGG-19 weights the rung would run on random
# features (it could not test the paper's perceptual PCL), and VGG-19's forward and
# backward pass on every step cost about ten times a whole step of the small tokenizer.
OPT_IN = {"regvq_pcl": "skipped: no VGG-19 weights (see text); `--only=regvq_pcl` runs it"}

# The tables: (title, [(row label, run name)], the column the rows vary in).
METHODS_TABLE = [("VQ", "vq"), ("VQ, L2-normalized codes", "vq_l2"), ("Gumbel-VQ", "gumbel"),
                 ("categorical ST-argmax, no regularizer", "regvq_r0_kl0"),
                 ("Reg-VQ (r=0.4, λ_kl=0.1)", "regvq_mask"), ("Reg-VQ + PCL", "regvq_pcl"),
                 ("FQ", "fq"), ("Reg-FQ", "regfq")]
LADDER_TABLE = [("VQ(GAN)", "vq"), ("+ prior KL (λ_kl=0.1, r=0)", "regvq_prior"),
                ("+ stochastic mask (r=0.4)", "regvq_mask"), ("+ PCL", "regvq_pcl")]
# The paper's ablation (ADE20K, Table 2): FID_R / PSNR / FID_G. It has a "+CL" rung
# (uniform-weight contrastive loss) between "+mask" and "+PCL" that this study skips.
PAPER_LADDER = {"vq": (28.17, 18.89, 38.53), "regvq_prior": (25.92, 18.98, 36.57),
                "regvq_mask": (25.11, 18.56, 35.03), "regvq_pcl": (23.69, 18.44, 34.47)}
MASK_SWEEP = [(f"r={r}", name) for r, name in (
    (0.0, "regvq_prior"), (0.2, "regvq_r0.2"), (0.4, "regvq_mask"), (0.6, "regvq_r0.6"),
    (0.8, "regvq_r0.8"), (1.0, "regvq_r1.0"))]
KL_SWEEP = [(f"λ_kl={kl}", name) for kl, name in (
    (0.0, "regvq_kl0"), (0.01, "regvq_kl0.01"), (0.1, "regvq_mask"), (1.0, "regvq_kl1"))]
# The runs of the per-method plots, in ladder order.
PLOT_ROWS = [("VQ", "vq"), ("VQ, L2-normalized", "vq_l2"), ("Gumbel-VQ", "gumbel"),
             ("categorical, no regularizer", "regvq_r0_kl0"),
             ("Reg-VQ prior KL only (r=0)", "regvq_prior"),
             ("Reg-VQ prior + mask r=0.4", "regvq_mask"), ("Reg-VQ + PCL", "regvq_pcl"),
             ("FQ", "fq"), ("Reg-FQ", "regfq")]
TAU_SWEEP = [(f"τ={tau}", name) for tau, name in (
    (0.5, "regvq_tau0.5"), (1.0, "regvq_mask"), (2.0, "regvq_tau2"))]


# ---------------------------------------------------------------------------- configs


def _weights_exist(network: str) -> bool:
  try:
    return os.path.exists(pretrained.resolve_weights_path(network, None))
  except (FileNotFoundError, ValueError):
    return False


def _demo_config():
  return common.load_config("demo")


def build_config(run: Run, args: argparse.Namespace, *, lpips: bool, vgg19: bool):
  """The demo config with the study's shared settings and the run's own values."""
  config = _demo_config()
  config.seed = args.seed
  config.stages = ("tokenizer",)
  if args.data == "embedded":
    # Eval: 2 photographs × crops; enough tokens that K codes can all show up.
    config.data.update(source="embedded",
                       embedded_eval_crops_per_photo=math.ceil(args.eval_images / 2))
  else:
    config.data.update(source="folder", path=args.data, eval_path=args.eval_data or args.data)
  # Two decoding threads are plenty for 32-pixel crops and leave the cores to XLA.
  config.data.update(image_size=args.image_size, num_workers=2, prefetch_batches=2)
  tokenizer = config.tokenizer
  config_lib.set_quantizer(config, run.kind)
  tokenizer.quantizer.num_codes = args.num_codes
  tokenizer.quantizer[run.kind].update(dict(run.quantizer))
  tokenizer.loss.update(perceptual_weight=1.0 if lpips else 0.0,
                        disc_start=args.steps + 1 if not args.gan else tokenizer.loss.disc_start)
  tokenizer.loss.update(dict(run.loss))
  if run.needs_vgg19:
    # The recorded study's PCL rung: VGG-19 features and the paper's summed formula
    # (before VGG16 and the mean reduction became the defaults; see regvq_study for new runs).
    tokenizer.loss.update(pcl_network="vgg19", pcl_reduction="sum")
    if not vgg19:
      config.weights.random = True
  # Checkpoint only at the end (the loop always saves the last step), no image summaries.
  tokenizer.train.update(batch_size=args.batch_size, num_steps=args.steps,
                         log_every=args.eval_every, checkpoint_every=args.steps + 1,
                         eval_every=args.eval_every, summary_every=0, keep_checkpoints=1)
  tokenizer.eval.update(batch_size=args.eval_batch_size,
                        num_batches=math.ceil(args.eval_images / args.eval_batch_size))
  config_lib.validate(config)
  return config


# ---------------------------------------------------------------------------- training


class RecordingStage(TokenizerStage):
  """The tokenizer stage, keeping every evaluation's metrics and code histogram.

  The loop evaluates at every multiple of eval_every below num_steps and once at the end,
  in that order, so the i-th record belongs to step (i + 1) · eval_every (the last to
  num_steps).
  """

  def __init__(self, config):
    super().__init__(config)
    # (wall time, process CPU time, metrics, [M, K] code counts) per evaluation.
    self.records: list[tuple[float, float, dict, np.ndarray]] = []

  def finalize_eval(self, totals):
    counts = np.array(totals["code_counts"], np.float64)
    metrics = super().finalize_eval(dict(totals))
    self.records.append((time.time(), time.process_time(), metrics, counts))
    return metrics


def _code_stats(counts: np.ndarray) -> dict:
  """Usage, perplexity and dead codes of [M, K] histograms (means over sub-codebooks)."""
  usage, perplexity, dead = [], [], []
  for row in counts:
    probs = row / max(row.sum(), 1.0)
    nonzero = probs[probs > 0]
    usage.append(float((row > 0).mean()))
    perplexity.append(float(np.exp(-(nonzero * np.log(nonzero)).sum())))
    dead.append(int((row == 0).sum()))
  return {"usage_per_codebook": usage, "perplexity_per_codebook": perplexity,
          "dead_codes_per_codebook": dead}


def train_run(run: Run, args: argparse.Namespace, workdir: str, *, lpips: bool,
              vgg19: bool) -> dict:
  config = build_config(run, args, lpips=lpips, vgg19=vgg19)
  run_dir = os.path.join(workdir, run.name)
  # A fresh directory: the loop resumes from any checkpoint it finds, and a resumed run
  # would not be the run the table claims.
  shutil.rmtree(run_dir, ignore_errors=True)
  stage = RecordingStage(config)
  loop_config = dataclasses.replace(loop.loop_config_from(config),
                                    asynchronous_checkpoints=False)
  load_before = os.getloadavg()
  start, cpu_start = time.time(), time.process_time()
  final = loop.run(stage, loop_config, run_dir)
  wall, cpu = time.time() - start, time.process_time() - cpu_start
  load_after = os.getloadavg()
  eval_steps = list(range(args.eval_every, args.steps, args.eval_every)) + [args.steps]
  if len(eval_steps) != len(stage.records):
    raise RuntimeError(f"{run.name}: expected {len(eval_steps)} evaluations, recorded "
                       f"{len(stage.records)}.")
  history = [{"step": step, **metrics, **_code_stats(counts)}
             for step, (_, _, metrics, counts) in zip(eval_steps, stage.records)]
  # Steady-state cost: between the first and the last evaluation, so compilation and
  # start-up are excluded (the evaluations in between are included). CPU seconds do not
  # depend on what else shares the cores; wall seconds do.
  steady_wall = steady_cpu = None
  if len(stage.records) >= 2:
    span = eval_steps[-1] - eval_steps[0]
    steady_wall = (stage.records[-1][0] - stage.records[0][0]) / span
    steady_cpu = (stage.records[-1][1] - stage.records[0][1]) / span
  final_counts = stage.records[-1][3]
  q = config.tokenizer.quantizer
  loss = config.tokenizer.loss
  return {
      "name": run.name, "label": run.label, "kind": run.kind,
      "overrides": {"quantizer": dict(run.quantizer), "loss": dict(run.loss)},
      "quantizer": {"kind": q.kind, "num_codes": q.num_codes, "code_dim": q.code_dim,
                    **q[q.kind].to_dict()},
      "loss": {**{k: loss[k] for k in ("l1_weight", "perceptual_weight", "pcl_weight",
                                       "pcl_tau", "representation_weight", "disc_start")},
               "random_pretrained": config.weights.random},
      "random_vgg19": bool(config.weights.random and loss.pcl_weight > 0),
      "final": {**final, **_code_stats(final_counts)},
      "history": history,
      "final_code_counts": final_counts.astype(np.int64).tolist(),
      "wall_s": wall,
      # CPU seconds of this process (all threads): what the run costs whatever else
      # shares the cores; on an idle machine the wall time lies between cpu_s / cores
      # and cpu_s.
      "cpu_s": cpu,
      "steady_s_per_step": steady_wall,
      "steady_cpu_s_per_step": steady_cpu,
      "load_average_before": load_before, "load_average_after": load_after,
  }


# ---------------------------------------------------------------------------- environment


def _git(*args) -> str:
  try:
    return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                          check=True).stdout.rstrip("\n")
  except (OSError, subprocess.CalledProcessError):
    return ""


def environment() -> dict:
  cpu = ""
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), "")
  except OSError:
    pass
  import flax
  return {
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "host": platform.node(), "platform": platform.platform(), "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "devices": [str(d) for d in jax.devices()],
      "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
      "numpy": np.__version__,
      "git_commit": _git("rev-parse", "HEAD"),
      "git_dirty_files": [line[3:] for line in _git("status", "--porcelain").splitlines()],
      "load_average_at_start": os.getloadavg(),
  }


def settings_of(args) -> dict:
  return {"data": args.data, "eval_data": args.eval_data or "", "steps": args.steps,
          "eval_every": args.eval_every, "num_codes": args.num_codes, "seed": args.seed,
          "batch_size": args.batch_size, "image_size": args.image_size,
          "eval_images": args.eval_images, "eval_batch_size": args.eval_batch_size,
          "gan": args.gan}


# ---------------------------------------------------------------------------- plots (PIL)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has one bitmap size.
    return ImageFont.load_default()


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
  if high <= low:
    high = low + 1.0
  raw = (high - low) / count
  magnitude = 10 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
  first = math.ceil(low / step) * step
  return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
  if value == 0:
    return "0"
  if abs(value) >= 1000 or abs(value) < 0.01:
    return f"{value:.0e}".replace("e+0", "e").replace("e-0", "e-")
  return f"{value:g}"


def line_chart(series, *, title: str, xlabel: str, ylabel: str, y_range=None, log_y=False,
               size=(840, 440), markers=True) -> Image.Image:
  """series: [(label, xs, ys)] → an RGB chart with axes, ticks and a legend."""
  width, height = size
  left, right, top, bottom = 70, 290, 36, 50
  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  font, small = _font(14), _font(11)
  xs_all = [x for _, xs, _ in series for x in xs]
  ys_all = [y for _, _, ys in series for y in ys if y is not None and math.isfinite(y)]
  if log_y:
    ys_all = [y for y in ys_all if y > 0]
  x_low, x_high = (min(xs_all), max(xs_all)) if xs_all else (0, 1)
  if x_high == x_low:
    x_high = x_low + 1
  if y_range:
    y_low, y_high = y_range
  elif log_y:
    y_low = 10 ** math.floor(math.log10(min(ys_all))) if ys_all else 1
    y_high = 10 ** math.ceil(math.log10(max(ys_all))) if ys_all else 10
  else:
    y_low, y_high = (min(ys_all), max(ys_all)) if ys_all else (0, 1)
    pad = 0.05 * (y_high - y_low or 1.0)
    y_low, y_high = y_low - pad, y_high + pad
  transform = (lambda y: math.log10(y)) if log_y else (lambda y: y)
  t_low, t_high = transform(y_low), transform(y_high)

  def px(x, y):
    u = left + (x - x_low) / (x_high - x_low) * (width - left - right)
    v = height - bottom - (transform(y) - t_low) / (t_high - t_low) * (height - top - bottom)
    return u, v

  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for x in _nice_ticks(x_low, x_high, 6):
    u, _ = px(x, y_low)
    draw.line([u, height - bottom, u, height - bottom + 4], fill="black")
    draw.text((u, height - bottom + 6), _fmt(x), fill="black", font=small, anchor="ma")
  y_ticks = ([10 ** e for e in range(int(t_low), int(t_high) + 1)] if log_y
             else _nice_ticks(y_low, y_high, 5))
  for y in y_ticks:
    _, v = px(x_low, y)
    draw.line([left - 4, v, left, v], fill="black")
    draw.line([left + 1, v, width - right - 1, v], fill=(230, 230, 230))
    draw.text((left - 6, v), _fmt(y), fill="black", font=small, anchor="rm")
  draw.text(((left + width - right) / 2, 8), title, fill="black", font=font, anchor="ma")
  draw.text(((left + width - right) / 2, height - 18), xlabel, fill="black", font=small,
            anchor="ma")
  draw.text((6, top - 22), ylabel, fill="black", font=small)
  for index, (label, xs, ys) in enumerate(series):
    color = PALETTE[index % len(PALETTE)]
    points = [px(x, y) for x, y in zip(xs, ys)
              if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
    if len(points) > 1:
      draw.line(points, fill=color, width=2)
    if markers and len(points) <= 60:
      for u, v in points:
        draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=color)
    legend_y = top + 6 + index * 18
    draw.line([width - right + 10, legend_y + 6, width - right + 30, legend_y + 6],
              fill=color, width=3)
    draw.text((width - right + 36, legend_y), label, fill="black", font=small)
  return image


def histogram_grid(panels, *, title: str, columns: int = 3,
                   panel_size=(300, 190)) -> Image.Image:
  """panels: [(label, counts [K])] → a grid of sorted-frequency bar charts (log y)."""
  rows = math.ceil(len(panels) / columns)
  pw, ph = panel_size
  image = Image.new("RGB", (columns * pw, rows * ph + 30), "white")
  draw = ImageDraw.Draw(image)
  font, small = _font(14), _font(11)
  draw.text((columns * pw / 2, 6), title, fill="black", font=font, anchor="ma")
  for index, (label, counts) in enumerate(panels):
    row, column = divmod(index, columns)
    x0, y0 = column * pw + 40, 30 + row * ph + 22
    x1, y1 = (column + 1) * pw - 10, 30 + (row + 1) * ph - 22
    counts = np.sort(np.asarray(counts, np.float64))[::-1]
    total = max(counts.sum(), 1.0)
    freq = counts / total
    draw.rectangle([x0, y0, x1, y1], outline="black")
    used = int((counts > 0).sum())
    draw.text((x0, y0 - 18), f"{label}: {used}/{len(counts)} used", fill="black", font=small)
    # Log-frequency axis from 1e-5 to 1: one decade per gridline.
    low, high = -5.0, 0.0
    for exponent in range(int(low), int(high) + 1):
      v = y1 - (exponent - low) / (high - low) * (y1 - y0)
      draw.line([x0 + 1, v, x1 - 1, v], fill=(230, 230, 230))
      draw.text((x0 - 4, v), f"1e{exponent}", fill="black", font=small, anchor="rm")
    span = x1 - x0 - 2
    for rank, value in enumerate(freq):
      if value <= 0:
        break
      u = x0 + 1 + rank / len(freq) * span
      v = y1 - (max(math.log10(value), low) - low) / (high - low) * (y1 - y0)
      draw.line([u, y1 - 1, u, v], fill=(40, 90, 200))
    draw.text(((x0 + x1) / 2, y1 + 3), "codes, by frequency rank", fill="black",
              font=small, anchor="ma")
  return image


def _plain(label: str) -> str:
  return label.replace("λ_kl", "kl").replace("τ", "tau").replace("†", "(random VGG-19)")


def _series(runs: dict, rows, key: str, scale: float = 1.0):
  out = []
  for label, name in rows:
    if name in runs:
      history = runs[name]["history"]
      out.append((label, [h["step"] for h in history],
                  [h[key] * scale if key in h else None for h in history]))
  return out


def write_plots(runs: dict, output_dir: str, suffix: str) -> list[str]:
  """The PNG files (names relative to output_dir)."""
  written = []

  def save(image, name):
    image.save(os.path.join(output_dir, name))
    written.append(name)

  # PIL's default font has no Greek letters or daggers: the plots spell them out.
  unique_rows = [(_plain(_mark(runs, name, label)), name) for label, name in PLOT_ROWS]
  for key, scale, label, y_range in (("usage", 100, "codebook usage (%)", (0, 100)),
                                     ("perplexity", 1, "perplexity", None),
                                     ("psnr", 1, "PSNR (dB)", None)):
    save(line_chart(_series(runs, unique_rows, key, scale),
                    title=f"{label} over training, eval split{suffix}", xlabel="step",
                    ylabel=label, y_range=y_range), f"codebook_{key}_methods.png")
  for rows, name in ((MASK_SWEEP, "mask"), (KL_SWEEP, "kl"), (TAU_SWEEP, "tau")):
    rows = [(_plain(label), run_name) for label, run_name in rows]
    save(line_chart(_series(runs, rows, "usage", 100),
                    title=f"Reg-VQ {name} sweep: codebook usage{suffix}", xlabel="step",
                    ylabel="usage (%)", y_range=(0, 100)), f"codebook_usage_{name}_sweep.png")
  panels = [(_mark(runs, name, label), np.asarray(runs[name]["final_code_counts"])[0])
            for label, name in unique_rows if name in runs]
  save(histogram_grid(panels, title=f"Final token histograms (eval split, sorted by "
                                    f"frequency; FQ: first sub-codebook){suffix}"),
       "codebook_histograms.png")
  return written


# ---------------------------------------------------------------------------- tables


def _mark(runs: dict, name: str, label: str) -> str:
  """Row labels of runs with random VGG-19 features carry a dagger."""
  return label + " †" if name in runs and runs[name].get("random_vgg19") else label


def _metric_columns(runs: dict) -> list[tuple[str, str, str]]:
  columns = [("usage", "usage %", "pct"), ("perplexity", "perplexity", "1f"),
             ("dead_codes", "dead", "0f"), ("psnr", "PSNR", "2f"), ("ssim", "SSIM", "3f"),
             ("l1", "L1", "4f")]
  if any("lpips" in r["final"] for r in runs.values()):
    columns.append(("lpips", "LPIPS", "4f"))
  if any("rfid" in r["final"] for r in runs.values()):
    columns.append(("rfid", "rFID", "2f"))
  return columns


def _cell(value, fmt: str) -> str:
  if value is None:
    return "–"
  if fmt == "pct":
    return f"{100 * value:.1f}"
  return f"{value:.{fmt}}"


def table(runs: dict, rows, *, extra=None, first_header="run") -> str:
  """A markdown table of final metrics; `extra`: [(header, fn(name) -> str)]."""
  columns = _metric_columns(runs)
  extra = extra or []
  header = ([first_header, "name"] + [h for _, h, _ in columns]
            + ["usage @ first eval %", "wall s", "CPU s", "CPU s/step"]
            + [h for h, _ in extra])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, name in rows:
    if name not in runs:
      lines.append(f"| {label} | `{name}` | " + " | ".join(
          [OPT_IN.get(name, "not run")] + [""] * (len(header) - 3)) + " |")
      continue
    run = runs[name]
    final = run["final"]
    cells = [_mark(runs, name, label), f"`{name}`"]
    cells += [_cell(final.get(key), fmt) for key, _, fmt in columns]
    cells.append(_cell(run["history"][0]["usage"], "pct"))
    cells.append(f"{run['wall_s']:.0f}")
    cells.append(_cell(run.get("cpu_s"), "0f"))
    cells.append(_cell(run.get("steady_cpu_s_per_step"), "3f"))
    cells += [fn(name) for _, fn in extra]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _model_text(model: dict) -> str:
  if not model:
    return "see configs/demo.py"
  return (f"ch {model['ch']}, ch_mult {tuple(model['ch_mult'])}, {model['num_res_blocks']} "
          f"res block(s), attention at {tuple(model['attn_resolutions']) or 'none'}, "
          f"z {model['z_channels']}, Adam lr {model['learning_rate']:g}")


def generated_section(result: dict, plots: list[str]) -> str:
  runs, settings, env = result["runs"], result["settings"], result["environment"]
  tokens_per_image = (settings["image_size"] // 4) ** 2
  # Counted, not computed from --eval_images: a small folder may hold fewer images.
  eval_tokens = int(sum(next(iter(runs.values()))["final_code_counts"][0])) if runs else 0
  k = settings["num_codes"]
  uniform_usage = 1 - (1 - 1 / k) ** eval_tokens
  any_random = any(r.get("random_vgg19") for r in runs.values())
  has_lpips = any("lpips" in r["final"] for r in runs.values())
  lpips_text = " + LPIPS" if has_lpips else " only (no LPIPS weights)"
  parts = [BEGIN_MARK, "", "## Setup (generated)", "",
           f"* Command: `{result['command']}`",
           f"* Date: {env['date']}; machine: {env['cpu']} ({env['usable_cpus']} usable of "
           f"{env['cpu_count']} CPUs, {env['platform']}), JAX {env['jax']}, "
           f"Flax {env['flax']}, devices {', '.join(env['devices'])}.",
           f"* Code: commit `{env['git_commit'][:12]}`"
           + (f" plus {len(env['git_dirty_files'])} uncommitted files (listed in the JSON)"
              if env["git_dirty_files"] else "") + ".",
           f"* Load average at start {tuple(round(x, 2) for x in env['load_average_at_start'])}"
           " (the cores are shared: wall times are inflated by other jobs).",
           f"* Data: `{settings['data']}` at {settings['image_size']}×{settings['image_size']},"
           f" batch {settings['batch_size']}, {settings['steps']} steps, seed "
           f"{settings['seed']}, identical for every run.",
           f"* Model: configs/demo.py's VQGAN ({_model_text(result.get('model', {}))}; "
           f"{tokens_per_image} tokens per image), K = {k} codes (code width "
           f"{result.get('model', {}).get('code_dim', '?')}; FQ/Reg-FQ: 2 sub-codebooks of "
           f"K codes, width 8). L1 loss{lpips_text}; GAN "
           f"{'on' if settings['gan'] else 'off'}.",
           f"* Evaluation every {settings['eval_every']} steps on "
           f"{eval_tokens // tokens_per_image} held-out images = {eval_tokens} tokens. "
           "Usage = fraction of the K codes that appear at least once among them; a "
           f"perfectly uniform code distribution would show {100 * uniform_usage:.2f}% at "
           "this sample size. Perplexity = exp(entropy) "
           f"of the code histogram (max {k}). FQ/Reg-FQ: the mean over the 2 sub-codebooks.",
           "* wall s: the whole run including compilation, evaluations and the final "
           "checkpoint (inflated by whatever else ran on the shared cores); CPU s: this "
           "process's CPU time for the run (all threads; independent of other jobs); CPU "
           "s/step: between the first and last evaluation (compilation excluded, "
           "evaluations included).",
           ]
  if any_random:
    parts.append("* **†: PCL computed on randomly initialized VGG-19 features** "
                 "(`weights.random=True`; no `vgg19.npz` here). It exercises the "
                 "PCL mechanics (perturbation weights, masking), not the paper's perceptual "
                 "contrastive loss; read that row as a mechanism check only.")
  parts += ["", "## Methods (generated)", "",
            f"Same data, {settings['steps']} steps, K = {k}, model and seed for every row.",
            "", table(runs, METHODS_TABLE, first_header="method"), "",
            "## Reg-VQ ablation ladder vs the paper (generated)", "",
            "Paper columns: ADE20K, 256×256, full training (FID_R / PSNR / FID_G, Table 2); "
            "the paper's '+CL' rung (uniform-weight contrastive) is not run here.", "",
            table(runs, LADDER_TABLE, first_header="rung", extra=[
                ("paper FID_R / PSNR / FID_G",
                 lambda n: " / ".join(f"{v:g}" for v in PAPER_LADDER[n]))]), "",
            "## Mask-ratio sweep, λ_kl = 0.1, τ = 1 (generated)", "",
            table(runs, MASK_SWEEP, first_header="r"), "",
            "## λ_kl sweep, r = 0.4, τ = 1 (generated)", "",
            table(runs, KL_SWEEP, first_header="λ_kl"), "",
            "## Temperature sweep, r = 0.4, λ_kl = 0.1 (generated)", "",
            table(runs, TAU_SWEEP, first_header="τ"), "",
            "## Plots (generated)", ""]
  parts += [f"![{name}]({name})" for name in plots]
  determinism = result.get("determinism")
  if determinism:
    parts += ["", "## Determinism (generated)", ""]
    for entry in determinism:
      parts.append(f"* `{entry['run']}` re-run in a fresh process against "
                   f"`{entry['against']}`: {entry['verdict']}")
  reruns = result.get("partial_reruns", [])
  if reruns:
    parts += ["", "## Partial re-runs (generated)", ""]
    parts += [f"* {rerun['date']}: `{rerun['command']}`" for rerun in reruns]
  parts += ["", f"Raw numbers: [{JSON_NAME}]({JSON_NAME}).", "", END_MARK]
  return "\n".join(parts)


def write_doc(path: str, section: str) -> None:
  """Replaces the generated section of the doc, keeping what is written around it."""
  common.write_generated_section(path, section, begin=BEGIN_MARK, end=END_MARK,
                                 title="Codebook study")


# ---------------------------------------------------------------------------- determinism


def compare_runs(new: dict, old: dict) -> str:
  """Bit-identical, or the largest difference, of two records of the same run."""
  differences = []
  for key in sorted(set(new["final"]) & set(old["final"])):
    a, b = new["final"][key], old["final"][key]
    if a != b:
      differences.append(f"{key} {b!r} → {a!r}")
  same_counts = new["final_code_counts"] == old["final_code_counts"]
  same_history = all(h1.get(k) == h2.get(k) for h1, h2 in zip(new["history"], old["history"])
                     for k in ("usage", "perplexity", "psnr", "l1"))
  if not differences and same_counts and same_history:
    return ("bit-identical (every final metric, every evaluation in the history and the "
            "final code histogram).")
  return ("differs: " + ("; ".join(differences) or "final metrics equal")
          + ("" if same_counts else "; code histograms differ")
          + ("" if same_history else "; history differs"))


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default="embedded",
                      help="'embedded' (scikit-image photographs) or an image folder")
  parser.add_argument("--eval_data", default="",
                      help="held-out image folder ('' = --data itself for a folder)")
  parser.add_argument("--steps", type=int, default=300, help="training steps per run")
  parser.add_argument("--eval_every", type=int, default=30)
  parser.add_argument("--num_codes", type=int, default=1024, help="K")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--eval_images", type=int, default=128,
                      help="held-out images per evaluation (tokens = 64 per image at 32 px)")
  parser.add_argument("--eval_batch_size", type=int, default=32)
  parser.add_argument("--gan", action="store_true",
                      help="keep the demo config's GAN start instead of turning it off")
  parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
  parser.add_argument("--output_dir", default=os.path.join(_REPO, "docs", "results"))
  parser.add_argument("--workdir", default="",
                      help="checkpoints go to <workdir>/<run> (default: a temporary "
                           "directory, removed at the end)")
  parser.add_argument("--verify_against", default="",
                      help="a codebook_study.json: compare the runs trained now with the "
                           "same runs in it and record whether they are bit-identical")
  parser.add_argument("--list", action="store_true", help="print the run names and exit")
  parser.add_argument("--render_only", action="store_true",
                      help="rewrite the doc's generated section and the plots from the JSON "
                           "in --output_dir, without training")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if args.list:
    for run in RUNS:
      print(f"{run.name:14s} {run.label}")
    return 0
  if args.render_only:
    with open(os.path.join(args.output_dir, JSON_NAME)) as f:
      _render(json.load(f), args.output_dir)
    return 0
  names = ([n.strip() for n in args.only.split(",") if n.strip()]
           or [r.name for r in RUNS if r.name not in OPT_IN])
  unknown = [n for n in names if n not in RUNS_BY_NAME]
  if unknown:
    raise SystemExit(f"unknown run(s) {unknown}; known: {', '.join(RUNS_BY_NAME)}")
  if args.data != "embedded" and not os.path.isdir(args.data):
    raise SystemExit(f"--data must be 'embedded' or an image folder, got {args.data!r}")
  os.makedirs(args.output_dir, exist_ok=True)
  json_path = os.path.join(args.output_dir, JSON_NAME)
  settings = settings_of(args)
  command = " ".join(["python -m benchmarks.codebook_study",
                      *(sys.argv[1:] if argv is None else argv)])
  demo = _demo_config().tokenizer
  # What every run shares from configs/demo.py, for the doc.
  model = {**{k: demo.model[k] for k in ("ch", "ch_mult", "num_res_blocks",
                                         "attn_resolutions", "z_channels")},
           "code_dim": demo.quantizer.code_dim, "learning_rate": demo.optim.learning_rate}
  result = {"command": command, "settings": settings, "model": model,
            "environment": environment(), "runs": {}}
  if os.path.exists(json_path):
    with open(json_path) as f:
      previous = json.load(f)
    mismatched = {k: (previous["settings"].get(k), settings[k]) for k in COMPARABLE_SETTINGS
                  if previous["settings"].get(k) != settings[k]}
    if mismatched and args.only:
      raise SystemExit(f"{json_path} was made with other settings {mismatched}: --only "
                       "would mix them in one table. Use another --output_dir.")
    if not mismatched and args.only:
      # A subset re-run joins the full study: keep its command and environment, and
      # note the re-run.
      result = previous
      result["partial_reruns"] = previous.get("partial_reruns", []) + [
          {"command": command, "runs": names, "date": environment()["date"]}]
    # Otherwise a full study starts afresh (old runs of other settings are dropped).

  lpips, vgg19 = _weights_exist("vgg16_lpips"), _weights_exist("vgg19")
  print(f"LPIPS weights: {'yes' if lpips else 'no'}; VGG-19 weights: "
        f"{'yes' if vgg19 else 'no (PCL on random VGG-19 features, marked †)'}", flush=True)
  workdir = args.workdir or tempfile.mkdtemp(prefix="codebook_study_")
  try:
    for index, name in enumerate(names):
      print(f"[{index + 1}/{len(names)}] {name}: {RUNS_BY_NAME[name].label}", flush=True)
      record = train_run(RUNS_BY_NAME[name], args, workdir, lpips=lpips, vgg19=vgg19)
      result["runs"][name] = record
      final = record["final"]
      print(f"  {name}: usage {100 * final['usage']:.1f}% perplexity "
            f"{final['perplexity']:.1f} dead {final['dead_codes']:.0f} psnr "
            f"{final['psnr']:.2f} | {record['wall_s']:.0f} s", flush=True)
      # Written after every run, so an interrupted study keeps what it trained.
      _write_json(json_path, result)
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)

  if args.verify_against:
    with open(args.verify_against) as f:
      reference_result = json.load(f)
    entries = [{"run": name, "against": args.verify_against, "date": environment()["date"],
                "verdict": compare_runs(result["runs"][name], reference_result["runs"][name])}
               for name in names if name in reference_result["runs"]]
    for entry in entries:
      print(f"determinism {entry['run']}: {entry['verdict']}", flush=True)
    result["determinism"] = result.get("determinism", []) + entries
    reference_dir = os.path.dirname(os.path.abspath(args.verify_against))
    if reference_dir != os.path.abspath(args.output_dir):
      # The verdict belongs with the reference study too, whose doc reports it.
      reference_result["determinism"] = reference_result.get("determinism", []) + entries
      _write_json(args.verify_against, reference_result)
      _render(reference_result, reference_dir)
  _write_json(json_path, result)
  _render(result, args.output_dir)
  return 0


def _write_json(path: str, payload: dict) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=1)
  os.replace(path + ".tmp", path)


def _render(result: dict, output_dir: str) -> None:
  suffix = "" if result["settings"]["data"] == "embedded" else f" ({result['settings']['data']})"
  plots = write_plots(result["runs"], output_dir, suffix)
  write_doc(os.path.join(output_dir, DOC_NAME), generated_section(result, plots))
  print(f"wrote {os.path.join(output_dir, DOC_NAME)}, {JSON_NAME} and {len(plots)} plots",
        flush=True)


if __name__ == "__main__":
  sys.exit(main())
