"""Quantizer speed and memory against the bare codebook matmul (and vector-quantize-pytorch).

A script, not a test: `python -m benchmarks.quantizer` (see benchmarks/README.md).

For every cell (N tokens, K codes, D features) it times, with jitted functions compiled
ahead of time (compile excluded and reported separately), interleaved repetitions and
medians:

  matmul fwd        z @ C.T                               [N, D] x [K, D] -> [N, K]
  matmul fwd+bwd    value_and_grad of sum(z @ C.T * G) in (z, C), G a fixed [N, K]
  nearest fwd       ops.nearest_code(z, C)
  VQ, Gumbel, Reg-VQ, FQ fwd+bwd
                    value_and_grad of sum(out.quantized * W) + out.total_loss in
                    (params, z), training mode; Gumbel/Reg-VQ use projection logits
                    with in_features = D (a D -> K linear map); FQ is M = 2 plain VQ
                    sub-quantizers of width D each (input width 2D).
  torch VQ fwd+bwd  vector_quantize_pytorch.VectorQuantize, the configuration closest
                    to our default VectorQuantizer (see TORCH_VQ_KWARGS), if installed.

and reports ratios: nearest fwd / matmul fwd, quantizer fwd+bwd / matmul fwd+bwd, and our
VQ / torch VQ, each the median over rounds of the ratio within a round. Peak memory: for
JAX the compiled executable's memory_analysis() (argument + output + temp - alias bytes,
i.e. what XLA allocates for one call); for torch the rise of the process's resident-set
high-water mark (VmHWM) during one call plus the bytes of its already-resident inputs and
parameters.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import environment
from benchmarks.common import usable_cores
from rvq_jax import ops
from rvq_jax.models.tokenizer.quantizers import build_quantizer
from rvq_jax.models.tokenizer.quantizers import registry

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MIB = 1 << 20
GIB = 1 << 30

# Targets per cell.
NEAREST_TARGET = 1.3   # nearest_code fwd <= 1.3x the bare matmul fwd
REGVQ_TARGET = 2.0     # Reg-VQ fwd+bwd <= 2x the bare matmul fwd+bwd

# Token grids: N = B * H * W, shaped [B, H, W, D] (Reg-VQ's mask is per image, over H*W).
DEFAULT_TOKENS = ((16, 16, 16), (64, 32, 32))
DEFAULT_CODES = (1024, 16384, 262144)
DEFAULT_DIMS = (8, 256)
QUICK_TOKENS = ((2, 8, 8),)
QUICK_CODES = (64, 512)
QUICK_DIMS = (8, 32)

# Closest to our default VectorQuantizer (codebook learned by gradient, no EMA, plain
# straight-through, nearest code by Euclidean distance, no k-means init, no dead-code
# replacement). vector-quantize-pytorch's defaults differ: EMA codebook (decay 0.8) and,
# since 1.20, the rotation trick instead of the straight-through estimator. Its commitment
# loss with a learnable codebook is mse(quantize, x) without detaching either side, i.e.
# our codebook + commitment terms with beta = 1: the same work as our beta = 0.25.
TORCH_VQ_KWARGS = dict(
    kmeans_init=False,
    ema_update=False,
    learnable_codebook=True,
    rotation_trick=False,
    threshold_ema_dead_code=0,
    commitment_weight=1.0,
)

# Names of the timed functions, in table order.
JAX_FUNCTIONS = ("matmul_fwd", "matmul_fwd_bwd", "nearest_fwd", "vq", "gumbel", "regvq", "fq")
# The quantizer functions: name -> (kind, options that differ from the kind's defaults).
QUANTIZER_FUNCTIONS = {
    "vq": ("vq", {}),
    "gumbel": ("gumbel", {}),
    "regvq": ("regvq", {}),
    "fq": ("fq", {}),
    "gumbel_rbg": ("gumbel", {"prng": "rbg"}),
    "regvq_rbg": ("regvq", {"prng": "rbg"}),
    "gumbel_unsafe_rbg": ("gumbel", {"prng": "unsafe_rbg"}),
    "regvq_unsafe_rbg": ("regvq", {"prng": "unsafe_rbg"}),
}
# Functions timed only when asked for (--functions): the PRNG option of Gumbel-VQ and
# Reg-VQ, and nearest_code's approximate search (approx_min_k).
OPTION_FUNCTIONS = ("gumbel_rbg", "regvq_rbg", "gumbel_unsafe_rbg", "regvq_unsafe_rbg",
                    "nearest_approx")
APPROX_RECALL = 0.95
TORCH_FUNCTION = "torch_vq"
RATIO_OF = {  # ratio name -> (numerator, denominator)
    "nearest/matmul": ("nearest_fwd", "matmul_fwd"),
    "vq/matmul": ("vq", "matmul_fwd_bwd"),
    "gumbel/matmul": ("gumbel", "matmul_fwd_bwd"),
    "regvq/matmul": ("regvq", "matmul_fwd_bwd"),
    "fq/matmul": ("fq", "matmul_fwd_bwd"),
    "vq/torch_vq": ("vq", TORCH_FUNCTION),
    # Options, timed with --functions (see OPTION_FUNCTIONS).
    "gumbel_rbg/matmul": ("gumbel_rbg", "matmul_fwd_bwd"),
    "regvq_rbg/matmul": ("regvq_rbg", "matmul_fwd_bwd"),
    "gumbel_unsafe_rbg/matmul": ("gumbel_unsafe_rbg", "matmul_fwd_bwd"),
    "regvq_unsafe_rbg/matmul": ("regvq_unsafe_rbg", "matmul_fwd_bwd"),
    "nearest_approx/nearest": ("nearest_approx", "nearest_fwd"),
}
OPTION_RATIOS = ("gumbel_rbg/matmul", "regvq_rbg/matmul", "gumbel_unsafe_rbg/matmul",
                 "regvq_unsafe_rbg/matmul", "nearest_approx/nearest")


# ------------------------------------------------------------------------ arguments


def _int_list(text: str) -> tuple[int, ...]:
  return tuple(int(v) for v in text.split(",") if v.strip())


def _token_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
  shapes = []
  for item in text.split(","):
    dims = tuple(int(v) for v in item.lower().split("x"))
    if len(dims) != 3 or min(dims) <= 0:
      raise argparse.ArgumentTypeError(f"token grid {item!r} must be BxHxW, e.g. 16x16x16")
    shapes.append(dims)
  return tuple(shapes)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny smoke run (N=128, K in {64,512}, D in {8,32}, 3 repetitions)")
  parser.add_argument("--tokens", type=_token_shapes, default=None,
                      help="token grids BxHxW, comma-separated (default 16x16x16,64x32x32)")
  parser.add_argument("--codes", type=_int_list, default=None,
                      help="codebook sizes K, comma-separated (default 1024,16384,262144)")
  parser.add_argument("--dims", type=_int_list, default=None,
                      help="code widths D, comma-separated (default 8,256)")
  parser.add_argument("--max-gflop", type=float, default=120.0,
                      help="skip cells whose bare matmul fwd+bwd (6*N*K*D flop) exceeds this "
                           "(default %(default)s)")
  parser.add_argument("--max-memory-gb", type=float, default=6.0,
                      help="skip cells whose bare matmul needs more (two N*K float32 arrays), "
                           "and any function whose compiled or estimated peak exceeds this "
                           "(default %(default)s)")
  parser.add_argument("--reps", type=int, default=None,
                      help="timed repetitions per function, interleaved (default 5; quick 3)")
  parser.add_argument("--min-sample-ms", type=float, default=20.0,
                      help="a sample of a fast function repeats calls until it lasts this long "
                           "(default %(default)s)")
  parser.add_argument("--functions", default=",".join(JAX_FUNCTIONS),
                      help="JAX functions to time, comma-separated; 'all' adds the options "
                           f"({', '.join(OPTION_FUNCTIONS)}) (default: the table's)")
  parser.add_argument("--no-torch", action="store_true",
                      help="skip the vector-quantize-pytorch comparison")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None,
                      help="JSON path (default benchmarks/results/quantizer_<backend>.json; "
                           "quantizer_<backend>_quick.json with --quick)")
  args = parser.parse_args(argv)
  if args.tokens is None:
    args.tokens = QUICK_TOKENS if args.quick else DEFAULT_TOKENS
  if args.codes is None:
    args.codes = QUICK_CODES if args.quick else DEFAULT_CODES
  if args.dims is None:
    args.dims = QUICK_DIMS if args.quick else DEFAULT_DIMS
  if args.reps is None:
    args.reps = 3 if args.quick else 5
  if args.reps < 1:
    parser.error("--reps must be >= 1")
  known = JAX_FUNCTIONS + OPTION_FUNCTIONS
  args.functions = (known if args.functions == "all"
                    else tuple(f for f in args.functions.split(",") if f))
  unknown = [f for f in args.functions if f not in known]
  if unknown:
    parser.error(f"--functions: unknown {unknown}; choose from {', '.join(known)}")
  if args.out is None:
    suffix = "_quick" if args.quick else ""
    args.out = os.path.join(_REPO, "benchmarks", "results",
                            f"quantizer_{jax.default_backend()}{suffix}.json")
  return args


# ------------------------------------------------------------------------ peak RSS


class PeakRSS:
  """Resident-set high-water mark around a call: VmHWM reset via /proc/self/clear_refs.

  Falls back to getrusage's ru_maxrss (a lifetime peak, so a call that stays under an
  earlier peak reads as 0); `method` says which one was used.
  """

  def __init__(self):
    self.method = "VmHWM after clear_refs=5"
    try:
      self._reset()
      self._status("VmHWM")
    except OSError:
      self.method = "ru_maxrss (lifetime peak; under-reports)"

  @staticmethod
  def _status(field: str) -> int:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")

  @staticmethod
  def _reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")

  def measure(self, fn: Callable[[], Any]) -> tuple[float, int]:
    """Runs fn() once; returns (its wall time in s, peak RSS increase in bytes)."""
    gc.collect()
    if self.method.startswith("VmHWM"):
      self._reset()
      before = self._status("VmRSS")
      start = time.perf_counter()
      fn()
      elapsed = time.perf_counter() - start
      return elapsed, max(0, self._status("VmHWM") - before)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return elapsed, max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


# ------------------------------------------------------------------------ the functions


@dataclasses.dataclass
class Bench:
  """One function of one cell: how to run it, and what was measured."""

  name: str
  call: Callable[[], Any] | None = None   # runs once and blocks until done
  compiled: Any = None                    # the XLA executable (JAX functions)
  status: str = "ok"                      # 'ok' or 'skipped (...)' / 'failed (...)'
  compile_s: float | None = None
  first_call_s: float | None = None
  memory: dict[str, int] | None = None    # XLA memory_analysis, or torch measurement
  peak_bytes: int | None = None           # the number the table shows
  rss_peak_delta_bytes: int | None = None
  inner: int = 1                          # calls per timed sample
  times_s: list[float] = dataclasses.field(default_factory=list)  # per call, per sample

  @property
  def median_s(self) -> float | None:
    return statistics.median(self.times_s) if self.times_s else None

  def record(self) -> dict[str, Any]:
    return {
        "status": self.status,
        "median_ms": None if self.median_s is None else self.median_s * 1e3,
        "times_ms": [t * 1e3 for t in self.times_s],
        "calls_per_sample": self.inner,
        "compile_s": self.compile_s,
        "first_call_s": self.first_call_s,
        "peak_bytes": self.peak_bytes,
        "memory": self.memory,
        "rss_peak_delta_bytes": self.rss_peak_delta_bytes,
    }


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _memory_stats(compiled) -> dict[str, int] | None:
  try:
    stats = compiled.memory_analysis()
  except Exception:  # noqa: BLE001  (some backends do not implement it)
    return None
  if stats is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f: int(getattr(stats, f, 0) or 0) for f in fields}
  out["peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                       + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
  return out


def _quantizer_loss(graphdef):
  def loss(params, rest, z, w, key):
    out = nnx.merge(graphdef, params, rest)(z, key=key)
    return jnp.sum(out.quantized.astype(jnp.float32) * w) + out.total_loss
  return jax.value_and_grad(loss, argnums=(0, 2))


def _quantizer_config(kind: str, num_codes: int, code_dim: int,
                      **overrides) -> dict[str, Any]:
  options = dict(registry.get(kind).options)
  options.update(overrides)
  if kind == "fq":
    # The table's FQ row times plain (Euclidean, no entropy loss) VQ sub-codebooks, as
    # it always has; FQGAN's cosine codes and entropy loss are options on top.
    options.update(normalize=False, entropy_weight=0.0)
  return {"kind": kind, "num_codes": num_codes, "code_dim": code_dim, kind: options}


def jax_benches(shape, num_codes, dim, seed, limit_bytes, log,
                functions=JAX_FUNCTIONS) -> tuple[list[Bench], Callable]:
  """Compiles the JAX `functions` of a cell; inputs are made only for those that fit."""
  batch, height, width = shape
  n = batch * height * width
  f32 = jnp.float32
  keys = jax.random.split(jax.random.key(seed), 8)
  inputs: dict[str, Any] = {}

  def matmul_fwd(z, c):
    return z @ c.T

  def matmul_loss(z, c, g):
    return jnp.sum((z @ c.T) * g)

  def nearest_fwd(z, c):
    return ops.nearest_code(z, c)

  def nearest_approx(z, c):
    return ops.nearest_code(z, c, recall_target=APPROX_RECALL)

  specs: list[tuple[str, Callable, tuple, Callable[[], tuple]]] = []
  z2 = jax.ShapeDtypeStruct((n, dim), f32)
  cb = jax.ShapeDtypeStruct((num_codes, dim), f32)
  gg = jax.ShapeDtypeStruct((n, num_codes), f32)

  def base_inputs(with_g=False):
    if "z2d" not in inputs:
      inputs["z2d"] = jax.random.normal(keys[0], (n, dim), f32)
      inputs["codebook"] = jax.random.normal(keys[1], (num_codes, dim), f32)
    if with_g and "g" not in inputs:
      inputs["g"] = jax.random.normal(keys[2], (n, num_codes), f32)
    args = (inputs["z2d"], inputs["codebook"])
    return args + ((inputs["g"],) if with_g else ())

  specs.append(("matmul_fwd", matmul_fwd, (z2, cb), lambda: base_inputs()))
  specs.append(("matmul_fwd_bwd", jax.value_and_grad(matmul_loss, argnums=(0, 1)),
                (z2, cb, gg), lambda: base_inputs(with_g=True)))
  specs.append(("nearest_fwd", nearest_fwd, (z2, cb), lambda: base_inputs()))
  specs.append(("nearest_approx", nearest_approx, (z2, cb), lambda: base_inputs()))

  for name in QUANTIZER_FUNCTIONS:
    if name not in functions:
      continue
    kind, overrides = QUANTIZER_FUNCTIONS[name]
    features = 2 * dim if kind == "fq" else dim
    model = build_quantizer(_quantizer_config(kind, num_codes, dim, **overrides),
                            in_features=dim, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = jax.random.key(seed + 1)
    grid = (batch, height, width, features)
    assert math.prod(grid[:-1]) == n, (grid, n)
    zs = jax.ShapeDtypeStruct(grid, f32)

    def make(features=features, grid=grid, params=params, rest=rest, key=key):
      name = f"z{features}"
      if name not in inputs:
        inputs[name] = jax.random.normal(keys[3], grid, f32)
        inputs["w" + name] = jax.random.normal(keys[4], grid, f32)
      return (params, rest, inputs[name], inputs["w" + name], key)

    specs.append((name, _quantizer_loss(graphdef),
                  (_abstract(params), _abstract(rest), zs, zs, _abstract(key)), make))

  benches = []
  for name, fn, abstract_args, make_args in specs:
    if name not in functions:
      continue
    bench = Bench(name)
    benches.append(bench)
    start = time.perf_counter()
    try:
      compiled = jax.jit(fn).lower(*abstract_args).compile()
    except Exception as e:  # noqa: BLE001
      bench.status = f"failed (compile: {type(e).__name__})"
      log(f"    {name}: compile failed: {e}")
      continue
    bench.compile_s = time.perf_counter() - start
    bench.compiled = compiled
    bench.memory = _memory_stats(compiled)
    bench.peak_bytes = None if bench.memory is None else bench.memory["peak_bytes"]
    if bench.peak_bytes is not None and bench.peak_bytes > limit_bytes:
      bench.status = "skipped (memory)"
      log(f"    {name}: needs {bench.peak_bytes / GIB:.2f} GiB > limit, skipped")
      continue
    args = make_args()
    bench.call = (lambda compiled=compiled, args=args:
                  jax.block_until_ready(compiled(*args)))

  def release():
    inputs.clear()

  return benches, release


def torch_bench(shape, num_codes, dim, seed, limit_bytes, threads, log) -> tuple[Bench, Callable]:
  """vector_quantize_pytorch.VectorQuantize fwd+bwd on the CPU, or a skipped Bench."""
  bench = Bench(TORCH_FUNCTION)
  batch, height, width = shape
  n = batch * height * width
  # cdist's ‖x‖² + ‖c‖² − 2x·c, clamp, sqrt and negation keep up to ~4 [N, K] float32
  # arrays alive, plus the int64 one-hot of F.one_hot and its float32 copy.
  estimate = n * num_codes * (4 * 4 + 8 + 4) + 4 * (4 * n * dim + 2 * num_codes * dim)
  if estimate > limit_bytes:
    bench.status = "skipped (memory)"
    bench.peak_bytes = estimate
    log(f"    torch_vq: estimated {estimate / GIB:.2f} GiB > limit, skipped")
    return bench, lambda: None
  import torch
  from vector_quantize_pytorch import VectorQuantize
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  try:
    vq = VectorQuantize(dim=dim, codebook_size=num_codes, **TORCH_VQ_KWARGS)
  except (TypeError, AssertionError) as e:  # an older or newer version's arguments
    bench.status = f"failed (VectorQuantize: {type(e).__name__})"
    log(f"    torch_vq: VectorQuantize({TORCH_VQ_KWARGS}) failed: {e}")
    return bench, lambda: None
  vq.train()
  x = torch.randn(batch, height * width, dim, requires_grad=True)
  w = torch.randn(batch, height * width, dim)

  def step():
    x.grad = None
    vq.zero_grad(set_to_none=True)
    quantized, _, loss = vq(x)
    total = (quantized * w).sum() + loss
    total.backward()
    return total

  resident = sum(t.numel() * t.element_size() for t in [x, w, *vq.parameters(), *vq.buffers()])
  bench.call = step
  bench.memory = {"resident_input_and_param_bytes": resident, "estimate_bytes": estimate}

  def release():
    bench.call = None

  return bench, release


# ------------------------------------------------------------------------ timing


def run_cell(benches: list[Bench], reps: int, min_sample_s: float, rss: PeakRSS, log) -> int:
  """Warm-up, calibration, then interleaved timed samples; returns the repetitions run.

  The first call of each function is its warm-up (timed); a second call has its RSS
  high-water mark measured (so one-time allocations of the first call do not count) and
  calibrates how many back-to-back calls make one sample of at least `min_sample_s`.
  Then every function gets one sample per round, in an order rotated each round. At
  least `reps` rounds; up to 3x as many while a round is short (under a second), since
  small cells are the noisiest.
  """
  active = [b for b in benches if b.status == "ok" and b.call is not None]
  for bench in active:
    try:
      start = time.perf_counter()
      bench.call()
      bench.first_call_s = time.perf_counter() - start
      calibration, bench.rss_peak_delta_bytes = rss.measure(bench.call)
    except Exception as e:  # noqa: BLE001
      bench.status = f"failed ({type(e).__name__})"
      log(f"    {bench.name}: failed: {e}")
      continue
    if bench.name == TORCH_FUNCTION:
      bench.peak_bytes = (bench.rss_peak_delta_bytes
                          + bench.memory["resident_input_and_param_bytes"])
    bench.inner = max(1, min(100, math.ceil(min_sample_s / max(calibration, 1e-6))))
  active = [b for b in active if b.status == "ok"]
  if not active:
    return 0
  rounds, limit = 0, reps
  while rounds < limit:
    shift = rounds % len(active)
    round_start = time.perf_counter()
    for bench in active[shift:] + active[:shift]:
      start = time.perf_counter()
      for _ in range(bench.inner):
        bench.call()
      bench.times_s.append((time.perf_counter() - start) / bench.inner)
    rounds += 1
    if rounds == 1 and time.perf_counter() - round_start < 1.0:
      limit = 3 * reps
  return rounds


# ------------------------------------------------------------------------ reporting


def _ratio(results: dict[str, Bench], name: str, paired: bool = True) -> float | None:
  """Median over rounds of numerator / denominator from the same round (paired: robust to
  load that drifts between rounds), or the ratio of the two medians (paired=False)."""
  num, den = RATIO_OF[name]
  a, b = results.get(num), results.get(den)
  if a is None or b is None or not a.times_s or not b.times_s:
    return None
  if not paired:
    return a.median_s / b.median_s
  return statistics.median(x / y for x, y in zip(a.times_s, b.times_s))


def _targets(ratios: dict[str, float | None]) -> dict[str, bool | None]:
  def check(value, limit):
    return None if value is None else bool(value <= limit)
  torch_ratio = ratios.get("vq/torch_vq")
  return {
      f"nearest_le_{NEAREST_TARGET}x_matmul": check(ratios.get("nearest/matmul"), NEAREST_TARGET),
      f"regvq_le_{REGVQ_TARGET:g}x_matmul": check(ratios.get("regvq/matmul"), REGVQ_TARGET),
      "vq_faster_than_torch": None if torch_ratio is None else bool(torch_ratio < 1.0),
  }


# Ratio columns that carry a target: ratio name -> (limit, strict).
TARGET_OF = {"nearest/matmul": (NEAREST_TARGET, False), "regvq/matmul": (REGVQ_TARGET, False),
             "vq/torch_vq": (1.0, True)}


def _cell_text(results: dict[str, Bench], ratio_name: str, ratio: float | None) -> str:
  if ratio is not None:
    if ratio_name not in TARGET_OF:
      return f"{ratio:.2f}"
    limit, strict = TARGET_OF[ratio_name]
    met = ratio < limit if strict else ratio <= limit
    return f"{ratio:.2f} {'✓' if met else '✗'}"
  num, den = RATIO_OF[ratio_name]
  for name in (num, den):
    bench = results.get(name)
    if bench is not None and bench.status != "ok":
      return bench.status if name in (num, TORCH_FUNCTION) else f"{bench.status} (baseline)"
  return "—"


def _ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _mib(bench: Bench | None) -> str:
  if bench is None or bench.peak_bytes is None:
    return "—"
  mib = bench.peak_bytes / MIB
  text = f"{mib:.0f}" if mib >= 10 else f"{mib:.1f}"
  return f"({text})" if bench.status != "ok" else text


def markdown_tables(cells: list[dict[str, Any]]) -> str:
  header = ("| N | K | D | matmul ms (fwd / fwd+bwd) | nearest/matmul | VQ/matmul | "
            "Gumbel/matmul | Reg-VQ/matmul | FQ/matmul | VQ ÷ torch VQ | "
            "peak MiB (mm fb / near / VQ / Gum / Reg / FQ / torch) |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  warm = ["| N | K | D | compile s (mm / mm fb / near / VQ / Gum / Reg / FQ) | "
          "first call s (torch VQ) |", "|---|---|---|---|---|"]
  for cell in cells:
    n, k, d = cell["N"], cell["K"], cell["D"]
    if cell["status"] != "ok":
      lines.append(f"| {n} | {k} | {d} | " + " | ".join([cell["status"]] * 8) + " |")
      continue
    res: dict[str, Bench] = cell["_benches"]
    mm, fb = res["matmul_fwd"], res["matmul_fwd_bwd"]
    mm_text = " / ".join("—" if b.median_s is None else _ms(b.median_s) for b in (mm, fb))
    ratios = cell["ratios"]
    ratio_cols = [_cell_text(res, r, ratios[r]) for r in
                  ("nearest/matmul", "vq/matmul", "gumbel/matmul", "regvq/matmul",
                   "fq/matmul", "vq/torch_vq")]
    mem = " / ".join(_mib(res.get(name)) for name in
                     ("matmul_fwd_bwd", "nearest_fwd", "vq", "gumbel", "regvq", "fq",
                      TORCH_FUNCTION))
    lines.append(f"| {n} | {k} | {d} | {mm_text} | " + " | ".join(ratio_cols) + f" | {mem} |")
    compile_text = " / ".join(
        "—" if res[name].compile_s is None else f"{res[name].compile_s:.1f}"
        for name in JAX_FUNCTIONS)
    torch_b = res.get(TORCH_FUNCTION)
    torch_text = ("—" if torch_b is None else torch_b.status if torch_b.first_call_s is None
                  else f"{torch_b.first_call_s:.2f}")
    warm.append(f"| {n} | {k} | {d} | {compile_text} | {torch_text} |")
  text = "\n".join(lines) + "\n\nWarm-up (excluded from the timings above):\n\n" + "\n".join(warm)
  measured = [name for name in OPTION_RATIOS
              if any(c.get("ratios", {}).get(name) is not None for c in cells)]
  if measured:
    option_lines = ["| N | K | D | " + " | ".join(measured) + " |",
                    "|---|---|---|" + "---|" * len(measured)]
    for cell in cells:
      if cell["status"] == "ok":
        values = [cell["ratios"].get(name) for name in measured]
        option_lines.append(f"| {cell['N']} | {cell['K']} | {cell['D']} | " + " | ".join(
            "—" if v is None else f"{v:.2f}" for v in values) + " |")
    text += ("\n\nOptions (fwd+bwd ÷ matmul fwd+bwd, same rounds):\n\n"
             + "\n".join(option_lines))
  return text


def write_json(path: str, meta: dict[str, Any], cells: list[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  payload = dict(meta)
  payload["cells"] = [{k: v for k, v in cell.items() if not k.startswith("_")} for cell in cells]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)


# ------------------------------------------------------------------------ main


def measure_cell(shape: tuple[int, int, int], num_codes: int, dim: int, *,
                 functions=JAX_FUNCTIONS, reps: int = 5, min_sample_ms: float = 20.0,
                 seed: int = 0, max_gflop: float = 120.0, limit_bytes: int = 6 * GIB,
                 torch_note: str | None = "skipped (not asked for)", threads: int = 1,
                 rss: PeakRSS | None = None, log=lambda msg: None) -> dict[str, Any]:
  """One cell (tokens `shape` = (B, H, W), K = `num_codes`, D = `dim`): compiles and times
  `functions` (and torch's VectorQuantize when `torch_note` is None) and returns the
  cell's record, as `main` writes it (plus `_benches`, the Bench objects, which
  `markdown_tables` reads and `write_json` leaves out). A cell over `max_gflop` or whose
  baseline needs more than `limit_bytes` is returned with its status and nothing timed."""
  rss = rss or PeakRSS()
  n = math.prod(shape)
  gflop = 6 * n * num_codes * dim / 1e9
  base_bytes = 4 * (2 * n * num_codes + 2 * n * dim + 2 * num_codes * dim)
  cell: dict[str, Any] = {"N": n, "shape": list(shape), "K": num_codes, "D": dim,
                          "matmul_fwd_bwd_gflop": gflop,
                          "matmul_fwd_bwd_estimated_bytes": base_bytes}
  if gflop > max_gflop:
    cell["status"] = "skipped (flops)"
  elif base_bytes > limit_bytes:
    cell["status"] = "skipped (memory)"
  else:
    cell["status"] = "ok"
  if cell["status"] != "ok":
    log(f"    {cell['status']}")
    return cell

  cell_start = time.perf_counter()
  benches, release_jax = jax_benches(shape, num_codes, dim, seed, limit_bytes, log, functions)
  benches += [Bench(name, status="skipped (--functions)") for name in JAX_FUNCTIONS
              if name not in functions]
  release_torch = lambda: None  # noqa: E731
  if torch_note is None:
    tb, release_torch = torch_bench(shape, num_codes, dim, seed, limit_bytes, threads, log)
  else:
    tb = Bench(TORCH_FUNCTION, status=torch_note)
  benches.append(tb)
  rounds = run_cell(benches, reps, min_sample_ms / 1e3, rss, log)
  release_jax()
  release_torch()
  results = {b.name: b for b in benches}
  for b in benches:
    b.call = b.compiled = None
  gc.collect()

  ratios = {name: _ratio(results, name) for name in RATIO_OF}
  cell.update(
      _benches=results,
      functions={b.name: b.record() for b in benches},
      ratios=ratios,
      ratios_of_medians={name: _ratio(results, name, paired=False) for name in RATIO_OF},
      targets=_targets(ratios),
      rounds=rounds,
      wall_s=time.perf_counter() - cell_start,
  )
  summary = ", ".join(f"{k}={v:.2f}" for k, v in ratios.items() if v is not None)
  log(f"    {summary}  ({cell['wall_s']:.0f} s)")
  return cell




def main(argv=None) -> int:
  args = parse_args(argv)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  limit_bytes = int(args.max_memory_gb * GIB)
  threads = usable_cores()
  rss = PeakRSS()

  torch_note = None
  if args.no_torch:
    torch_note = "skipped (--no-torch)"
  elif jax.default_backend() != "cpu":
    torch_note = "skipped (JAX is not on the CPU; the comparison is CPU against CPU)"
  else:
    try:
      import torch  # noqa: F401
      import vector_quantize_pytorch  # noqa: F401
    except ImportError as e:
      torch_note = f"skipped (not installed: {e.name})"
  if torch_note:
    log(f"PyTorch column: {torch_note}")

  meta = {
      "benchmark": "rvq_jax quantizers vs the bare codebook matmul",
      "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
      "environment": environment(torch="torch", vector_quantize_pytorch="vector-quantize-pytorch"),
      "settings": {
          "functions": list(args.functions),
          "tokens": [list(s) for s in args.tokens], "codes": list(args.codes),
          "dims": list(args.dims), "max_gflop": args.max_gflop,
          "max_memory_gb": args.max_memory_gb, "reps": args.reps,
          "min_sample_ms": args.min_sample_ms, "seed": args.seed, "quick": args.quick,
          "torch_threads": threads if torch_note is None else None,
          "torch": torch_note or "vector_quantize_pytorch.VectorQuantize(dim=D, codebook_size=K, "
                   + ", ".join(f"{k}={v!r}" for k, v in TORCH_VQ_KWARGS.items()) + ")",
      },
      "definitions": {
          "matmul_fwd": "jit(z @ C.T), z [N, D], C [K, D] float32",
          "matmul_fwd_bwd": "jit(value_and_grad(sum(z @ C.T * G), (z, C))), G [N, K]",
          "nearest_fwd": "jit(ops.nearest_code(z, C))",
          "nearest_approx": f"jit(ops.nearest_code(z, C, recall_target={APPROX_RECALL})): "
                            "jax.lax.approx_min_k (approximate on TPUs, an exact sort "
                            "elsewhere); with --functions",
          "gumbel_rbg / regvq_rbg / *_unsafe_rbg": "gumbel / regvq with prng='rbg' or "
                                                   "'unsafe_rbg'; with --functions",
          "vq / gumbel / regvq / fq": (
              "jit(value_and_grad(sum(out.quantized * W) + out.total_loss, (params, z))), "
              "build_quantizer(kind, num_codes=K, code_dim=D, in_features=D) with its "
              "defaults, training mode, z [B, H, W, D] (fq: [B, H, W, 2D], M=2 VQ "
              "sub-quantizers of width D); gumbel/regvq: projection logits D -> K"),
          "torch_vq": "VectorQuantize fwd + (sum(quantized * W) + loss).backward(), "
                      "x [B, H*W, D], same CPU, torch.set_num_threads(usable cores)",
          "time": "median over interleaved samples of the per-call time "
                  "(block_until_ready; compile and first call excluded)",
          "ratio": "median over rounds of (numerator time / denominator time) in the same "
                   "round; ratios_of_medians: median numerator / median denominator",
          "peak_bytes (JAX)": "compiled.memory_analysis(): argument + output + temp - alias",
          "peak_bytes (torch)": f"process RSS high-water increase during the second call "
                                f"({rss.method}) + bytes of resident inputs/params/buffers",
          "rss_peak_delta_bytes": f"RSS high-water increase during the second call "
                                  f"({rss.method}); a cross-check, JAX included",
          "targets": {
              f"nearest_le_{NEAREST_TARGET}x_matmul": "nearest fwd / matmul fwd <= 1.3",
              f"regvq_le_{REGVQ_TARGET:g}x_matmul": "Reg-VQ fwd+bwd / matmul fwd+bwd <= 2",
              "vq_faster_than_torch": "our VQ fwd+bwd / torch VQ fwd+bwd < 1",
              "null": "not measured (skipped or failed)",
          },
      },
  }

  cells: list[dict[str, Any]] = []
  grid = [(s, k, d) for s in args.tokens for k in args.codes for d in args.dims]
  run_start = time.perf_counter()
  for index, (shape, num_codes, dim) in enumerate(grid):
    log(f"[{index + 1}/{len(grid)}] N={math.prod(shape)} K={num_codes} D={dim}: "
        f"{6 * math.prod(shape) * num_codes * dim / 1e9:.1f} GFLOP")
    cells.append(measure_cell(
        shape, num_codes, dim, functions=args.functions, reps=args.reps,
        min_sample_ms=args.min_sample_ms, seed=args.seed, max_gflop=args.max_gflop,
        limit_bytes=limit_bytes, torch_note=torch_note, threads=threads, rss=rss, log=log))
    write_json(args.out, meta, cells)

  meta["wall_s"] = time.perf_counter() - run_start
  meta["targets_summary"] = {
      name: {
          "met": [f"N={c['N']} K={c['K']} D={c['D']}" for c in cells
                  if c.get("targets", {}).get(name) is True],
          "missed": [f"N={c['N']} K={c['K']} D={c['D']}" for c in cells
                     if c.get("targets", {}).get(name) is False],
      }
      for name in _targets({})
  }
  table = markdown_tables(cells)
  meta["table_markdown"] = table
  write_json(args.out, meta, cells)
  print(f"# Quantizer benchmark — {meta['environment']['description']}")
  print(f"jax {jax.__version__}; >= {args.reps} interleaved samples per function (3x for "
        f"cells whose round takes < 1 s), medians; ratios are time / bare-matmul time "
        f"(nearest: fwd / fwd, others: fwd+bwd / fwd+bwd), median over rounds of the "
        f"same-round ratio; "
        f"✓/✗: target met (nearest <= {NEAREST_TARGET}, Reg-VQ <= {REGVQ_TARGET:g}, "
        f"VQ ÷ torch < 1).")
  if torch_note:
    print(f"PyTorch column: {torch_note}.")
  print()
  print(table)
  print()
  print(f"JSON: {os.path.relpath(args.out)}  ({meta['wall_s']:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
