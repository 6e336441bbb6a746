"""Where a quantizer's time goes: XLA's per-op (per-fusion) profile of the benchmark's functions.

A script, not a test: `python -m benchmarks.quantizer_profile` (see benchmarks/README.md).

For each cell (N tokens, K codes, D features) it compiles the functions `benchmarks.quantizer`
times (the bare matmul fwd+bwd and each quantizer's fwd+bwd, the same jitted code), runs
each a few times under `jax.profiler`, and reads XLA's per-thunk trace events (on the CPU
they exist only with `--xla_cpu_enable_xprof_traceme=true`, which this script sets before
JAX starts). Every fusion is put in a category from the ops it fuses and the JAX source
it came from (matmul, random bits, exp/log, reductions, gather/scatter, sort, copies and
plain elementwise), and the table gives each category's time in units of the bare matmul
fwd+bwd's wall time measured in the same run, so a row sums to about the function's
ratio. `untraced` is wall time no thunk event covers (XLA:CPU's plain Eigen dots run
asynchronously and are mostly seen there).
"""
from __future__ import annotations

import os

# XLA:CPU emits per-thunk trace events only with this flag, and reads flags at start-up.
_FLAG = "--xla_cpu_enable_xprof_traceme=true"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402

from benchmarks import quantizer as bench_lib  # noqa: E402
from benchmarks.common import environment  # noqa: E402

CATEGORIES = ("matmul", "random bits", "exp/log", "reductions", "gather/scatter", "sort",
              "elementwise/copy", "other", "untraced")

# Opcodes that decide a fusion's category, most specific first.
_CATEGORY_OPS = (
    ("matmul", ("dot", "convolution", "custom-call")),
    ("random bits", ("rng-bit-generator", "rng", "threefry")),
    ("sort", ("sort",)),
    ("gather/scatter", ("gather", "scatter", "dynamic-slice", "dynamic-update-slice")),
    ("exp/log", ("exponential", "log", "log-plus-one", "exponential-minus-one", "power",
                 "tanh")),
    ("reductions", ("reduce", "reduce-window")),
)


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """HLO computation name -> the opcodes of its instructions (and of what it calls)."""
  comps: dict[str, list[str]] = {}
  calls: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      comps[current], calls[current] = [], []
      continue
    if current is None:
      continue
    op = re.search(r"=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(", line)
    if op:
      comps[current].append(op.group(1))
    for callee in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
      calls[current].append(callee)
    if "threefry" in line:
      comps[current].append("threefry")

  def expand(name, seen):
    ops = list(comps.get(name, []))
    for callee in calls.get(name, []):
      if callee not in seen:
        seen.add(callee)
        ops += expand(callee, seen)
    return ops

  return {name: expand(name, {name}) for name in comps}


def _instruction_ops(hlo_text: str) -> dict[str, tuple[list[str], str]]:
  """Entry-level instruction name (what the trace calls a thunk) -> (fused opcodes, op_name).

  op_name is the JAX source of the instruction (e.g. `jit(loss)/jvp(jit(_gumbel))/log`).
  """
  comps = _computations(hlo_text)
  out: dict[str, tuple[list[str], str]] = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(", line)
    if not m:
      continue
    name, opcode = m.groups()
    ops = [opcode]
    for callee in re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line):
      ops += comps.get(callee, [])
    source = re.search(r'op_name="([^"]*)"', line)
    out[name] = (ops, source.group(1) if source else "")
  return out


_RANDOM_SOURCES = ("threefry", "_uniform", "_gumbel", "random_bits", "rng_bit_generator",
                   "random_wrap", "random_unwrap")


def categorize(name: str, ops: list[str] | None, source: str = "") -> str:
  """A thunk's category from its fused opcodes and its JAX source."""
  if ops is None:
    ops = re.split(r"[_.]", name)
  if "dot" in ops or "convolution" in ops or name.startswith(("ynn_fusion", "dot")):
    if "dot" in ops or not ops or ops == ["fusion"]:
      return "matmul"
  if any(key in source for key in _RANDOM_SOURCES) or any(
      op in ("rng-bit-generator", "rng", "threefry") for op in ops):
    return "random bits"
  for category, keys in _CATEGORY_OPS[2:]:
    if any(op in keys for op in ops):
      return category
  if "while" in ops:
    return "other"
  return "elementwise/copy"


def _exclusive_times(events: list[dict]) -> list[tuple[str, float]]:
  """(name, seconds not covered by nested events) for the events of one thread."""
  out = []
  stack: list[list] = []  # [end, name, time of children, duration], innermost last

  def close(until):
    while stack and stack[-1][0] <= until:
      _, name, children, duration = stack.pop()
      out.append((name, (duration - children) * 1e-6))
      if stack:
        stack[-1][2] += duration

  for event in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
    close(event["ts"])
    stack.append([event["ts"] + event["dur"], event["name"], 0.0, event["dur"]])
  close(float("inf"))
  return out


def profile(call, reps: int, trace_dir: str) -> tuple[float, dict[str, float]]:
  """Runs `call` reps times under the profiler: (median wall s per call, thunk name -> s/call)."""
  call()
  walls = []
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  try:
    for _ in range(reps):
      start = time.perf_counter()
      call()
      walls.append(time.perf_counter() - start)
  finally:
    jax.profiler.stop_trace()
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  per_op: dict[str, float] = collections.defaultdict(float)
  by_thread = collections.defaultdict(list)
  for event in events:
    if event.get("ph") != "X" or "dur" not in event:
      continue
    name = event["name"]
    # Thunk events are named after the HLO instruction; skip runtime bookkeeping events.
    if (name.startswith(("end:", "$", "Pjit", "Common", "Thunk", "Threadpool", "Slinky",
                         "Handle", "Allocate", "Wait", "Parse", "Python"))
        or "::" in name or " " in name):
      continue
    by_thread[(event.get("pid"), event.get("tid"))].append(event)
  # Exclusive time: a while loop's event encloses its body's thunks, which have their own.
  for thread_events in by_thread.values():
    for name, seconds in _exclusive_times(thread_events):
      per_op[name] += seconds / reps
  return statistics.median(walls), dict(per_op)


def _short_source(op_name: str) -> str:
  """`jit(loss)/transpose(jvp(jit(_gumbel)))/log` -> `bwd: _gumbel/log` (readable op origin)."""
  backward = "transpose(" in op_name
  text = re.sub(r"^jit\(loss\)/", "", op_name)
  text = re.sub(r"(transpose|jvp)\(", "", text).replace(")", "").replace("jit(", "")
  text = "/".join(part for part in text.split("/") if part)
  return ("bwd: " if backward else "") + text


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", type=bench_lib._token_shapes, default=((16, 32, 32),),
                      help="token grids BxHxW (default 16x32x32: N = 16384)")
  parser.add_argument("--codes", type=bench_lib._int_list, default=(1024, 16384))
  parser.add_argument("--dims", type=bench_lib._int_list, default=(256,))
  parser.add_argument("--functions", default="matmul_fwd_bwd,gumbel,regvq",
                      help="comma-separated names from benchmarks.quantizer")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--top", type=int, default=8, help="ops listed per function")
  parser.add_argument("--max-memory-gb", type=float, default=12.0)
  parser.add_argument("--out", default=None, help="JSON path (default: none)")
  args = parser.parse_args(argv)
  wanted = [name for name in args.functions.split(",") if name]
  log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
  lines = []
  cells = []
  for shape in args.tokens:
    for num_codes in args.codes:
      for dim in args.dims:
        n = shape[0] * shape[1] * shape[2]
        log(f"N={n} K={num_codes} D={dim}")
        benches, release = bench_lib.jax_benches(
            shape, num_codes, dim, 0, int(args.max_memory_gb * (1 << 30)), log)
        benches = {b.name: b for b in benches if b.name in wanted and b.call is not None}
        hlo = {}
        cell: dict[str, Any] = {"N": n, "K": num_codes, "D": dim, "functions": {}}
        baseline = None
        for name in wanted:
          bench = benches.get(name)
          if bench is None:
            continue
          with tempfile.TemporaryDirectory() as trace_dir:
            wall, per_op = profile(bench.call, args.reps, trace_dir)
          hlo[name] = bench.compiled.as_text() if bench.compiled is not None else ""
          ops_of = _instruction_ops(hlo[name]) if hlo[name] else {}
          by_category = collections.defaultdict(float)
          for op, seconds in per_op.items():
            ops, source = ops_of.get(op, (None, ""))
            by_category[categorize(op, ops, source)] += seconds
          if name == "matmul_fwd_bwd":
            baseline = wall
          cell["functions"][name] = {
              "wall_s": wall, "op_sum_s": sum(per_op.values()),
              "categories_s": dict(by_category),
              "top_ops": sorted(((op, s, _short_source(ops_of.get(op, ([], ""))[1]))
                                 for op, s in per_op.items()), key=lambda t: -t[1])[: args.top],
          }
        release()
        cells.append(cell)
        lines += _markdown(cell, baseline, args.top)
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"environment": environment(), "command": " ".join(sys.argv),
                 "cells": cells, "markdown": text}, f, indent=1)
      f.write("\n")
  return 0


def _markdown(cell: dict[str, Any], baseline: float | None, top: int) -> list[str]:
  lines = [f"### N = {cell['N']}, K = {cell['K']}, D = {cell['D']}", ""]
  header = "| function | wall ms | ÷ matmul fwd+bwd | " + " | ".join(CATEGORIES) + " |"
  lines += [header, "|" + "---|" * (header.count("|") - 1)]
  for name, f in cell["functions"].items():
    ratio = "—" if not baseline else f"{f['wall_s'] / baseline:.2f}"
    # Each category in units of the baseline's wall time. `untraced` is the wall time no
    # thunk event covers: XLA:CPU's plain (Eigen) dots return before their work is done,
    # so their time shows up there; overlapping thunks make it read 0.
    parts = []
    for category in CATEGORIES:
      seconds = (max(f["wall_s"] - f["op_sum_s"], 0.0) if category == "untraced"
                 else f["categories_s"].get(category, 0.0))
      parts.append("" if seconds == 0 else
                   f"{seconds / baseline:.2f}" if baseline else f"{seconds * 1e3:.1f} ms")
    lines.append(f"| {name} | {f['wall_s'] * 1e3:.1f} | {ratio} | " + " | ".join(parts) + " |")
  lines.append("")
  for name, f in cell["functions"].items():
    ops = ", ".join(f"{op} {s * 1e3:.1f} ms (`{source or '?'}`)"
                    for op, s, source in f["top_ops"][:top])
    lines.append(f"* {name}: {ops}")
  lines.append("")
  return lines


if __name__ == "__main__":
  sys.exit(main())
