"""One command for a lent accelerator: quantizers, training steps and sampling, one JSON.

A script, not a test (see benchmarks/README.md, "accelerator.py"):

  python -m benchmarks.accelerator                  # on a GPU/TPU: at most --budget_s (420 s)
  benchmarks/accelerator.sh --also_copy_to "$OUT"   # the same, with XLA's memory settings
  python -m benchmarks.accelerator --smoke          # tiny sizes on a CPU, under 2 minutes
  python -m benchmarks.accelerator --check_build    # the full sizes compiled abstractly (CPU)

Sections, in this order, each in a child process of its own (a crash, an out-of-memory
abort or a hang in one is recorded in the JSON and the run goes on; a child that dies is
restarted for the items it did not reach):

  environment  devices, memory, versions, XLA flags, the peak table's entry for the device
  quantizer    benchmarks/quantizer.py's cells at accelerator sizes: N ∈ {16384, 65536},
               K ∈ {1024, 16384}, D = 256; VQ, Gumbel, Reg-VQ and FQ fwd+bwd ÷ the bare
               codebook matmul fwd+bwd
  train        benchmarks/train_step.py's jitted steps of configs/celebahq.py (the paper's
               tokenizer in its GAN phase, the AR and the diffusion prior, 24 × 1024), in
               bfloat16 and float32 compute: compile s, images/s, XLA GFLOP/step, TFLOP/s,
               MFU (÷ the device's peak, PEAKS below) and ÷ a bare matmul timed here
  sampling     benchmarks/sampling.py at the paper's size: AR with its KV cache vs
               diffusion at 25 of T = 100 steps, images/s (VQ-Diffusion's ~15× claim is
               about a GPU); then AR without the cache and diffusion at all 100 steps

Time: a global deadline (--budget_s) and a share of it per section (SHARES: at most
`cap` of the budget; earlier sections leave the later ones their `reserve`). A section
starts no item within --min_item_s of its deadline and its child is killed shortly after
the deadline; what was not reached reads "skipped (...)". The JSON is rewritten after every
item, so a run stopped from outside keeps what it measured:
benchmarks/results/accelerator_<device-kind>.json (`_smoke` with --smoke).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any
from typing import Callable

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1 << 30

# ---------------------------------------------------------------------------- peaks


@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """Dense peak TFLOP/s of one chip (no 2:4 sparsity: the datasheets' starred figures
  halved), per compute dtype as JAX runs it.

  bfloat16: bf16 tensor cores / MXU. float32: a float32 matmul under JAX's default
  precision, which is TF32 tensor cores on NVIDIA Ampere and later and one bfloat16
  pass on the TPU's MXU. float32_ieee: full float32 (CUDA cores; Precision.HIGHEST),
  None where the vendor gives none.
  """

  pattern: str          # regular expression on jax.devices()[0].device_kind, lower case
  name: str
  bfloat16: float
  float32: float
  float32_ieee: float | None
  source: str

  def record(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_NVIDIA_H100 = ("NVIDIA H100 Tensor Core GPU datasheet (H100 SXM / PCIe / NVL columns; "
                "nvidia.com/en-us/data-center/h100)")
_NVIDIA_H200 = "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200)"
# First match wins: the more specific patterns come first.
PEAKS: tuple[DevicePeak, ...] = (
    # H200 NVL: FP32 60, TF32 835*, BF16 1,671* TFLOPS (* with sparsity).
    DevicePeak(r"h200.*nvl", "NVIDIA H200 NVL", 835.5, 417.5, 60.0, _NVIDIA_H200),
    # H200 SXM ("NVIDIA H200"): FP32 67, TF32 989*, BF16 1,979* — the H100 SXM's rates.
    DevicePeak(r"h200", "NVIDIA H200 SXM", 989.5, 494.5, 67.0, _NVIDIA_H200),
    # H100 NVL: FP32 60, TF32 835*, BF16 1,671*.
    DevicePeak(r"h100.*nvl", "NVIDIA H100 NVL", 835.5, 417.5, 60.0, _NVIDIA_H100),
    # H100 PCIe: FP32 51, TF32 756*, BF16 1,513*.
    DevicePeak(r"h100.*pcie", "NVIDIA H100 PCIe", 756.5, 378.0, 51.0, _NVIDIA_H100),
    # H100 SXM5 ("NVIDIA H100 80GB HBM3"): FP32 67, TF32 989*, BF16 1,979*.
    DevicePeak(r"h100", "NVIDIA H100 SXM", 989.5, 494.5, 67.0, _NVIDIA_H100),
    # A100 SXM4 and PCIe, 40 and 80 GB: FP32 19.5, TF32 156 (312*), BF16 312 (624*).
    DevicePeak(r"a100", "NVIDIA A100", 312.0, 156.0, 19.5,
               "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100)"),
    # L4: FP32 30.3, TF32 120*, BF16 242*.
    DevicePeak(r"\bl4\b", "NVIDIA L4", 121.0, 60.0, 30.3,
               "NVIDIA L4 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/l4)"),
    # TPUs: Google Cloud's system-architecture pages give the bf16 peak per chip; a
    # float32 matmul at default precision is one bf16 MXU pass, so the same figure.
    # v6e (Trillium; device_kind "TPU v6 lite"): 918 bf16 TFLOPS.
    DevicePeak(r"tpu v6( lite|e)", "TPU v6e", 918.0, 918.0, None,
               "cloud.google.com/tpu/docs/v6e"),
    # v5e ("TPU v5 lite"): 197 bf16 TFLOPS.
    DevicePeak(r"tpu v5( lite|e)", "TPU v5e", 197.0, 197.0, None,
               "cloud.google.com/tpu/docs/v5e"),
    # v5p ("TPU v5" or "TPU v5p"): 459 bf16 TFLOPS.
    DevicePeak(r"tpu v5p?$", "TPU v5p", 459.0, 459.0, None, "cloud.google.com/tpu/docs/v5p"),
    # v4 ("TPU v4"): 275 bf16 TFLOPS.
    DevicePeak(r"tpu v4$", "TPU v4", 275.0, 275.0, None, "cloud.google.com/tpu/docs/v4"),
)


def peak_for(device_kind: str | None) -> DevicePeak | None:
  """The PEAKS entry for a `jax.Device.device_kind`, or None (MFU then reads null)."""
  kind = (device_kind or "").strip().lower()
  for peak in PEAKS:
    if re.search(peak.pattern, kind):
      return peak
  return None


def peak_tflops(peak: DevicePeak | None, dtype: str) -> float | None:
  """The peak for a compute dtype name ('bfloat16' | 'float32'), or None."""
  if peak is None:
    return None
  return {"bfloat16": peak.bfloat16, "float32": peak.float32}.get(dtype)


def mfu(flops_per_step: float | None, step_s: float | None, peak: float | None) -> float | None:
  """Achieved FLOP/s (XLA's FLOPs of one step ÷ its time) ÷ the peak in TFLOP/s."""
  if not flops_per_step or not step_s or not peak:
    return None
  return flops_per_step / step_s / (peak * 1e12)


def device_slug(device_kind: str | None) -> str:
  """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3' (the JSON's file name)."""
  slug = re.sub(r"[^a-z0-9]+", "-", (device_kind or "").lower()).strip("-")
  return slug or "unknown-device"


# ---------------------------------------------------------------------------- arguments

SECTION_ORDER = ("environment", "quantizer", "train", "sampling")
# Per section: (cap, reserve), as fractions of --budget_s. A section gets at most `cap`,
# and leaves the sections after it the sum of their `reserve`.
SHARES = {"environment": (0.15, 0.03), "quantizer": (0.22, 0.12), "train": (0.6, 0.3),
          "sampling": (0.35, 0.2), "selftest": (1.0, 0.0)}

DEFAULT_CELLS = "16x32x32:1024:256,16x32x32:16384:256,64x32x32:1024:256,64x32x32:16384:256"
SMOKE_CELLS = "2x8x8:64:32"
QUANTIZER_FUNCTIONS = "matmul_fwd,matmul_fwd_bwd,nearest_fwd,vq,gumbel,regvq,fq"
# Most wanted first: each stage once in bfloat16, then in float32 (the configs' dtype);
# within a dtype the cheapest compile first (the tokenizer, with its VGG losses and the
# GAN, compiles longest), so a slow compile costs the fewest results.
DEFAULT_TRAIN_ITEMS = ("matmul,ar/bfloat16,diffusion/bfloat16,tokenizer/bfloat16,"
                       "tokenizer/float32,ar/float32,diffusion/float32")
SMOKE_TRAIN_ITEMS = "matmul,ar/bfloat16,diffusion/bfloat16,tokenizer/bfloat16,tokenizer/float32"
DEFAULT_SAMPLING_ITEMS = "cache_vs_diffusion/float32,cache_vs_diffusion/bfloat16,extra/float32"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes everywhere (a CPU check of the whole run)")
  parser.add_argument("--check_build", action="store_true",
                      help="no timing: compile the train steps abstractly (no allocation), "
                           "lower the quantizer cells, eval_shape the samplers; in-process")
  parser.add_argument("--pretend_backend", default=None,
                      help="with --check_build: code that asks jax.default_backend() (the "
                           "quantizers' block sizes) sees this, e.g. gpu, so the CPU compiles "
                           "the accelerator's code path")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="global deadline in s (default 420; --smoke 300, a ceiling)")
  parser.add_argument("--sections", default=",".join(SECTION_ORDER))
  parser.add_argument("--min_item_s", type=float, default=None,
                      help="no item starts with less than this left (default 10; smoke 2)")
  parser.add_argument("--grace_s", type=float, default=5.0,
                      help="a child still running this long after its section's deadline "
                           "is killed")
  parser.add_argument("--inprocess", action="store_true",
                      help="run the sections in this process (no crash isolation, no hard "
                           "time limit; for tests and debugging)")
  parser.add_argument("--quantizer_cells", default=None,
                      help=f"BxHxW:K:D comma list (default {DEFAULT_CELLS})")
  parser.add_argument("--quantizer_functions", default=QUANTIZER_FUNCTIONS)
  parser.add_argument("--quantizer_reps", type=int, default=5)
  parser.add_argument("--train_items", default=None,
                      help=f"comma list of matmul and stage/dtype (default {DEFAULT_TRAIN_ITEMS})")
  parser.add_argument("--tokenizer_batch", type=int, default=8,
                      help="the tokenizer's batch on one device (the paper's 32 needs ~110 GiB "
                           "of activations in float32; halved again if it does not fit)")
  parser.add_argument("--prior_batch", type=int, default=32, help="the priors' batch (paper: 32)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per train item")
  parser.add_argument("--matmul_size", type=int, default=None,
                      help="n of the reference [n, n] matmul (default 16384; smoke 256)")
  parser.add_argument("--sampling_items", default=DEFAULT_SAMPLING_ITEMS,
                      help="comma list of cache_vs_diffusion/<dtype> (AR cache, diffusion at "
                           "--diffusion_steps) and extra/<dtype> (AR recompute, diffusion at T)")
  parser.add_argument("--sampling_batch", type=int, default=32)
  parser.add_argument("--sampling_rounds", type=int, default=3)
  parser.add_argument("--diffusion_steps", type=int, default=25)
  parser.add_argument("--selftest_items", default="ok,raise,exit,ok2",
                      help="for tests: items of the 'selftest' section (ok*, raise, exit, "
                           "hang, sleep<s>)")
  parser.add_argument("--commit", default=None,
                      help="the git commit under test, recorded as given (a device's copy of "
                           "the working tree may have no .git)")
  parser.add_argument("--out", default=None,
                      help="JSON path (default benchmarks/results/accelerator_<device>.json)")
  parser.add_argument("--also_copy_to", default=None,
                      help="a folder that gets a copy of the JSON after every update")
  # Internal: how the parent starts a section's child.
  parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_items", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_part", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--_deadline", type=float, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if args.budget_s is None:
    args.budget_s = 300.0 if args.smoke else 420.0
  if args.min_item_s is None:
    args.min_item_s = 2.0 if args.smoke else 10.0
  if args.quantizer_cells is None:
    args.quantizer_cells = SMOKE_CELLS if args.smoke else DEFAULT_CELLS
  if args.train_items is None:
    args.train_items = SMOKE_TRAIN_ITEMS if args.smoke else DEFAULT_TRAIN_ITEMS
  if args.matmul_size is None:
    args.matmul_size = 256 if args.smoke else 16384
  if args.check_build:
    args.inprocess = True
  if args.pretend_backend and not args.check_build:
    parser.error("--pretend_backend only goes with --check_build")
  sections = [s for s in args.sections.split(",") if s]
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
  args.sections = sections
  return args


def _log(message: str) -> None:
  print(f"[accelerator {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _items(text: str) -> list[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------------------- environment


def _nvidia_smi() -> str | None:
  if shutil.which("nvidia-smi") is None:
    return None
  try:
    return subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,"
         "power.limit", "--format=csv"], capture_output=True, text=True, timeout=15).stdout
  except (OSError, subprocess.SubprocessError) as error:
    return f"failed: {error}"


def _device_bytes_limit() -> int | None:
  import jax  # pylint: disable=import-outside-toplevel
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001  (not every backend has memory stats)
    return None
  return stats.get("bytes_limit")


def environment_item(args, item: str, ctx: dict) -> dict:
  """The device and what runs on it. Every part but the device itself is optional: a
  field that cannot be read (another JAX version, no git in the device's copy) is
  recorded under `errors` instead of failing the item, which names the JSON and the
  peak."""
  del item, ctx
  import jax  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  env: dict[str, Any] = {"backend": jax.default_backend(), "platform": device.platform,
                         "device_kind": device.device_kind,
                         "device": str(device), "devices": [str(d) for d in jax.devices()],
                         "jax": jax.__version__, "errors": {}}

  def optional(name, read):
    try:
      value = read()
    except Exception as error:  # noqa: BLE001
      env["errors"][name] = f"{type(error).__name__}: {error}"
      return
    if isinstance(value, dict) and name == "common":
      env.update({k: v for k, v in value.items() if k not in env or k == "git"})
    else:
      env[name] = value

  def common():
    from benchmarks.common import environment  # pylint: disable=import-outside-toplevel
    return environment()

  optional("common", common)
  optional("memory_stats", device.memory_stats)
  optional("jax_default_matmul_precision",
           lambda: str(jax.config.jax_default_matmul_precision))
  optional("env", lambda: {k: os.environ.get(k) for k in (
      "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
      "XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH")})
  optional("nvidia_smi", _nvidia_smi)
  if args.commit:
    env["commit_given"] = args.commit
  return env


# ---------------------------------------------------------------------------- quantizer


def parse_cell(item: str) -> tuple[tuple[int, int, int], int, int]:
  """'16x32x32:1024:256' → ((16, 32, 32), 1024, 256)."""
  grid, codes, dim = item.split(":")
  shape = tuple(int(v) for v in grid.lower().split("x"))
  if len(shape) != 3:
    raise ValueError(f"quantizer cell {item!r}: use BxHxW:K:D")
  return shape, int(codes), int(dim)


def quantizer_item(args, item: str, ctx: dict) -> dict:
  del ctx
  from benchmarks import quantizer  # pylint: disable=import-outside-toplevel
  shape, num_codes, dim = parse_cell(item)
  functions = tuple(_items(args.quantizer_functions))
  if args.check_build:
    # Compiles every function for its abstract inputs; a limit of 0 bytes skips making
    # the inputs (a [65536, 16384] G is 4 GiB), so nothing is allocated or timed.
    benches, release = quantizer.jax_benches(shape, num_codes, dim, 0, 0, _log, functions)
    release()
    failed = any(b.status.startswith("failed") for b in benches)
    functions_built = {b.name: {"status": b.status, "compile_s": b.compile_s,
                                "peak_bytes": b.peak_bytes} for b in benches}
    return {"status": "failed" if failed else "built", "functions": functions_built}
  limit = _device_bytes_limit()
  limit_bytes = int(0.4 * limit) if limit else 6 * GIB
  cell = quantizer.measure_cell(
      shape, num_codes, dim, functions=functions, reps=args.quantizer_reps,
      min_sample_ms=20.0, max_gflop=1e12, limit_bytes=limit_bytes,
      torch_note="skipped (accelerator run: vector-quantize-pytorch is compared on a CPU)",
      log=_log)
  cell.pop("_benches", None)
  return cell


def finalize_quantizer(section: dict, peak: DevicePeak | None) -> None:
  rows = ["| N | K | D | matmul fwd+bwd ms | TFLOP/s | MFU (f32) | nearest | VQ | Gumbel "
          "| Reg-VQ | FQ |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for item in section["items"].values():
    function = (item.get("functions") or {}).get("matmul_fwd_bwd") or {}
    median_ms = function.get("median_ms")
    if item.get("status") != "ok" or not median_ms:
      continue
    flops = 6 * item["N"] * item["K"] * item["D"]
    item["matmul_fwd_bwd_tflops"] = flops / (median_ms / 1e3) / 1e12
    item["matmul_fwd_bwd_mfu"] = mfu(flops, median_ms / 1e3, peak_tflops(peak, "float32"))
    ratios = item.get("ratios") or {}
    cols = [ratios.get(name) for name in ("nearest/matmul", "vq/matmul", "gumbel/matmul",
                                          "regvq/matmul", "fq/matmul")]
    rows.append(f"| {item['N']} | {item['K']} | {item['D']} | {median_ms:.3f} | "
                f"{item['matmul_fwd_bwd_tflops']:.1f} | {_fmt(item['matmul_fwd_bwd_mfu'])} | "
                + " | ".join(_fmt(v) for v in cols) + " |")
  section["table_markdown"] = "\n".join(rows)


# ---------------------------------------------------------------------------- train


def smoke_train_config():
  """configs/demo.py made tinier still (tests/tiny_configs.py's sizes): 16 px images,
  4×4 tokens, 1-block priors; the GAN on at the last step, as in the demo."""
  from benchmarks import train_step  # pylint: disable=import-outside-toplevel
  config = train_step.run_config("demo", 1)
  config.data.image_size = 16
  config.tokenizer.model.update(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                                attn_resolutions=(4,), z_channels=32)
  config.tokenizer.quantizer.update(num_codes=16, code_dim=8)
  config.tokenizer.loss.update(disc_layers=2, disc_channels=16)
  config.tokenizer.train.batch_size = 2
  for prior in (config.ar, config.diffusion):
    prior.model.update(width=32, depth=1, num_heads=2)
    prior.train.batch_size = 4
  return config


def train_config(args, stage: str, dtype: str, batch: int | None = None):
  """The config of one train item: configs/celebahq.py (smoke: smoke_train_config) on one
  device with random pretrained networks, `stage`'s batch and compute dtype set."""
  from benchmarks import train_step  # pylint: disable=import-outside-toplevel
  from rvq_jax.tools import aot_check  # pylint: disable=import-outside-toplevel
  if args.smoke:
    config = smoke_train_config()
  else:
    config = train_step.run_config("paper", args.prior_batch)
    config.tokenizer.train.batch_size = args.tokenizer_batch
  if batch is not None:
    config[stage].train.batch_size = batch
  return aot_check.with_settings(config, stage, dtype=dtype)


def _out_of_memory(error: Exception) -> bool:
  text = str(error).lower()
  return "resource_exhausted" in text or "out of memory" in text


def train_item(args, item: str, ctx: dict) -> dict:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from benchmarks import train_step  # pylint: disable=import-outside-toplevel
  if item == "matmul":
    if args.check_build:
      return {"status": "skipped (--check_build)"}
    n = args.matmul_size
    return {"n": n, "bfloat16_flops_per_s": train_step.matmul_flops_per_s(n, dtype=jnp.bfloat16),
            "float32_flops_per_s": train_step.matmul_flops_per_s(n, dtype=jnp.float32)}
  stage, _, dtype = item.partition("/")
  if stage not in ("tokenizer", "ar", "diffusion") or dtype not in ("bfloat16", "float32"):
    raise ValueError(f"train item {item!r}: use matmul or <tokenizer|ar|diffusion>/"
                     "<bfloat16|float32>")
  config = train_config(args, stage, dtype)
  batch = config[stage].train.batch_size
  last_step = config[stage].train.num_steps - 1
  if args.check_build:
    from rvq_jax.tools import aot_check  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    reports = aot_check.check(config, stage_name=stage, steps=[last_step])
    return {"status": "built", "stage": stage, "dtype": dtype, "batch": batch,
            "compile_s": time.perf_counter() - start,
            "reports": [dataclasses.asdict(r) for r in reports]}
  limit = _device_bytes_limit()
  max_bytes = int(0.92 * limit) if limit else None
  attempts = []
  while True:
    try:
      row = train_step.measure_stage(config, stage, args.steps, max_bytes=max_bytes)
      break
    except Exception as error:  # noqa: BLE001
      fits = isinstance(error, train_step.DoesNotFit)
      if not (fits or _out_of_memory(error)) or batch <= 1:
        raise
      attempts.append({"batch": batch, "error": f"{type(error).__name__}: {error}"[:500]})
      batch //= 2
      _log(f"train {item}: {attempts[-1]['error'][:120]}; retrying at batch {batch}")
      if time.time() > ctx.get("deadline", float("inf")) - args.min_item_s:
        raise RuntimeError(f"no time left to retry at batch {batch}") from error
      config = train_config(args, stage, dtype, batch)
  row.update(dtype=dtype, config="smoke" if args.smoke else "paper",
             smaller_batch_attempts=attempts)
  return row


def finalize_train(section: dict, peak: DevicePeak | None) -> None:
  items = section["items"]
  matmul = items.get("matmul") if (items.get("matmul") or {}).get("status") == "ok" else None
  if matmul:
    for dtype in ("bfloat16", "float32"):
      achieved = matmul[f"{dtype}_flops_per_s"]
      matmul[f"{dtype}_tflops"] = achieved / 1e12
      matmul[f"{dtype}_mfu"] = mfu(achieved, 1.0, peak_tflops(peak, dtype))
  rows = ["| stage | dtype | batch | params | compile s | s / step | images/s | GFLOP / step "
          "| TFLOP/s | MFU | ÷ matmul | peak GiB |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, item in items.items():
    if item.get("status") == "built":  # --check_build: XLA's numbers for this machine.
      report = (item.get("reports") or [{}])[0]
      rows.append(f"| {item['stage']} | {item['dtype']} | {item['batch']} | — | "
                  f"{item['compile_s']:.1f} (built) | — | — | "
                  f"{report.get('flops', 0) / 1e9:.0f} | — | — | — | "
                  f"{report.get('total_bytes', 0) / GIB:.2f} |")
    if name == "matmul" or item.get("status") != "ok":
      continue
    dtype = item["dtype"]
    item["achieved_tflops"] = item["achieved_flops_per_s"] / 1e12
    item["peak_tflops"] = peak_tflops(peak, dtype)
    item["mfu"] = mfu(item["gflop_per_step"] * 1e9, item["step_s"], item["peak_tflops"])
    item["matmul_ratio"] = (item["achieved_flops_per_s"] / matmul[f"{dtype}_flops_per_s"]
                            if matmul else None)
    memory = item.get("memory") or {}
    peak_gib = memory.get("total_bytes", 0) / GIB if memory else None
    rows.append(f"| {item['stage']} | {dtype} | {item['batch']} | "
                f"{item['parameters'] / 1e6:.1f}M | {item['compile_s']:.1f} | "
                f"{item['step_s']:.4f} | {item['images_per_s']:.2f} | "
                f"{item['gflop_per_step']:.0f} | {item['achieved_tflops']:.1f} | "
                f"{_fmt(item['mfu'])} | {_fmt(item['matmul_ratio'])} | {_fmt(peak_gib)} |")
  section["table_markdown"] = "\n".join(rows)
  if matmul:
    section["matmul_markdown"] = (
        f"bare [{matmul['n']}, {matmul['n']}] matmul: bfloat16 "
        f"{matmul['bfloat16_tflops']:.1f} TFLOP/s (MFU {_fmt(matmul['bfloat16_mfu'])}), "
        f"float32 {matmul['float32_tflops']:.1f} TFLOP/s (MFU {_fmt(matmul['float32_mfu'])})")


# ---------------------------------------------------------------------------- sampling


def sampling_namespace(args, item: str) -> argparse.Namespace:
  """benchmarks/sampling.py's arguments for a sampling item: the paper's priors (width
  1024, depth 24, 16 heads, 16×16 tokens, K = 1024, T = 100; smoke: sampling's --quick)."""
  from benchmarks import sampling  # pylint: disable=import-outside-toplevel
  kind, _, dtype = item.partition("/")
  if kind not in ("cache_vs_diffusion", "extra") or dtype not in ("bfloat16", "float32"):
    raise ValueError(f"sampling item {item!r}: use cache_vs_diffusion/<dtype> or "
                     "extra/<dtype>, dtype bfloat16 or float32")
  ns = sampling.parse_args(["--quick"] if args.smoke else ["--paper"])
  if not args.smoke:
    ns.batch, ns.rounds = args.sampling_batch, args.sampling_rounds
  steps = min(args.diffusion_steps, ns.timesteps)
  if kind == "cache_vs_diffusion":
    ns.samplers, ns.diffusion_steps = f"ar cache,diffusion {steps} steps", str(steps)
  else:
    ns.samplers = f"ar recompute,diffusion {ns.timesteps} steps"
    ns.diffusion_steps = str(ns.timesteps)
  ns.dtype, ns.out = dtype, None
  return ns


def sampling_item(args, item: str, ctx: dict) -> dict:
  del ctx
  from benchmarks import sampling  # pylint: disable=import-outside-toplevel
  ns = sampling_namespace(args, item)
  if args.check_build:
    import jax  # pylint: disable=import-outside-toplevel
    start = time.perf_counter()
    shapes = jax.eval_shape(
        lambda: {name: fn() for name, fn in sampling.build_samplers(ns, blocking=False)[0]
                 .items()})
    return {"status": "built", "seconds": time.perf_counter() - start,
            "shapes": {name: list(s.shape) for name, s in shapes.items()}}
  result = sampling.measure(ns, log=_log)
  result["dtype"] = ns.dtype
  return result


def finalize_sampling(section: dict, peak: DevicePeak | None) -> None:
  del peak
  rows = ["| dtype | sampler | s / batch | images/s | compile s |", "|---|---|---:|---:|---:|"]
  medians: dict[tuple[str, str], float] = {}
  for item in section["items"].values():
    if item.get("status") != "ok":
      continue
    for row in item["rows"]:
      medians[(item["dtype"], row["sampler"])] = row["median_s"]
      rows.append(f"| {item['dtype']} | {row['sampler']} | {row['median_s']:.3f} | "
                  f"{row['images_per_s']:.2f} | {row['compile_s']:.1f} |")
  ratios = {}
  for item in section["items"].values():
    if item.get("status") == "ok":
      for name, value in item["ratios"].items():
        ratios[f"{item['dtype']}: {name}"] = value
  for dtype in ("float32", "bfloat16"):
    cache, recompute = medians.get((dtype, "ar cache")), medians.get((dtype, "ar recompute"))
    if cache and recompute:  # From two items: a ratio of medians, not of paired rounds.
      ratios[f"{dtype}: ar_cache_speedup (ratio of medians)"] = recompute / cache
  section["ratios"] = ratios
  section["table_markdown"] = "\n".join(rows) + "".join(
      ["\n"] + [f"\n* {name}: {value:.2f}" for name, value in ratios.items()] if ratios else [])


# ---------------------------------------------------------------------------- selftest


def selftest_item(args, item: str, ctx: dict) -> dict:
  """For tests of the run's machinery: 'ok…' returns, 'raise' raises, 'exit' kills its
  process, 'hang' sleeps an hour, 'sleep<s>' sleeps s seconds."""
  del args, ctx
  if item.startswith("ok"):
    return {"value": item}
  if item == "raise":
    raise RuntimeError("selftest: a failing item")
  if item == "exit":
    sys.stdout.flush()
    os._exit(3)
  if item == "hang":
    time.sleep(3600)
  if item.startswith("sleep"):
    time.sleep(float(item[5:]))
    return {"slept": float(item[5:])}
  raise ValueError(f"selftest item {item!r}")


# ---------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class Section:
  items: Callable[[argparse.Namespace], list[str]]
  run_item: Callable[[argparse.Namespace, str, dict], dict]
  finalize: Callable[[dict, DevicePeak | None], None] | None = None


SECTIONS: dict[str, Section] = {
    "environment": Section(lambda args: ["environment"], environment_item),
    "quantizer": Section(lambda args: _items(args.quantizer_cells), quantizer_item,
                         finalize_quantizer),
    "train": Section(lambda args: _items(args.train_items), train_item, finalize_train),
    "sampling": Section(lambda args: _items(args.sampling_items), sampling_item,
                        finalize_sampling),
    "selftest": Section(lambda args: _items(args.selftest_items), selftest_item),
}


def _write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=1, default=str)
    f.write("\n")
  os.replace(path + ".tmp", path)


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def run_items(args, name: str, items: list[str], deadline: float,
              on_update: Callable[[dict[str, dict]], None]) -> dict[str, dict]:
  """Runs a section's items in this process, in order: each is recorded as 'running'
  before it starts and with its result (status 'ok' unless it says otherwise) or its
  error (status 'failed') after; `on_update(results)` is called after each change. No
  item starts within --min_item_s of `deadline`."""
  section = SECTIONS[name]
  results: dict[str, dict] = {}
  ctx: dict = {"deadline": deadline}
  for item in items:
    if deadline - time.time() < args.min_item_s:
      results[item] = {"status": "skipped (section budget spent)"}
      on_update(results)
      continue
    results[item] = {"status": "running", "started": time.time()}
    on_update(results)
    _log(f"{name}: {item}")
    start = time.perf_counter()
    try:
      result = dict(section.run_item(args, item, ctx) or {})
      result.setdefault("status", "ok")
    except Exception as error:  # noqa: BLE001  (recorded; the run goes on)
      result = {"status": "failed", "error": f"{type(error).__name__}: {error}"[:4000],
                "traceback": traceback.format_exc()[-6000:]}
      _log(f"{name}: {item} failed: {result['error'][:300]}")
    result["wall_s"] = time.perf_counter() - start
    results[item] = result
    on_update(results)
  return results


def child_main(args) -> int:
  """A section's child: runs `--_items` and keeps `--_part` up to date."""
  items = json.loads(args._items)
  run_items(args, args._child, items, args._deadline,
            lambda results: _write_json(args._part, {"items": results}))
  return 0


_CHILDREN: list[subprocess.Popen] = []  # The section child running now, if any.
CHILD_PIDS: list[int] = []  # Every child started, for the JSON (a log names them).


def _end_children_and_exit(signum, frame) -> None:
  """SIGTERM / SIGINT / SIGHUP to the parent: end the running child, then exit (the JSON
  written so far stays)."""
  del frame
  for proc in list(_CHILDREN):
    _kill(proc)
  _log(f"signal {signum}: ended the running section's child; exiting")
  sys.exit(128 + signum)


def _kill(proc: subprocess.Popen) -> None:
  """Ends the child we started and its own children (its process group)."""
  for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
    try:
      os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
      return
    try:
      proc.wait(timeout=wait)
      return
    except subprocess.TimeoutExpired:
      continue


def run_section_children(args, name: str, items: list[str], deadline: float,
                         on_update: Callable[[dict[str, dict]], None]) -> dict[str, dict]:
  """Runs a section's items in child processes: one child for all of them, and another
  for the items after one that killed its child. A child still running `--grace_s` after
  the deadline is killed; its running item reads 'timed out', the rest are skipped."""
  results: dict[str, dict] = {}
  workdir = tempfile.mkdtemp(prefix=f"accelerator_{name}_")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO, env.get("PYTHONPATH")]))
  env.setdefault("PYTHONUNBUFFERED", "1")
  try:
    for attempt in range(len(items)):
      pending = [item for item in items if item not in results]
      if not pending or deadline - time.time() < args.min_item_s:
        break
      part = os.path.join(workdir, f"part{attempt}.json")
      command = [sys.executable, "-m", "benchmarks.accelerator", *args.argv,
                 "--_child", name, "--_items", json.dumps(pending), "--_part", part,
                 "--_deadline", repr(deadline)]
      # Its own process group (killpg ends it and what it started) in this session: a
      # supervisor that ends this command's session ends the child too.
      proc = subprocess.Popen(command, cwd=_REPO, env=env, process_group=0)
      _CHILDREN.append(proc)
      _log(f"{name}: child {proc.pid} for {len(pending)} item(s)")
      CHILD_PIDS.append(proc.pid)
      seen, timed_out = None, False
      while True:
        try:
          returncode = proc.wait(timeout=0.5)
          break
        except subprocess.TimeoutExpired:
          pass
        stamp = os.path.getmtime(part) if os.path.exists(part) else None
        if stamp != seen:
          seen = stamp
          results.update((_read_json(part) or {}).get("items", {}))
          on_update(results)
        if time.time() > deadline + args.grace_s:
          _log(f"{name}: past the section's deadline; ending its child")
          _kill(proc)
          returncode, timed_out = proc.returncode, True
          break
      _CHILDREN.remove(proc)
      results.update((_read_json(part) or {}).get("items", {}))
      for item, result in results.items():
        if result.get("status") == "running":
          elapsed = time.time() - result.get("started", time.time())
          results[item] = (
              {"status": "timed out", "error": f"killed at the section's deadline after "
               f"{elapsed:.0f} s", "wall_s": elapsed} if timed_out else
              {"status": "crashed", "error": f"its process ended with code {returncode} "
               "while running it (see the log)", "wall_s": elapsed})
      if returncode != 0 and not timed_out and not any(
          r.get("status") == "crashed" for r in results.values()):
        # The child died before it started an item (an import error, say).
        first = next((item for item in pending if item not in results), None)
        if first is not None:
          results[first] = {"status": "crashed",
                            "error": f"its process ended with code {returncode} before "
                                     "running it (see the log)"}
      on_update(results)
      if timed_out:
        break
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return results


def section_budget(name: str, remaining_sections: list[str], budget_s: float,
                   remaining_s: float) -> float:
  """Seconds for section `name`: at most its cap, leaving the sections after it (the
  rest of `remaining_sections`) their reserve, within the time that is left."""
  cap = SHARES.get(name, (1.0, 0.0))[0] * budget_s
  later = remaining_sections[remaining_sections.index(name) + 1:]
  reserve = sum(SHARES.get(s, (0.0, 0.0))[1] for s in later) * budget_s
  return max(0.0, min(cap, remaining_s - reserve))


def _fmt(value) -> str:
  return "—" if value is None else f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def summary_markdown(report: dict) -> str:
  env = report.get("environment") or {}
  lines = [f"# Accelerator run — {env.get('device_kind', 'unknown device')}",
           "", f"jax {env.get('jax')}, backend {env.get('backend')}, commit "
           f"{(env.get('git') or {}).get('commit') or env.get('commit_given')}; peak: "
           + (json.dumps(report["peak"]) if report.get("peak") else "unknown (MFU null)"),
           f"wall {report.get('wall_s', 0):.0f} s of a {report['settings']['budget_s']:.0f} s "
           "budget"]
  for name, section in report["sections"].items():
    lines += ["", f"## {name}: {section['status']} ({section.get('wall_s', 0):.0f} s of "
              f"{section.get('budget_s', 0):.0f} s)"]
    for item, result in section.get("items", {}).items():
      if result.get("status") not in ("ok", "built"):
        lines.append(f"* {item}: {result.get('status')} {result.get('error', '')[:200]}")
    for key in ("matmul_markdown", "table_markdown"):
      text = (section.get(key) or "").strip()
      if len(text.splitlines()) > 2 or (text and not text.startswith("|")):  # No bare header.
        lines += ["", text]
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args._child:
    return child_main(args)
  if args.pretend_backend:
    import jax  # pylint: disable=import-outside-toplevel
    jax.default_backend = lambda: args.pretend_backend
  previous_handlers = {}
  if not args.inprocess:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
      previous_handlers[signum] = signal.signal(signum, _end_children_and_exit)
  try:
    return _run(args)
  finally:
    for signum, handler in previous_handlers.items():
      signal.signal(signum, handler)


def _run(args) -> int:
  """main's body: the sections in order under the deadline, the JSON after each item."""
  start = time.time()
  deadline = start + args.budget_s
  mode = "check_build" if args.check_build else "smoke" if args.smoke else "full"
  report: dict[str, Any] = {
      "benchmark": "rvq_jax on an accelerator: quantizers, training steps, sampling "
                   "(issue 14 item 7)",
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "command": " ".join(["python -m benchmarks.accelerator", *args.argv]),
      "mode": mode,
      "settings": {k: v for k, v in vars(args).items()
                   if not k.startswith("_") and k != "argv"},
      "environment": None, "peak": None, "sections": {}, "complete": False, "notes": [],
      "definitions": {
          "MFU": "XLA's FLOPs of the compiled step (cost_analysis) ÷ median step s ÷ the "
                 "device's dense peak for the compute dtype (PEAKS in the script: float32 "
                 "means JAX's default precision, TF32 on NVIDIA GPUs, one bf16 pass on TPUs)",
          "matmul_ratio": "achieved FLOP/s ÷ a bare [n, n] matmul's in the same dtype, timed "
                          "in the same run",
          "statuses": "ok | failed (raised; error and traceback kept) | crashed (its process "
                      "died) | timed out (killed at the section's deadline) | skipped (...)",
      },
  }
  state = {"out": args.out}

  def write() -> None:
    report["wall_s"] = time.time() - start
    report["child_pids"] = list(CHILD_PIDS)
    if state["out"] is None:
      return
    _write_json(state["out"], report)
    if args.also_copy_to:
      _write_json(os.path.join(args.also_copy_to, os.path.basename(state["out"])), report)

  for index, name in enumerate(args.sections):
    remaining = deadline - time.time()
    budget = section_budget(name, args.sections[index:], args.budget_s, remaining)
    items = SECTIONS[name].items(args)
    record = {"status": "running", "budget_s": budget, "items": {}}
    report["sections"][name] = record
    if budget < args.min_item_s:
      record.update(status="skipped (deadline)", items={
          item: {"status": "skipped (deadline)"} for item in items})
      _log(f"{name}: skipped, {remaining:.0f} s left")
      write()
      continue
    _log(f"{name}: {len(items)} item(s), {budget:.0f} s")
    section_start = time.time()

    def on_update(results, record=record):
      record["items"] = dict(results)
      write()

    runner = run_items if args.inprocess else run_section_children
    results = runner(args, name, items, section_start + budget, on_update)
    for item in items:
      results.setdefault(item, {"status": "skipped (section budget spent)"})
    record["items"] = {item: results[item] for item in items}
    record["wall_s"] = time.time() - section_start
    statuses = [r.get("status") for r in record["items"].values()]
    record["status"] = ("ok" if all(s in ("ok", "built") for s in statuses) else
                        "failed" if not any(s in ("ok", "built") for s in statuses) else "partial")
    if name == "environment":
      env = record["items"]["environment"]
      if env.get("status") == "ok":
        report["environment"] = {k: v for k, v in env.items() if k not in ("status", "wall_s")}
      kind = _device_kind(report, args)
      peak = peak_for(kind)
      report["peak"] = peak.record() if peak else None
      if peak is None:
        report["peak_note"] = (f"device kind {kind!r} is not in PEAKS: MFU is null; "
                               "the ratio to the bare matmul still holds")
      if mode == "full" and (report["environment"] or {}).get("backend") in ("cpu", None):
        report["notes"].append("JAX found no accelerator (backend "
                               f"{(report['environment'] or {}).get('backend')}): the full "
                               "sizes will not finish here; see the environment section")
        _log(report["notes"][-1])
    if SECTIONS[name].finalize is not None:
      try:
        SECTIONS[name].finalize(record, peak_for(_device_kind(report, args)))
      except Exception as error:  # noqa: BLE001
        record["finalize_error"] = f"{type(error).__name__}: {error}"
    if state["out"] is None:
      suffix = {"full": "", "smoke": "_smoke", "check_build": "_check_build"}[mode]
      kind = _device_kind(report, args)
      state["out"] = os.path.join(_REPO, "benchmarks", "results",
                                  f"accelerator_{device_slug(kind)}{suffix}.json")
    write()
  report["complete"] = all(s["status"] == "ok" for s in report["sections"].values())
  report["summary_markdown"] = summary_markdown(report)
  write()
  print(report["summary_markdown"])
  print(f"\nJSON: {state['out']}  ({report['wall_s']:.0f} s)")
  return 0


def _device_kind(report: dict, args) -> str | None:
  """The environment section's device kind; without that section, in-process runs ask
  JAX (a parent that starts children never initializes the accelerator itself)."""
  kind = (report.get("environment") or {}).get("device_kind")
  if kind is None and args.inprocess and "environment" not in args.sections:
    try:
      import jax  # pylint: disable=import-outside-toplevel
      kind = jax.devices()[0].device_kind
    except Exception:  # noqa: BLE001
      kind = None
  return kind


if __name__ == "__main__":
  sys.exit(main())
