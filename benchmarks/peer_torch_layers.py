"""Which layers of the tokenizer step XLA:CPU loses to PyTorch: a per-layer profile.

A script, not a test: `python -m benchmarks.peer_torch_layers --size r64` (see
benchmarks/README.md). Needs torch.

It runs the PyTorch peer's step once with forward hooks on every convolution, GroupNorm
and linear layer to list the layers the step calls (kind, shapes, stride, padding) and how
often, then times each distinct layer alone, forward + backward (input and weight
gradients; frozen VGG16 layers input gradients only, and the first conv of D on real
images weight gradients only are ignored: every layer is timed with both), in JAX
(`jax.jit`, NHWC, the same `lax.conv_general_dilated` / GroupNorm formulation as
rvq_jax's layers) and in PyTorch (NCHW), interleaved. The table sums time × count per
layer group, so a group's share of the step and its JAX ÷ torch time ratio show where
XLA:CPU loses. With `--xla-variants` each group is also timed with XLA's alternatives
(NCHW layouts for the convolutions, a one-pass-variance GroupNorm).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import peer_torch
from benchmarks.common import environment
from benchmarks.common import usable_cores

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def layer_calls(config):
  """[(signature, count)] of the torch peer's conv / GroupNorm / linear calls in one step."""
  import torch
  from torch import nn
  torch.manual_seed(0)
  tokenizer, discriminator, lpips = peer_torch.torch_tokenizer_modules(config)
  step = peer_torch.torch_tokenizer_step(config, tokenizer, discriminator, lpips)
  counts = collections.Counter()
  where = {}

  def hook(name, group):
    def fn(module, inputs, output):
      x = inputs[0]
      if isinstance(module, nn.Conv2d):
        sig = ("conv", tuple(x.shape), module.out_channels, module.kernel_size[0],
               module.stride[0], module.padding[0] if isinstance(module.padding, tuple)
               else module.padding, module.bias is not None)
      elif isinstance(module, nn.GroupNorm):
        sig = ("groupnorm", tuple(x.shape), module.num_groups, module.eps)
      else:
        sig = ("linear", tuple(x.shape), module.out_features)
      counts[sig] += 1
      where.setdefault(sig, set()).add(group)
    return fn

  handles = []
  for group, net in (("G", tokenizer), ("D", discriminator), ("LPIPS", lpips)):
    if net is None:
      continue
    for name, module in net.named_modules():
      if isinstance(module, (nn.Conv2d, nn.GroupNorm, nn.Linear)):
        handles.append(module.register_forward_hook(hook(name, group)))
  size = config.data.image_size
  step(torch.rand(config.tokenizer.train.batch_size, 3, size, size) * 2 - 1)
  for handle in handles:
    handle.remove()
  return [(sig, count, sorted(where[sig])) for sig, count in counts.items()]


def group_of(sig, owners) -> str:
  owner = "/".join(owners)
  if sig[0] == "conv":
    _, shape, _, k, stride, _, _ = sig
    return f"{owner} conv{k}x{k}" + (f" s{stride}" if stride > 1 else "")
  return f"{owner} {sig[0]}"


def jax_layer(sig, variant: str = "default"):
  """A jitted fwd+bwd of the layer (cotangent fixed), and its arguments."""
  key = jax.random.key(0)
  if sig[0] == "conv":
    _, (b, c, h, w), out, k, stride, pad, bias = sig
    if variant == "nchw":
      x = jax.random.normal(key, (b, c, h, w))
      kernel = jax.random.normal(key, (out, c, k, k)) * 0.05
      numbers = ("NCHW", "OIHW", "NCHW")
    else:
      x = jax.random.normal(key, (b, h, w, c))
      kernel = jax.random.normal(key, (k, k, c, out)) * 0.05
      numbers = ("NHWC", "HWIO", "NHWC")
    padding = ((0, 1), (0, 1)) if (pad == 0 and stride == 2 and k == 3) else ((pad, pad),) * 2

    def f(x, kernel):
      return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                          dimension_numbers=numbers)
    args = (x, kernel)
  elif sig[0] == "groupnorm":
    _, (b, c, h, w), groups, eps = sig
    x = jax.random.normal(key, (b, h, w, c))
    scale, shift = jnp.ones((c,)), jnp.zeros((c,))

    def f(x, scale, shift):
      xg = x.reshape(b, h, w, groups, c // groups)
      mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
      if variant == "fast_variance":
        var = jnp.mean(jnp.square(xg), axis=(1, 2, 4), keepdims=True) - jnp.square(mean)
      else:
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
      y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
      return y * scale + shift
    args = (x, scale, shift)
  else:
    _, shape, out = sig
    x = jax.random.normal(key, shape)
    kernel = jax.random.normal(key, (shape[-1], out)) * 0.05

    def f(x, kernel):
      return x @ kernel
    args = (x, kernel)
  cotangent = jax.random.normal(jax.random.key(1), jax.eval_shape(f, *args).shape)

  def fwd_bwd(*args):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(cotangent)

  compiled = jax.jit(fwd_bwd).lower(*args).compile()
  return lambda: jax.block_until_ready(compiled(*args))


def torch_layer(sig):
  import torch
  import torch.nn.functional as F
  if sig[0] == "conv":
    _, (b, c, h, w), out, k, stride, pad, bias = sig
    x = torch.randn(b, c, h, w, requires_grad=True)
    conv = torch.nn.Conv2d(c, out, k, stride=stride, padding=pad, bias=bias)
    asym = pad == 0 and stride == 2 and k == 3

    def f():
      return conv(F.pad(x, (0, 1, 0, 1)) if asym else x)
    params = [x, *conv.parameters()]
  elif sig[0] == "groupnorm":
    _, shape, groups, eps = sig
    x = torch.randn(*shape, requires_grad=True)
    norm = torch.nn.GroupNorm(groups, shape[1], eps=eps)
    f = lambda: norm(x)  # noqa: E731
    params = [x, *norm.parameters()]
  else:
    _, shape, out = sig
    x = torch.randn(*shape, requires_grad=True)
    linear = torch.nn.Linear(shape[-1], out, bias=True)
    f = lambda: linear(x)  # noqa: E731
    params = [x, *linear.parameters()]
  with torch.no_grad():
    cotangent = torch.randn_like(f())

  def run():
    out = f()
    torch.autograd.grad(out, params, cotangent)
  return run


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", default="r64", help=", ".join(peer_torch.SIZES))
  parser.add_argument("--batch", type=int, default=0)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--xla-variants", action="store_true")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  import torch
  torch.set_num_threads(usable_cores())
  config = peer_torch.size_config(args.size, args.batch or None)
  calls = layer_calls(config)
  rows = []
  for sig, count, owners in calls:
    fns = {"jax": jax_layer(sig), "torch": torch_layer(sig)}
    if args.xla_variants:
      if sig[0] == "conv":
        fns["jax_nchw"] = jax_layer(sig, "nchw")
      elif sig[0] == "groupnorm":
        fns["jax_fast_variance"] = jax_layer(sig, "fast_variance")
    warm = {}
    for name, fn in fns.items():
      fn()
      start = time.perf_counter()
      fn()
      warm[name] = time.perf_counter() - start
    calls_per = {name: peer_torch.calls_for(s, 0.05) for name, s in warm.items()}
    times = peer_torch.interleaved(fns, args.rounds, calls_per)
    row = {"signature": sig, "count": count, "owners": owners, "group": group_of(sig, owners),
           **{f"{name}_s": statistics.median(t) for name, t in times.items()},
           "jax_over_torch": peer_torch.ratio(times, "jax", "torch")}
    rows.append(row)
    print(f"{row['group']:>24} {str(sig):>60} ×{count}: jax {row['jax_s'] * 1e3:.2f} ms, "
          f"torch {row['torch_s'] * 1e3:.2f} ms, ÷ {row['jax_over_torch']:.2f}"
          + "".join(f", {n} {row[n + '_s'] * 1e3:.2f} ms" for n in fns
                    if n not in ("jax", "torch")), flush=True)
  groups = collections.defaultdict(lambda: collections.defaultdict(float))
  for row in rows:
    for name in [k[:-2] for k in row if k.endswith("_s")]:
      groups[row["group"]][name] += row[f"{name}_s"] * row["count"]
    groups[row["group"]]["count"] += row["count"]
  total = {name: sum(g.get(name, 0.0) for g in groups.values()) for name in ("jax", "torch")}
  variant_names = sorted({k for g in groups.values() for k in g}
                         - {"jax", "torch", "count"})
  lines = [f"Layers of one {args.size} step (batch {config.tokenizer.train.batch_size}), each "
           "timed alone fwd+bwd; ms = median time × calls per step", "",
           "| layer group | calls | JAX ms | torch ms | JAX ÷ torch | JAX − torch ms | "
           + "".join(f"{n} ms | " for n in variant_names),
           "| --- | ---: | ---: | ---: | ---: | ---: | " + "---: | " * len(variant_names)]
  for name, g in sorted(groups.items(), key=lambda kv: -(kv[1]["jax"] - kv[1]["torch"])):
    lines.append(f"| {name} | {int(g['count'])} | {g['jax'] * 1e3:.1f} | "
                 f"{g['torch'] * 1e3:.1f} | {g['jax'] / g['torch']:.2f} | "
                 f"{(g['jax'] - g['torch']) * 1e3:+.1f} | "
                 + "".join(f"{g[n] * 1e3:.1f} | " if n in g else "— | "
                           for n in variant_names))
  lines.append(f"| **all** | | {total['jax'] * 1e3:.1f} | {total['torch'] * 1e3:.1f} | "
               f"{total['jax'] / total['torch']:.2f} | "
               f"{(total['jax'] - total['torch']) * 1e3:+.1f} | " + "— | " * len(variant_names))
  text = "\n".join(lines)
  print("\n" + text)
  out = args.out or os.path.join(_REPO, "benchmarks", "results",
                                 f"peer_torch_layers_{args.size}.json")
  with open(out, "w") as f:
    json.dump({"settings": vars(args), "rows": rows, "table_markdown": text,
               "environment": environment(torch="torch")}, f, indent=1, default=str)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
