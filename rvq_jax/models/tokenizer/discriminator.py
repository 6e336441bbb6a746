"""taming-transformers' PatchGAN discriminator (`NLayerDiscriminator`), NHWC, Flax NNX.

  conv4×4 s2 (ndf) → LeakyReLU(0.2)
  → for n = 1 … n_layers: conv4×4 (stride 2, the last one stride 1) to ndf·min(2ⁿ, 8)
    → norm → LeakyReLU(0.2)
  → conv4×4 s1 → 1 channel
All convolutions pad by 1. For a 256×256 input and n_layers=3 the output is a 30×30
map of logits, each judging one ~70×70 patch.

Normalization (`norm`):
  'group' (default)  GroupNorm(num_groups): normalizes each sample on its own, so a
      sample's logit does not depend on which other samples share its batch. The result
      is then the same however the batch is split — across devices or hosts, into
      gradient-accumulation micro-batches, or whether real and fake images go through
      D in one call or two — and there are no running statistics to keep, synchronise
      or checkpoint, nor a train/eval difference. A sharded step equals the
      single-device step by construction.
  'batch'  BatchNorm, as taming. Under `jax.jit` with a sharded batch its statistics are
      global (XLA inserts the reductions), so a sharded step still equals the
      single-device step; but per-sample logits depend on the rest of the batch, a
      gradient-accumulated step differs from the full-batch step, code using
      `shard_map` must pass `axis_name`, and the running mean/variance (`nnx.BatchStat`)
      are extra mutable state: training mode by default, use
      `nnx.view(model, use_running_average=True)` to evaluate with running statistics.
  'none'   no normalization; the convolutions then get biases.
With a norm the convolutions before it have no bias (the norm's shift replaces it).

Weights: variance scaling (LeCun normal, Flax's default), not taming's N(0, 0.02).
Logical axis names as in `rvq_jax.models.tokenizer.vqgan` (conv names and 'norm').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.layers import partitioning
from rvq_jax.models.layers.dtypes import Dtype
from rvq_jax.models.tokenizer import vqgan

DISCRIMINATOR_NORMS = ("group", "batch", "none")
LEAKY_RELU_SLOPE = 0.2
# PyTorch's GroupNorm/BatchNorm default epsilon (taming's discriminator uses PyTorch's).
DISCRIMINATOR_NORM_EPSILON = 1e-5


def patch_grid_size(size: int, n_layers: int) -> int:
  """Output height (or width) of the discriminator for an input of height `size`.

  Each k4 s2 p1 conv maps s → ⌊s/2⌋ and each k4 s1 p1 conv maps s → s − 1.
  """
  for _ in range(n_layers):  # first conv + the n_layers − 1 stride-2 layers
    size //= 2
  return size - 2  # the stride-1 layer and the output conv


class _ConvNormBlock(nnx.Module):
  """conv4×4 → norm → LeakyReLU(0.2)."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, *,
               num_groups: int, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = vqgan.conv(in_channels, out_channels, 4, stride=stride, padding=1,
                           use_bias=norm == "none", **kw)
    if norm == "group":
      self.norm = vqgan.group_norm(out_channels, num_groups=num_groups,
                                   epsilon=DISCRIMINATOR_NORM_EPSILON, **kw)
    elif norm == "batch":
      # Flax momentum 0.9 is PyTorch's momentum 0.1.
      self.norm = nnx.BatchNorm(
          out_channels, momentum=0.9, epsilon=DISCRIMINATOR_NORM_EPSILON,
          use_fast_variance=False, **kw,
          scale_metadata=partitioning.logical(*partitioning.NORM_AXES),
          bias_metadata=partitioning.logical(*partitioning.NORM_AXES))
    else:
      self.norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv(x)
    if self.norm is not None:
      h = self.norm(h)
    return jax.nn.leaky_relu(h, LEAKY_RELU_SLOPE)


class NLayerDiscriminator(nnx.Module):
  """PatchGAN: images [B, H, W, in_channels] → logits [B, H', W', 1].

  H' = patch_grid_size(H, n_layers) (30 for 256 and n_layers=3). Raises ValueError for
  an unknown `norm`, a GroupNorm channel count not divisible by `num_groups`, and (when
  called) an input too small to leave at least one output patch.
  """

  def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
               norm: str = "group", num_groups: int = vqgan.NORM_GROUPS,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    if norm not in DISCRIMINATOR_NORMS:
      raise ValueError(f"norm must be one of {DISCRIMINATOR_NORMS}, got {norm!r}.")
    for name, value in (("in_channels", in_channels), ("ndf", ndf),
                        ("n_layers", n_layers)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    widths = [ndf * min(2**n, 8) for n in range(n_layers + 1)]
    if norm == "group" and any(w % num_groups for w in widths[1:]):
      raise ValueError(
          f"norm='group' needs every normalized width {tuple(widths[1:])} (ndf={ndf}) "
          f"divisible by num_groups={num_groups}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.n_layers = n_layers
    self.norm = norm
    self.conv_in = vqgan.conv(in_channels, ndf, 4, stride=2, padding=1, **kw)
    self.blocks = nnx.List([
        _ConvNormBlock(widths[n - 1], widths[n], 2 if n < n_layers else 1, norm,
                       num_groups=num_groups, **kw)
        for n in range(1, n_layers + 1)])
    self.conv_out = vqgan.conv(widths[-1], 1, 4, stride=1, padding=1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] → logits [B, H', W', 1] in the compute dtype."""
    if x.ndim != 4:
      raise ValueError(f"expected images [B, H, W, C], got shape {x.shape}.")
    if min(patch_grid_size(x.shape[1], self.n_layers),
           patch_grid_size(x.shape[2], self.n_layers)) < 1:
      raise ValueError(f"input {x.shape[1]}×{x.shape[2]} is too small for a "
                       f"{self.n_layers}-layer PatchGAN (no output patch is left).")
    h = jax.nn.leaky_relu(self.conv_in(x), LEAKY_RELU_SLOPE)
    for block in self.blocks:
      h = block(h)
    return self.conv_out(h)
