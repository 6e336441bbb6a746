"""Sampling speed of the two priors, side by side in one run.

A script, not a test: `python -m benchmarks.sampling` (see benchmarks/README.md).

At equal model size (same width, depth, heads, vocabulary and token grid), it times
drawing a batch of token grids with

  ar cache        ARPrior.sample with the KV cache (one position per step, O(L) each)
  ar recompute    ARPrior.sample(use_cache=False): the full prefix every step (O(L²))
  diffusion T=…   DiffusionPrior.sample with num_steps ∈ {T, T/2, T/4} (strided)

Token sampling only: decoding tokens to pixels costs the same for every sampler and is
left out. Each function is compiled first (compile time reported separately), then the
samplers run in interleaved rounds; the table gives the median time per batch, images/s
and the ratios the targets are stated in (AR cache ÷ recompute speed-up at L tokens;
diffusion at T/4 steps vs the AR cache), each the median of the per-round ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
from flax import nnx

from benchmarks.common import environment
from rvq_jax.models.priors.ar import ARPrior
from rvq_jax.models.priors.diffusion import DiffusionPrior

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CACHE_TARGET = 5.0       # AR with the KV cache ≥ 5× faster than recomputation
DIFFUSION_TARGET = 1.0   # diffusion at T/4 steps faster per image than AR (ratio > 1)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--grid", type=int, default=16, help="token grid side (L = grid²)")
  parser.add_argument("--vocab", type=int, default=1024)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--batch", type=int, default=8, help="images per sampling call")
  parser.add_argument("--timesteps", type=int, default=100, help="diffusion T")
  parser.add_argument("--diffusion_steps", default="",
                      help="comma list of diffusion step counts (default: T, T/2, T/4)")
  parser.add_argument("--samplers", default="",
                      help="comma list of samplers to time: 'ar cache', 'ar recompute', "
                           "'diffusion <S> steps' (default: all)")
  parser.add_argument("--dtype", default="float32", help="compute dtype of both priors")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--paper", action="store_true",
                      help="taming/VQ-Diffusion size: width 1024, depth 24, heads 16 "
                           "(an accelerator's job)")
  parser.add_argument("--quick", action="store_true", help="tiny smoke run")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.paper:
    args.width, args.depth, args.heads = 1024, 24, 16
  if args.quick:
    args.grid, args.vocab, args.width, args.depth, args.heads = 4, 64, 32, 2, 2
    args.batch, args.timesteps, args.rounds = 2, 8, 2
  if args.out is None:
    suffix = "_quick" if args.quick else ("_paper" if args.paper else "")
    args.out = os.path.join(_REPO, "benchmarks", "results",
                            f"sampling_{jax.default_backend()}{suffix}.json")
  return args


def diffusion_step_counts(args) -> list[int]:
  """The diffusion step counts to time, largest first: --diffusion_steps, else T, T/2, T/4."""
  text = getattr(args, "diffusion_steps", "") or ""
  if text:
    steps = {int(v) for v in str(text).split(",") if v.strip()}
  else:
    steps = {args.timesteps, max(args.timesteps // 2, 1), max(args.timesteps // 4, 1)}
  return sorted(steps, reverse=True)


def build_samplers(args, blocking: bool = True) -> dict:
  """({name: zero-argument function drawing one batch of tokens, blocking until done},
  {'ar' | 'diffusion': parameter count}). `args.samplers` (comma list; empty: all)
  picks which; a prior no sampler uses is not built. `blocking=False`: the functions
  return the tokens without waiting (traceable, e.g. under `jax.eval_shape`)."""
  names = ["ar cache", "ar recompute"] + [f"diffusion {steps} steps"
                                          for steps in diffusion_step_counts(args)]
  wanted = [n.strip() for n in (getattr(args, "samplers", "") or "").split(",") if n.strip()]
  unknown = [n for n in wanted if n not in names]
  if unknown:
    raise ValueError(f"unknown sampler(s) {unknown}: choose from {names}")
  names = [n for n in names if not wanted or n in wanted]
  common = dict(vocab_size=args.vocab, grid_size=(args.grid, args.grid), width=args.width,
                depth=args.depth, num_heads=args.heads,
                dtype=getattr(args, "dtype", "float32"), rngs=nnx.Rngs(0))
  key = jax.random.key(1)
  samplers, parameters = {}, {}
  if any(n.startswith("ar ") for n in names):
    ar = ARPrior(**common)
    parameters["ar"] = _count(ar)
    samplers["ar cache"] = lambda: ar.sample(key, num_samples=args.batch, use_cache=True)
    samplers["ar recompute"] = lambda: ar.sample(key, num_samples=args.batch, use_cache=False)
  if any(n.startswith("diffusion") for n in names):
    diffusion = DiffusionPrior(num_timesteps=args.timesteps, **common)
    parameters["diffusion"] = _count(diffusion)
    for steps in diffusion_step_counts(args):
      samplers[f"diffusion {steps} steps"] = (
          lambda steps=steps: diffusion.sample(key, num_samples=args.batch, num_steps=steps))
  if not blocking:
    return {name: samplers[name] for name in names}, parameters
  return {name: (lambda fn=samplers[name]: jax.block_until_ready(fn())) for name in names
          }, parameters


def _count(module) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def measure(args, log=print) -> dict:
  """Compiles and times the samplers of `args`; returns what `main` writes as JSON, less
  the environment: settings, parameters, rows (per sampler: median s per batch,
  images/s, compile s, every round's seconds), ratios and targets."""
  samplers, parameters = build_samplers(args)
  length = args.grid * args.grid
  log(f"{jax.devices()[0].device_kind}: L={length} tokens, K={args.vocab}, width "
      f"{args.width}, depth {args.depth}, heads {args.heads}, batch {args.batch}; "
      f"parameters " + ", ".join(f"{k} {v:,}" for k, v in parameters.items()))
  compile_s = {}
  for name, fn in samplers.items():
    start = time.perf_counter()
    fn()  # Compiles (the samplers jit internally) and runs once.
    compile_s[name] = time.perf_counter() - start
  times = {name: [] for name in samplers}
  for _ in range(args.rounds):
    for name, fn in samplers.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  # The first call's time minus a steady call is the compile (and first-run) cost.
  compile_s = {name: max(compile_s[name] - min(times[name]), 0.0) for name in samplers}

  def ratio(numerator, denominator):
    return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))

  ratios = {}
  if "ar cache" in samplers and "ar recompute" in samplers:
    ratios["ar_cache_speedup"] = ratio("ar recompute", "ar cache")
  if "ar cache" in samplers:
    for name in samplers:
      if name.startswith("diffusion"):
        ratios[f"{name} vs ar cache (images/s ratio)"] = ratio("ar cache", name)
  rows = [{"sampler": name, "median_s": statistics.median(times[name]),
           "images_per_s": args.batch / statistics.median(times[name]),
           "compile_s": compile_s[name], "seconds": times[name]} for name in samplers]
  return {"settings": vars(args), "parameters": parameters, "rows": rows, "ratios": ratios,
          "targets": {"ar_cache_speedup": CACHE_TARGET, "diffusion_vs_ar": DIFFUSION_TARGET}}


def main(argv=None) -> int:
  args = parse_args(argv)
  result = measure(args)
  rows, ratios = result["rows"], result["ratios"]
  length = args.grid * args.grid
  print("\n| sampler | s / batch | images/s | compile s |\n| --- | ---: | ---: | ---: |")
  for row in rows:
    print(f"| {row['sampler']} | {row['median_s']:.3f} | {row['images_per_s']:.2f} | "
          f"{row['compile_s']:.1f} |")
  if "ar_cache_speedup" in ratios:
    cache = ratios["ar_cache_speedup"]
    print(f"\nAR KV cache speed-up at {length} tokens: {cache:.1f}× "
          f"(target ≥ {CACHE_TARGET:.0f}×: {'met' if cache >= CACHE_TARGET else 'MISSED'})")
  diffusion_names = [row["sampler"] for row in rows if row["sampler"].startswith("diffusion")]
  if diffusion_names and "ar cache" in [row["sampler"] for row in rows]:
    fastest_diffusion = diffusion_names[-1]
    diff = ratios[f"{fastest_diffusion} vs ar cache (images/s ratio)"]
    print(f"{fastest_diffusion} ÷ AR cache, images/s: {diff:.2f}× (target > 1: "
          f"{'met' if diff > DIFFUSION_TARGET else 'MISSED'})")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({**result, "environment": environment()}, f, indent=2, default=str)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
