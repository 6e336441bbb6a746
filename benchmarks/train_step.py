"""Train-step throughput of every stage, as a fraction of the device's matmul FLOP/s.

A script, not a test: `python -m benchmarks.train_step` (see benchmarks/README.md).

For each config (the demo; the paper's CelebA-HQ setup at a reduced batch) and each
stage (tokenizer with every loss and the GAN on; AR prior; diffusion prior), it builds
the loop's own jitted step (`loop.prepare(...).train_step`: same shardings, donation)
on one device with random weights and a random batch, and reports

  compile s        lower + compile of the step
  step s, images/s median over timed steps (after one warm-up step)
  GFLOP / step     XLA's cost analysis of the compiled step
  achieved FLOP/s  GFLOP/step ÷ step s
  ÷ matmul         achieved FLOP/s ÷ the FLOP/s of a bare float32 [n, n] × [n, n] matmul
                   timed on the same device right before and after the stage (their
                   mean): a model-FLOPs-utilization ratio that does not depend on how
                   busy or fast the machine is.

Frozen pretrained networks (LPIPS, VGG-19, the FID Inception) use random weights: their
cost is what matters here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import environment
from configs import celebahq
from configs import demo
from rvq_jax import config as config_lib
from rvq_jax.tools import aot_check
from rvq_jax.train import loop
from rvq_jax.train import stages
from rvq_jax.train.tokenizer_stage import build_tokenizer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = ("tokenizer", "ar", "diffusion")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="demo,paper",
                      help="comma list of demo | paper (celebahq at --paper_batch)")
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--paper_batch", type=int, default=1,
                      help="global batch of the paper config (it uses 32)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per stage")
  parser.add_argument("--matmul_size", type=int, default=0,
                      help="n of the reference matmul (0: 2048 on CPU, 8192 elsewhere)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = os.path.join(_REPO, "benchmarks", "results",
                            f"train_step_{jax.default_backend()}.json")
  args.matmul_size = args.matmul_size or (2048 if jax.default_backend() == "cpu" else 8192)
  return args


def run_config(name: str, paper_batch: int):
  """The config `name` on one device, with random pretrained networks."""
  if name == "demo":
    config = demo.get_config()
  elif name == "paper":
    config = celebahq.get_config()
  else:
    raise ValueError(f"unknown config {name!r}: demo or paper")
  config.unlock()
  config.weights.random = True
  config.mesh.shape = (1, 1, 1)
  if name == "paper":
    for stage in config_lib.STAGES:
      config[stage].train.batch_size = paper_batch
  return config


def matmul_flops_per_s(n: int, repeats: int = 5, dtype=jnp.float32) -> float:
  """FLOP/s of a [n, n] × [n, n] matmul in `dtype` (default precision: TF32 on recent
  NVIDIA GPUs, one bfloat16 pass on TPUs for float32) on the default device (median)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times)


def _random_batch(abstract: dict) -> dict:
  rng = np.random.default_rng(0)
  batch = {}
  for name, spec in abstract.items():
    if name == "image":
      batch[name] = rng.uniform(-1, 1, spec.shape).astype(np.float32)
    elif name == "valid":
      batch[name] = np.ones(spec.shape, bool)
    else:
      batch[name] = np.zeros(spec.shape, spec.dtype)
  return batch


class DoesNotFit(RuntimeError):
  """The compiled step needs more device memory than `measure_stage`'s `max_bytes`."""

  def __init__(self, needed_bytes: int, max_bytes: int, compile_s: float):
    super().__init__(f"the step needs {needed_bytes / 2**30:.1f} GiB > "
                     f"{max_bytes / 2**30:.1f} GiB")
    self.needed_bytes, self.max_bytes, self.compile_s = needed_bytes, max_bytes, compile_s


def measure_stage(config, stage_name: str, num_steps: int,
                  max_bytes: int | None = None) -> dict:
  """Compile time, step time, FLOPs and memory of one stage's step on one device.

  With `max_bytes`, a step whose compiled program (XLA's buffer assignment) needs more
  raises `DoesNotFit` before it runs."""
  tokenizer = None
  if stage_name != "tokenizer":
    tokenizer = build_tokenizer(config, rngs=nnx.Rngs(0))
  stage = stages.build(config, stage_name, tokenizer=tokenizer)
  loop_config = loop.loop_config_from(config, stage_name)
  # run_config pins the mesh to one device.
  prepared = loop.prepare(stage, loop_config)
  mesh = prepared.mesh
  batch_size = config[stage_name].train.batch_size
  with jax.set_mesh(mesh):
    state = prepared.init_state()
    constants = prepared.constants()
    batch = loop.global_batch(
        _random_batch(aot_check.abstract_batch(stage, config, batch_size)), mesh)
    key, step = jax.random.key(0), jnp.asarray(loop_config.num_steps - 1, jnp.int32)
    # The last step's phase: the tokenizer with its GAN on, the heaviest step.
    phase = stage.phase(loop_config.num_steps - 1)
    step_fn = prepared.train_step(phase)
    start = time.perf_counter()
    compiled = step_fn.lower(state, constants, batch, key, step).compile()
    compile_s = time.perf_counter() - start
    try:
      memory = aot_check.compiled_memory(compiled)
    except RuntimeError:  # A backend without memory analysis.
      memory = None
    if max_bytes is not None and memory and memory["total_bytes"] > max_bytes:
      raise DoesNotFit(memory["total_bytes"], max_bytes, compile_s)
    state, metrics = compiled(state, constants, batch, key, step)  # Warm-up.
    jax.block_until_ready(metrics)
    times = []
    for _ in range(num_steps):
      start = time.perf_counter()
      state, metrics = compiled(state, constants, batch, key, step)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  flops = aot_check.compiled_flops(compiled)
  parameters = int(sum(x.size for x in jax.tree.leaves(
      nnx.state(prepared.merge(state).model, nnx.Param))))
  return {"stage": stage_name, "batch": batch_size, "compile_s": compile_s,
          "step_s": step_s, "times_s": times, "images_per_s": batch_size / step_s,
          "gflop_per_step": flops / 1e9, "achieved_flops_per_s": flops / step_s,
          "parameters": parameters, "loss": float(metrics["loss"]),
          "memory": memory}


def main(argv=None) -> int:
  args = parse_args(argv)
  rows = []
  for config_name in args.configs.split(","):
    config = run_config(config_name, args.paper_batch)
    for stage_name in args.stages.split(","):
      before = matmul_flops_per_s(args.matmul_size)
      row = measure_stage(config, stage_name, args.steps)
      after = matmul_flops_per_s(args.matmul_size)
      row.update(config=config_name, matmul_flops_per_s=(before + after) / 2)
      row["fraction_of_matmul"] = row["achieved_flops_per_s"] / row["matmul_flops_per_s"]
      rows.append(row)
      print(f"{config_name}/{stage_name}: {row['step_s']:.3f} s/step, "
            f"{row['images_per_s']:.2f} images/s, {row['fraction_of_matmul']:.2f} of matmul",
            flush=True)
  device = jax.devices()[0].device_kind
  print(f"\n{device}; reference matmul n = {args.matmul_size} float32\n")
  print("| config | stage | batch | params | compile s | s / step | images/s | GFLOP / step "
        "| achieved GFLOP/s | matmul GFLOP/s | ÷ matmul | peak GiB |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
  for row in rows:
    print(f"| {row['config']} | {row['stage']} | {row['batch']} | {row['parameters'] / 1e6:.1f}M "
          f"| {row['compile_s']:.1f} | {row['step_s']:.3f} | {row['images_per_s']:.2f} | "
          f"{row['gflop_per_step']:.1f} | {row['achieved_flops_per_s'] / 1e9:.1f} | "
          f"{row['matmul_flops_per_s'] / 1e9:.1f} | {row['fraction_of_matmul']:.2f} | "
          f"{row['memory']['total_bytes'] / 2**30:.2f} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"settings": vars(args), "rows": rows, "environment": environment()}, f,
              indent=2, default=str)
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
