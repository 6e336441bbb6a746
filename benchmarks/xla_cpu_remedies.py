"""The remedies XLA offers for the layers where XLA:CPU loses to PyTorch, measured.

A script, not a test: `python -m benchmarks.xla_cpu_remedies` (see benchmarks/README.md).

`benchmarks/peer_torch_layers.py` found the two losers of the 256 px tokenizer step on
XLA:CPU: the 3×3 convolutions at 256² × 128 channels (≈ 3× PyTorch's time, forward +
backward) and GroupNorm (7–15×). This script times, forward + backward, side by side in
one process (interleaved rounds, median):

  conv      lax.conv_general_dilated (NHWC; what the model runs)
  shifted   the same conv as 9 shifted [HW, C] × [C, C'] matmuls
  im2col    one [HW, 9C] × [9C, C'] matmul on the concatenated shifts
  matmul    a bare [HW, 9C] × [9C, C'] matmul: XLA:CPU's GEMM rate, the conv's floor

  groupnorm        flax's nnx.GroupNorm formulation (reduce over H, W and the channels of
                   a group in one reduction on [B, H, W, G, C/G]), one-pass variance
  groupnorm_two_pass  the same with the two-pass variance E[(x - mean)²] that the
                   model runs (`use_fast_variance=False`)
  groupnorm_chan   per-channel sums over H·W on [B, H·W, C] (a reduction along a
                   non-minor axis, contiguous in C), then the group sums on [B, G, C/G]

PyTorch's Conv2d and GroupNorm at the same shapes and thread count (when torch is
installed) in the same run, and, each in a fresh process, the conv under XLA_FLAGS that
select other CPU kernels (oneDNN, XNNPACK, no Eigen thread pool). Every variant is
checked against the reference (values and gradients) before it is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLAG_SETS = ("", "--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_custom_call=true",
             "--xla_cpu_use_xnnpack=true", "--xla_cpu_multi_thread_eigen=false")


def _conv_variants(size: int, channels: int):
  import jax
  import jax.numpy as jnp

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def shifts(x):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return [padded[:, dy:dy + size, dx:dx + size, :] for dy in range(3) for dx in range(3)]

  def shifted(x, k):
    return sum(jnp.einsum("bhwc,cd->bhwd", s, k[i // 3, i % 3]) for i, s in enumerate(shifts(x)))

  def im2col(x, k):
    return jnp.einsum("bhwc,cd->bhwd", jnp.concatenate(shifts(x), -1),
                      k.reshape(-1, k.shape[-1]))
  x = jax.random.normal(jax.random.key(0), (1, size, size, channels))
  k = jax.random.normal(jax.random.key(1), (3, 3, channels, channels)) * 0.05
  return {"conv": conv, "shifted": shifted, "im2col": im2col}, (x, k)


def _groupnorm_variants(size: int, channels: int, groups: int = 32, eps: float = 1e-6):
  import jax
  import jax.numpy as jnp
  b, n = 1, size * size * (channels // groups)

  def groupnorm(x, scale, shift):  # nnx.GroupNorm's formulation (fast variance).
    xg = x.reshape(b, size, size, groups, channels // groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.maximum(jnp.mean(jnp.square(xg), axis=(1, 2, 4), keepdims=True)
                      - jnp.square(mean), 0.0)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + shift

  def groupnorm_two_pass(x, scale, shift):  # what the model runs (use_fast_variance=False)
    xg = x.reshape(b, size, size, groups, channels // groups)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + shift

  def group_mean(channel_sums):  # [B, C] → the group's mean, repeated per channel.
    means = channel_sums.reshape(b, groups, channels // groups).sum(-1) / n
    return jnp.repeat(means, channels // groups, axis=1)

  def groupnorm_chan(x, scale, shift):
    flat = x.reshape(b, size * size, channels)
    mean = group_mean(jnp.sum(flat, axis=1))
    var = jnp.maximum(group_mean(jnp.sum(jnp.square(flat), axis=1)) - jnp.square(mean), 0.0)
    inv = jax.lax.rsqrt(var + eps) * scale
    return (x - mean[:, None, None, :]) * inv[:, None, None, :] + shift
  x = jax.random.normal(jax.random.key(0), (b, size, size, channels)) * 2.0 + 0.5
  return ({"groupnorm": groupnorm, "groupnorm_two_pass": groupnorm_two_pass,
           "groupnorm_chan": groupnorm_chan},
          (x, jnp.linspace(0.5, 1.5, channels), jnp.linspace(-0.1, 0.1, channels)))


def _compiled_fwd_bwd(fn, args):
  import jax
  cotangent = jax.random.normal(jax.random.key(7), jax.eval_shape(fn, *args).shape)

  def fwd_bwd(*args):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(cotangent)
  return jax.jit(fwd_bwd).lower(*args).compile()


def _check_close(got, want, what):
  import jax
  import numpy as np
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    error = np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30)
    if error > 1e-4:
      raise AssertionError(f"{what} differs from the reference: relative L2 error {error:.2e}")


def time_variants(variants: dict, args, reference: str, rounds: int) -> dict:
  """Median ms of each variant's compiled forward + backward, interleaved rounds."""
  import jax
  compiled = {name: _compiled_fwd_bwd(fn, args) for name, fn in variants.items()}
  want = compiled[reference](*args)
  for name, fn in compiled.items():
    _check_close(fn(*args), want, name)
  times = {name: [] for name in compiled}
  for _ in range(rounds):
    for name, fn in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _matmul_ms(size: int, channels: int, rounds: int) -> float:
  import jax
  a = jax.random.normal(jax.random.key(3), (size * size, 9 * channels))
  b = jax.random.normal(jax.random.key(4), (9 * channels, channels))
  matmul = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _torch_ms(size: int, channels: int, rounds: int) -> dict | str:
  """PyTorch's conv and GroupNorm at the same shapes, fwd+bwd (median ms), same threads."""
  try:
    import torch
  except ImportError:
    return "skipped (torch not installed)"
  from benchmarks.common import usable_cores
  torch.set_num_threads(usable_cores())
  x = torch.randn(1, channels, size, size, requires_grad=True)
  conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
  norm = torch.nn.GroupNorm(32, channels, eps=1e-6)
  out = {}
  for name, layer in (("conv", conv), ("groupnorm", norm)):
    cotangent = torch.randn_like(layer(x))
    times = []
    for _ in range(rounds + 1):
      start = time.perf_counter()
      layer(x).backward(cotangent)
      times.append(time.perf_counter() - start)
    out[name] = 1e3 * statistics.median(times[1:])
  return out


PART_SHAPES = ((1, 256, 128), (4, 64, 64), (4, 64, 128), (4, 32, 128), (4, 16, 256))


def _conv_parts(rounds: int, shapes=PART_SHAPES) -> list[dict]:
  """The 3×3 conv's three parts apart (median ms): forward, input gradient, kernel gradient.

  Ours (XLA:CPU) and torch (`F.conv2d`, `torch.nn.grad.conv2d_input/_weight`), plus the
  kernel gradient as 9 matmuls [C, B·H·W] × [B·H·W, C'] over the shifted, transposed
  input (checked against XLA's, relative L2 ≤ 1e-4). Shapes: (batch, side, channels).
  """
  import jax
  import jax.numpy as jnp

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def median_ms(fn):
    fn()
    times = []
    for _ in range(rounds):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)

  rows = []
  for batch, side, channels in shapes:
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (batch, side, side, channels))
    k = jax.random.normal(keys[1], (3, 3, channels, channels)) * 0.05
    g = jax.random.normal(keys[2], (batch, side, side, channels))

    def kernel_grad_matmuls(x, g, side=side, channels=channels):
      padded = jnp.transpose(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 0, 1, 2))
      flat_g = g.reshape(-1, channels)
      return jnp.stack([padded[:, :, i:i + side, j:j + side].reshape(channels, -1) @ flat_g
                        for i in range(3) for j in range(3)]).reshape(3, 3, channels, channels)
    parts = {
        "forward": jax.jit(conv),
        "input_grad": jax.jit(lambda x, k, g: jax.vjp(lambda x: conv(x, k), x)[1](g)[0]),
        "kernel_grad": jax.jit(lambda x, k, g: jax.vjp(lambda k: conv(x, k), k)[1](g)[0]),
        "kernel_grad_matmuls": jax.jit(lambda x, k, g: kernel_grad_matmuls(x, g))}
    _check_close(parts["kernel_grad_matmuls"](x, k, g), parts["kernel_grad"](x, k, g),
                 "kernel_grad_matmuls")
    row = {"batch": batch, "side": side, "channels": channels, "ours_ms": {}}
    for name, fn in parts.items():
      inputs = (x, k) if name == "forward" else (x, k, g)
      row["ours_ms"][name] = median_ms(
          lambda fn=fn, inputs=inputs: jax.block_until_ready(fn(*inputs)))
    try:
      import torch
    except ImportError:
      row["torch_ms"] = "skipped (torch not installed)"
    else:
      from benchmarks.common import usable_cores
      torch.set_num_threads(usable_cores())
      tx = torch.randn(batch, channels, side, side)
      tk = torch.randn(channels, channels, 3, 3)
      tg = torch.randn(batch, channels, side, side)

      def torch_forward(tx=tx, tk=tk):
        with torch.no_grad():
          torch.nn.functional.conv2d(tx, tk, padding=1)
      row["torch_ms"] = {
          "forward": median_ms(torch_forward),
          "input_grad": median_ms(lambda tx=tx, tk=tk, tg=tg: torch.nn.grad.conv2d_input(
              tx.shape, tk, tg, padding=1)),
          "kernel_grad": median_ms(lambda tx=tx, tk=tk, tg=tg: torch.nn.grad.conv2d_weight(
              tx, tk.shape, tg, padding=1))}
    rows.append(row)
    print(f"  conv parts {batch}×{side}²×{channels}: ours "
          + ", ".join(f"{n} {v:.1f}" for n, v in row["ours_ms"].items()) + " ms; torch "
          + (", ".join(f"{n} {v:.1f}" for n, v in row["torch_ms"].items()) + " ms"
             if isinstance(row["torch_ms"], dict) else row["torch_ms"]), flush=True)
  return rows


def _conv_under_flags(size: int, channels: int, rounds: int) -> dict:
  """The conv's median ms in a fresh process per XLA_FLAGS setting."""
  out = {}
  for flags in FLAG_SETS:
    env = {**os.environ, "XLA_FLAGS": flags}
    code = ("import json, sys; from benchmarks import xla_cpu_remedies as r; "
            f"v, a = r._conv_variants({size}, {channels}); "
            f"print(json.dumps(r.time_variants({{'conv': v['conv']}}, a, 'conv', {rounds})))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, check=False, timeout=1800)
    lines = done.stdout.strip().splitlines()
    out[flags or "(none)"] = (json.loads(lines[-1])["conv"] if done.returncode == 0 and lines
                              else f"failed: {done.stderr.strip()[-300:]}")
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=256, help="image side of the layer")
  parser.add_argument("--channels", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--no_flags", action="store_true", help="skip the XLA_FLAGS runs")
  parser.add_argument("--out", default="benchmarks/results/xla_cpu_remedies.json")
  parser.add_argument("--only", choices=("all", "conv_parts"), default="all",
                      help="conv_parts: measure the conv's forward / input / kernel "
                           "gradients apart and update that key of an existing --out")
  args = parser.parse_args(argv)
  from benchmarks.common import environment
  if args.only == "conv_parts":
    with open(args.out) as file:
      result = json.load(file)
    result["conv_parts"] = _conv_parts(args.rounds)
    result["conv_parts_environment"] = environment()
    with open(args.out, "w") as file:
      json.dump(result, file, indent=2)
    print(f"wrote {args.out}")
    return 0
  result = {"environment": environment(), "size": args.size, "channels": args.channels,
            "rounds": args.rounds}
  result["conv_parts"] = _conv_parts(args.rounds)
  conv_variants, conv_args = _conv_variants(args.size, args.channels)
  result["conv_ms"] = time_variants(conv_variants, conv_args, "conv", args.rounds)
  result["matmul_ms"] = _matmul_ms(args.size, args.channels, args.rounds)
  gn_variants, gn_args = _groupnorm_variants(args.size, args.channels)
  result["groupnorm_ms"] = time_variants(gn_variants, gn_args, "groupnorm", args.rounds)
  result["torch_ms"] = _torch_ms(args.size, args.channels, args.rounds)
  if not args.no_flags:
    result["conv_ms_by_xla_flags"] = _conv_under_flags(args.size, args.channels, args.rounds)
  print(f"3×3 conv {args.size}²×{args.channels}, fwd+bwd (ms; ÷ conv):")
  for name, ms in result["conv_ms"].items():
    print(f"  {name:16s} {ms:8.1f}  {ms / result['conv_ms']['conv']:.2f}")
  forward_flops = 2 * args.size ** 2 * 9 * args.channels ** 2
  result["gemm_gflops"] = forward_flops / result["matmul_ms"] / 1e6
  result["conv_gflops"] = 3 * forward_flops / result["conv_ms"]["conv"] / 1e6  # fwd + 2 bwd
  print(f"  bare GEMM rate {result['gemm_gflops']:.1f} GFLOP/s; "
        f"conv fwd+bwd at {result['conv_gflops']:.1f} GFLOP/s")
  if isinstance(result["torch_ms"], dict):
    for name, group in (("conv", "conv_ms"), ("groupnorm", "groupnorm_ms")):
      print(f"  torch {name:10s} {result['torch_ms'][name]:8.1f}  "
            f"(each of ours ÷ torch: " + ", ".join(
                f"{k} {v / result['torch_ms'][name]:.2f}" for k, v in result[group].items()) + ")")
  print("GroupNorm (32 groups), fwd+bwd (ms; ÷ nnx formulation):")
  for name, ms in result["groupnorm_ms"].items():
    print(f"  {name:16s} {ms:8.1f}  {ms / result['groupnorm_ms']['groupnorm']:.2f}")
  for flags, ms in result.get("conv_ms_by_xla_flags", {}).items():
    print(f"  conv with XLA_FLAGS={flags}: {ms if isinstance(ms, str) else f'{ms:.1f} ms'}")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as file:
    json.dump(result, file, indent=2)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
