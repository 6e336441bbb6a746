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
      D in one call or two — and there is no train/eval difference.
  'batch'  taming's BatchNorm2d (`BatchStatNorm`): each channel is normalized with the
      mean and (biased) variance of the batch D is called on, over batch, height and
      width. taming's discriminator always runs in training mode and is called
      separately on the real and the fake batch (and on the fakes alone for the
      generator's loss), so every call normalizes with its own batch's statistics; the
      tokenizer stage calls D the same way. No running averages are kept: in training
      taming never reads them (only its logged validation losses do, in eval mode), and
      nothing here runs D outside training, so they would be dead state — D's state is
      its parameters alone, as with 'group', and checkpoints hold nothing more. Under
      `jax.jit` with a data-parallel sharded batch the statistics are those of the
      global batch (XLA inserts the cross-device reductions), so a sharded step equals
      the single-device step; inside `jax.shard_map` pass `axis_name`. A sample's logit
      depends on the rest of its batch, so a gradient-accumulated step would differ
      from the full-batch one.
  'none'   no normalization; the convolutions then get biases.
With a norm the convolutions before it have no bias (the norm's shift replaces it).

Initialization (`init`):
  'default'  Flax's: variance-scaling (LeCun normal) kernels, zero biases, unit norm
      scales, zero norm biases.
  'taming'   taming's `weights_init`, which it applies to every submodule by class name:
      conv kernels N(0, 0.02), norm scales N(1, 0.02), norm biases 0. Conv biases (the
      first and last conv, or every conv with norm='none') are left at PyTorch's default,
      U(±1/√fan_in), which `weights_init` does not touch. taming only has BatchNorm (or
      ActNorm); with norm='group' the GroupNorm gets the same N(1, 0.02) scales.
Logical axis names as in `rvq_jax.models.tokenizer.vqgan` (conv names and 'norm').

Dtypes and rematerialization as the VQGAN's: parameters in `param_dtype` (float32),
convolutions in `dtype` (e.g. bfloat16), normalization statistics in float32; `remat`
('none' | 'blocks' | 'full', `rvq_jax.models.layers.remat`) checkpoints each
conv → (norm →) LeakyReLU layer on its own.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.layers import partitioning
from rvq_jax.models.layers import remat as remat_lib
from rvq_jax.models.layers.dtypes import Dtype
from rvq_jax.models.tokenizer import vqgan

DISCRIMINATOR_NORMS = ("group", "batch", "none")
DISCRIMINATOR_INITS = ("default", "taming")
# taming's weights_init: N(0, 0.02) conv kernels, N(1, 0.02) norm scales.
TAMING_INIT_STDDEV = 0.02
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


class BatchStatNorm(nnx.Module):
  """PyTorch's BatchNorm2d in training mode, without running averages.

  x [..., C] → (x − μ_c) / √(σ²_c + ε) · scale_c + bias_c, where μ_c and the biased σ²_c
  are taken over every axis but the last, of the batch this call sees (see the module
  docstring for why nothing else is kept). Statistics in float32, two-pass variance.
  Global under `jax.jit` with a sharded batch; `axis_name` averages them over a
  `shard_map`/`pmap` axis (equal-sized shards).
  """

  def __init__(self, num_features: int, *, epsilon: float = DISCRIMINATOR_NORM_EPSILON,
               axis_name: str | None = None, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.epsilon = epsilon
    self.axis_name = axis_name
    self.dtype = dtype
    self.scale = partitioning.param(jnp.ones((num_features,), param_dtype),
                                    *partitioning.NORM_AXES)
    self.bias = partitioning.param(jnp.zeros((num_features,), param_dtype),
                                   *partitioning.NORM_AXES)

  def standardize(self, x: jax.Array) -> jax.Array:
    """The normalized activations before the affine map: [..., C] float32."""
    x = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    if self.axis_name is not None:
      mean = jax.lax.pmean(mean, self.axis_name)
    centered = x - mean
    var = jnp.mean(jnp.square(centered), axis=axes)
    if self.axis_name is not None:
      var = jax.lax.pmean(var, self.axis_name)
    return centered * jax.lax.rsqrt(var + self.epsilon)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] (any rank, channels last) → same shape, in the compute dtype."""
    y = self.standardize(x) * self.scale[...].astype(jnp.float32)
    return (y + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class _ConvNormBlock(nnx.Module):
  """conv4×4 → norm → LeakyReLU(0.2)."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, *,
               num_groups: int, axis_name: str | None, dtype: Dtype, param_dtype: Dtype,
               remat: str = "none", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat_lib.check_mode(remat)
    self.conv = vqgan.conv(in_channels, out_channels, 4, stride=stride, padding=1,
                           use_bias=norm == "none", **kw)
    if norm == "group":
      self.norm = vqgan.group_norm(out_channels, num_groups=num_groups,
                                   epsilon=DISCRIMINATOR_NORM_EPSILON, **kw)
    elif norm == "batch":
      self.norm = BatchStatNorm(out_channels, axis_name=axis_name, dtype=dtype,
                                param_dtype=param_dtype)
    else:
      self.norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    return remat_lib.call(self.remat, _ConvNormBlock.forward, self, x)

  def forward(self, x: jax.Array) -> jax.Array:
    """`__call__` without rematerialization."""
    h = self.conv(x)
    if self.norm is not None:
      h = self.norm(h)
    return jax.nn.leaky_relu(h, LEAKY_RELU_SLOPE)


class NLayerDiscriminator(nnx.Module):
  """PatchGAN: images [B, H, W, in_channels] → logits [B, H', W', 1].

  H' = patch_grid_size(H, n_layers) (30 for 256 and n_layers=3). `norm` is one of
  `DISCRIMINATOR_NORMS`, `init` one of `DISCRIMINATOR_INITS` (see the module docstring);
  `axis_name` is for norm='batch' inside `shard_map` only. Raises ValueError for an
  unknown `norm` or `init`, a GroupNorm channel count not divisible by `num_groups`, and
  (when called) an input too small to leave at least one output patch.
  """

  def __init__(self, *, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
               norm: str = "group", init: str = "default",
               num_groups: int = vqgan.NORM_GROUPS, axis_name: str | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    if norm not in DISCRIMINATOR_NORMS:
      raise ValueError(f"norm must be one of {DISCRIMINATOR_NORMS}, got {norm!r}.")
    if init not in DISCRIMINATOR_INITS:
      raise ValueError(f"init must be one of {DISCRIMINATOR_INITS}, got {init!r}.")
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
    self.remat = remat_lib.check_mode(remat)
    self.conv_in = vqgan.conv(in_channels, ndf, 4, stride=2, padding=1, **kw)
    self.blocks = nnx.List([
        _ConvNormBlock(widths[n - 1], widths[n], 2 if n < n_layers else 1, norm,
                       num_groups=num_groups, axis_name=axis_name, remat=remat, **kw)
        for n in range(1, n_layers + 1)])
    self.conv_out = vqgan.conv(widths[-1], 1, 4, stride=1, padding=1, **kw)
    if init == "taming":
      _taming_init(self, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] → logits [B, H', W', 1] in the compute dtype."""
    if x.ndim != 4:
      raise ValueError(f"expected images [B, H, W, C], got shape {x.shape}.")
    if min(patch_grid_size(x.shape[1], self.n_layers),
           patch_grid_size(x.shape[2], self.n_layers)) < 1:
      raise ValueError(f"input {x.shape[1]}×{x.shape[2]} is too small for a "
                       f"{self.n_layers}-layer PatchGAN (no output patch is left).")
    h = remat_lib.call(self.remat, _first_layer, self.conv_in, x)
    for block in self.blocks:
      h = block(h)
    return self.conv_out(h)


def _first_layer(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """conv4×4 s2 → LeakyReLU(0.2), the layer before the normalized ones."""
  return jax.nn.leaky_relu(conv(x), LEAKY_RELU_SLOPE)


def _taming_init(module: nnx.Module, rngs: nnx.Rngs) -> None:
  """Re-draws `module`'s parameters as taming's `weights_init` (see the module docstring).

  Like taming's `discriminator.apply(weights_init)`, a pass over every submodule after
  construction, by type: convolutions and norms.
  """
  for _, sub in nnx.iter_modules(module):
    if isinstance(sub, nnx.Conv):
      kernel = sub.kernel
      kernel[...] = TAMING_INIT_STDDEV * jax.random.normal(rngs.params(), kernel.shape,
                                                           kernel.dtype)
      if sub.bias is not None:
        # PyTorch's Conv2d bias default, which weights_init leaves in place.
        bound = 1.0 / (sub.in_features * math.prod(sub.kernel_size)) ** 0.5
        sub.bias[...] = jax.random.uniform(rngs.params(), sub.bias.shape, sub.bias.dtype,
                                           -bound, bound)
    elif isinstance(sub, (nnx.GroupNorm, BatchStatNorm)):
      sub.scale[...] = 1.0 + TAMING_INIT_STDDEV * jax.random.normal(
          rngs.params(), sub.scale.shape, sub.scale.dtype)
      sub.bias[...] = jnp.zeros(sub.bias.shape, sub.bias.dtype)
