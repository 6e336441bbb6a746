"""taming-transformers' VQGAN encoder and decoder (NHWC), in Flax NNX.

Architecture (Esser et al., "Taming Transformers", the convolutional autoencoder that
VQGAN, Reg-VQ and FQGAN's trunk share):

  Encoder  conv_in 3×3 → for each level i of `ch_mult`: `num_res_blocks` ResnetBlocks
           (each followed by an AttnBlock when the level's resolution is listed in
           `attn_resolutions`), then a Downsample except after the last level
           → mid (ResnetBlock, AttnBlock, ResnetBlock) → GroupNorm → swish → conv_out 3×3
           to `z_channels`.
  Decoder  the mirror: conv_in 3×3 from `z_channels` → mid → for each level from the
           deepest: `num_res_blocks + 1` ResnetBlocks (+ AttnBlocks), an Upsample except
           after the shallowest level → GroupNorm → swish → conv_out 3×3 to the image
           channels. No tanh on the output (as taming's default).

The downsampling factor is f = 2**(len(ch_mult) - 1): the paper configurations use
f ∈ {4, 8, 16}; any f ≥ 1 builds. Parameter paths follow taming's names (`conv_in`,
`down[i].block[j]`, `down[i].attn[j]`, `down[i].downsample`, `mid.block_1`, `mid.attn_1`,
`mid.block_2`, `norm_out`, `conv_out`, and `up[i]...` with `up` indexed by level, so
`up[0]` runs last) so that a converter from taming/LlamaGen checkpoints is a renaming.
The 1×1 pre-/post-quantization convolutions belong to the tokenizer model, not here.

Dtypes: parameters are stored in `param_dtype` (float32 by default) and every layer
computes in `dtype` (e.g. bfloat16). Normalization statistics and attention softmaxes are
always computed in float32.

Rematerialization: `remat` ('none' | 'blocks' | 'full', see
`rvq_jax.models.layers.remat`) checkpoints every ResnetBlock, AttnBlock, Upsample and
Downsample on its own, so the backward pass keeps (a part of) each block's input only.

Logical axis names on parameters (metadata `out_sharding`, see
`rvq_jax.models.layers.partitioning`; the FQ adapter in `factorized_adapter.py` and the
discriminator use the same names):
  conv kernels       (None, None, 'conv_in', 'conv_out')   [kh, kw, C_in, C_out]
  conv biases        ('conv_out',)
  norm scale / bias  ('norm',)   GroupNorm, LayerNorm, BatchNorm — tiny, left replicated
  attention q/k/v    ('embed', 'heads', 'kv')               [C, heads, head_dim]
  attention q/k/v b  ('heads', 'kv')
  attention output   ('heads', 'kv', 'embed'), bias ('embed',)
  MLP in / out       ('embed', 'mlp') / ('mlp', 'embed'), biases ('mlp',) / ('embed',)
  position embedding ('position', 'embed')                  [h·w, C]
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.layers import partitioning
from rvq_jax.models.layers import remat as remat_lib
from rvq_jax.models.layers.dtypes import Dtype
from rvq_jax.models.layers.partitioning import CONV_BIAS_AXES
from rvq_jax.models.layers.partitioning import CONV_KERNEL_AXES
from rvq_jax.models.layers.partitioning import NORM_AXES

# taming's Normalize(): GroupNorm(num_groups=32, eps=1e-6, affine=True).
NORM_GROUPS = 32
NORM_EPSILON = 1e-6



def swish(x: jax.Array) -> jax.Array:
  """x · sigmoid(x) (taming's `nonlinearity`)."""
  return jax.nn.silu(x)


def conv(in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
         padding: Any = "SAME", use_bias: bool = True, dtype: Dtype = jnp.float32,
         param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """A square NHWC convolution whose kernel and bias carry logical axis names."""
  return nnx.Conv(
      in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
      padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      kernel_metadata=partitioning.logical(*CONV_KERNEL_AXES),
      bias_metadata=partitioning.logical(*CONV_BIAS_AXES))


def group_norm(channels: int, *, num_groups: int = NORM_GROUPS,
               epsilon: float = NORM_EPSILON, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm over the channel axis with annotated scale and bias.

  `use_fast_variance=False`: E[x²] − E[x]² loses precision when activations have a
  large mean (common deep in a conv net); the two-pass variance matches PyTorch.
  """
  if channels % num_groups:
    raise ValueError(f"GroupNorm with {num_groups} groups needs a channel count divisible "
                     f"by {num_groups}, got {channels} channels.")
  return nnx.GroupNorm(
      channels, num_groups=num_groups, epsilon=epsilon, dtype=dtype,
      param_dtype=param_dtype, use_fast_variance=False, rngs=rngs,
      scale_metadata=partitioning.logical(*NORM_AXES),
      bias_metadata=partitioning.logical(*NORM_AXES))


class ResnetBlock(nnx.Module):
  """GroupNorm → swish → conv3×3 → GroupNorm → swish → dropout → conv3×3, plus a skip.

  The skip is the identity when the channel count is unchanged, else a 1×1 convolution
  (taming's `nin_shortcut`). Dropout (rate > 0 only) follows `nnx.Dropout` conventions:
  active by default, off in `nnx.view(model, deterministic=True)`.
  """

  def __init__(self, in_channels: int, out_channels: int | None = None, *,
               dropout: float = 0.0, num_groups: int = NORM_GROUPS,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    out_channels = in_channels if out_channels is None else out_channels
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat_lib.check_mode(remat)
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.norm1 = group_norm(in_channels, num_groups=num_groups, **kw)
    self.conv1 = conv(in_channels, out_channels, 3, padding=1, **kw)
    self.norm2 = group_norm(out_channels, num_groups=num_groups, **kw)
    # No RNG state at all when dropout is off (taming's default), so checkpoints of
    # dropout-free models hold parameters only.
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.conv2 = conv(out_channels, out_channels, 3, padding=1, **kw)
    self.nin_shortcut = (conv(in_channels, out_channels, 1, padding=0, **kw)
                         if in_channels != out_channels else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C_in] → [B, H, W, C_out]."""
    return remat_lib.call(self.remat, ResnetBlock.forward, self, x)

  def forward(self, x: jax.Array) -> jax.Array:
    """`__call__` without rematerialization."""
    h = self.conv1(swish(self.norm1(x)))
    h = swish(self.norm2(h))
    if self.dropout is not None:
      h = self.dropout(h)
    h = self.conv2(h)
    skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return skip.astype(h.dtype) + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all H·W positions, with a residual connection.

  h = GroupNorm(x); q, k, v = 1×1 convs of h; out = x + proj_out(softmax(q kᵀ/√C) v).
  """

  def __init__(self, channels: int, *, num_groups: int = NORM_GROUPS,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat_lib.check_mode(remat)
    self.channels = channels
    self.dtype = dtype
    self.norm = group_norm(channels, num_groups=num_groups, **kw)
    self.q = conv(channels, channels, 1, padding=0, **kw)
    self.k = conv(channels, channels, 1, padding=0, **kw)
    self.v = conv(channels, channels, 1, padding=0, **kw)
    self.proj_out = conv(channels, channels, 1, padding=0, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, H, W, C]."""
    return remat_lib.call(self.remat, AttnBlock.forward, self, x)

  def forward(self, x: jax.Array) -> jax.Array:
    """`__call__` without rematerialization."""
    batch, height, width, channels = x.shape
    h = self.norm(x)
    q = self.q(h).reshape(batch, height * width, channels)
    k = self.k(h).reshape(batch, height * width, channels)
    v = self.v(h).reshape(batch, height * width, channels)
    # Logits and softmax in float32: with bfloat16 compute, a softmax over thousands of
    # positions (64×64 maps) would otherwise lose most of its mantissa.
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * channels**-0.5, axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(batch, height, width, channels)
    return x.astype(h.dtype) + self.proj_out(h)


class Downsample(nnx.Module):
  """Halves H and W: zero-pad one row/column at the bottom/right, then conv3×3 stride 2.

  The asymmetric (0, 1, 0, 1) padding is taming's (PyTorch's symmetric padding=1 would
  shift the sampling grid by half a pixel relative to checkpoints trained with it).
  """

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    self.remat = remat_lib.check_mode(remat)
    self.conv = conv(channels, channels, 3, stride=2, padding=((0, 1), (0, 1)),
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, H//2, W//2, C] (for even H, W)."""
    return remat_lib.call(self.remat, Downsample.forward, self, x)

  def forward(self, x: jax.Array) -> jax.Array:
    """`__call__` without rematerialization."""
    return self.conv(x)


class Upsample(nnx.Module):
  """Doubles H and W: nearest-neighbour ×2, then conv3×3."""

  def __init__(self, channels: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    self.remat = remat_lib.check_mode(remat)
    self.conv = conv(channels, channels, 3, padding=1, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, 2H, 2W, C]."""
    # Checkpointed, only the half-size input is kept, not the repeated map the conv reads.
    return remat_lib.call(self.remat, Upsample.forward, self, x)

  def forward(self, x: jax.Array) -> jax.Array:
    """`__call__` without rematerialization."""
    # Nearest ×2 is exactly a repeat; cheaper and exact versus a generic resize.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)


class MidBlock(nnx.Module):
  """ResnetBlock → AttnBlock → ResnetBlock at the lowest resolution."""

  def __init__(self, channels: int, *, dropout: float = 0.0, num_groups: int = NORM_GROUPS,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    kw = dict(num_groups=num_groups, dtype=dtype, param_dtype=param_dtype, remat=remat,
              rngs=rngs)
    self.block_1 = ResnetBlock(channels, channels, dropout=dropout, **kw)
    self.attn_1 = AttnBlock(channels, **kw)
    self.block_2 = ResnetBlock(channels, channels, dropout=dropout, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, h, w, C] → [B, h, w, C]."""
    return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nnx.Module):
  """One resolution level: ResnetBlocks (each optionally followed by attention) and an
  optional resampling layer."""

  def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock],
               resample: nnx.Module | None, resample_name: str):
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    self.resample_name = resample_name
    setattr(self, resample_name, resample)

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, block in enumerate(self.block):
      x = block(x)
      if self.attn:
        x = self.attn[i](x)
    resample = getattr(self, self.resample_name)
    return x if resample is None else resample(x)


def validate_autoencoder_config(*, in_channels: int, ch: int, ch_mult: Sequence[int],
                                num_res_blocks: int, attn_resolutions: Sequence[int],
                                resolution: int, z_channels: int, dropout: float,
                                num_groups: int) -> None:
  """Raises ValueError, naming the offending argument, for an unbuildable config."""
  ch_mult = tuple(ch_mult)
  if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
    raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult}.")
  for name, value in (("in_channels", in_channels), ("ch", ch), ("z_channels", z_channels),
                      ("resolution", resolution), ("num_res_blocks", num_res_blocks),
                      ("num_groups", num_groups)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
  for mult in (1,) + ch_mult:
    if (ch * mult) % num_groups:
      raise ValueError(
          f"every channel count ch * mult must be divisible by the {num_groups} GroupNorm "
          f"groups, but ch={ch} with multiplier {mult} gives {ch * mult} channels.")
  factor = 2 ** (len(ch_mult) - 1)
  if resolution % factor:
    raise ValueError(
        f"resolution {resolution} is not divisible by the downsampling factor f={factor} "
        f"(= 2**(len(ch_mult) - 1) for ch_mult={ch_mult}).")
  visited = [resolution // 2**i for i in range(len(ch_mult))]
  unknown = [r for r in attn_resolutions if r not in visited]
  if unknown:
    # taming silently ignores these; a typo would otherwise drop attention unnoticed.
    raise ValueError(f"attn_resolutions {tuple(unknown)} are not among the resolutions the "
                     f"network visits, {tuple(visited)}.")


class EncoderTrunk(nnx.Module):
  """The encoder up to and including the mid block (shared by the FQ branches).

  Image [B, H, W, in_channels] → features [B, H/f, W/f, ch * ch_mult[-1]].
  """

  def __init__(self, *, in_channels: int = 3, ch: int = 128,
               ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
               attn_resolutions: Sequence[int] = (16,), resolution: int = 256,
               z_channels: int = 256, dropout: float = 0.0,
               num_groups: int = NORM_GROUPS, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    ch_mult = tuple(ch_mult)
    attn_resolutions = tuple(attn_resolutions)
    validate_autoencoder_config(
        in_channels=in_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        attn_resolutions=attn_resolutions, resolution=resolution, z_channels=z_channels,
        dropout=dropout, num_groups=num_groups)
    self.in_channels = in_channels
    self.ch_mult = ch_mult
    self.resolution = resolution
    self.z_channels = z_channels
    self.downsampling_factor = 2 ** (len(ch_mult) - 1)
    self.latent_resolution = resolution // self.downsampling_factor
    self.trunk_channels = ch * ch_mult[-1]
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    block_kw = dict(dropout=dropout, num_groups=num_groups, remat=remat, **kw)

    self.conv_in = conv(in_channels, ch, 3, padding=1, **kw)
    levels = []
    channels, current_resolution = ch, resolution
    for i, mult in enumerate(ch_mult):
      blocks, attns = [], []
      for _ in range(num_res_blocks):
        blocks.append(ResnetBlock(channels, ch * mult, **block_kw))
        channels = ch * mult
        if current_resolution in attn_resolutions:
          attns.append(AttnBlock(channels, num_groups=num_groups, remat=remat, **kw))
      downsample = None
      if i != len(ch_mult) - 1:
        downsample = Downsample(channels, remat=remat, **kw)
        current_resolution //= 2
      levels.append(_Level(blocks, attns, downsample, "downsample"))
    self.down = nnx.List(levels)
    self.mid = MidBlock(channels, **block_kw)

  def _check_image(self, x: jax.Array) -> None:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected images [B, H, W, {self.in_channels}], got shape {x.shape}.")
    f = self.downsampling_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f"image size {x.shape[1]}×{x.shape[2]} is not divisible by the "
                       f"downsampling factor f={f}.")

  def trunk(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] → [B, H/f, W/f, trunk_channels]."""
    self._check_image(x)
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    return self.mid(h)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] → [B, H/f, W/f, trunk_channels]."""
    return self.trunk(x)


class Encoder(EncoderTrunk):
  """taming's Encoder: image [B, H, W, in_channels] → z [B, H/f, W/f, z_channels].

  Arguments as taming's (`double_z` is always False, as for VQ models); `num_groups` is
  the GroupNorm group count (32 in taming). Raises ValueError for a config that cannot be
  built (see `validate_autoencoder_config`) and, when called, for images whose size is
  not a multiple of f.
  """

  def __init__(self, *, in_channels: int = 3, ch: int = 128,
               ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
               attn_resolutions: Sequence[int] = (16,), resolution: int = 256,
               z_channels: int = 256, dropout: float = 0.0,
               num_groups: int = NORM_GROUPS, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    super().__init__(in_channels=in_channels, ch=ch, ch_mult=ch_mult,
                     num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                     resolution=resolution, z_channels=z_channels, dropout=dropout,
                     num_groups=num_groups, dtype=dtype, param_dtype=param_dtype,
                     remat=remat, rngs=rngs)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm_out = group_norm(self.trunk_channels, num_groups=num_groups, **kw)
    self.conv_out = conv(self.trunk_channels, z_channels, 3, padding=1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in_channels] → [B, H/f, W/f, z_channels]."""
    return self.conv_out(swish(self.norm_out(self.trunk(x))))


class Decoder(nnx.Module):
  """taming's Decoder: z [B, h, w, z_channels] → image [B, h·f, w·f, out_channels].

  The mirror of `Encoder` with the same arguments (`out_channels` instead of
  `in_channels`); each level has `num_res_blocks + 1` ResnetBlocks. The output is the
  raw conv_out (no tanh).
  """

  def __init__(self, *, out_channels: int = 3, ch: int = 128,
               ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
               attn_resolutions: Sequence[int] = (16,), resolution: int = 256,
               z_channels: int = 256, dropout: float = 0.0,
               num_groups: int = NORM_GROUPS, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    ch_mult = tuple(ch_mult)
    attn_resolutions = tuple(attn_resolutions)
    validate_autoencoder_config(
        in_channels=out_channels, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
        attn_resolutions=attn_resolutions, resolution=resolution, z_channels=z_channels,
        dropout=dropout, num_groups=num_groups)
    self.out_channels = out_channels
    self.ch_mult = ch_mult
    self.resolution = resolution
    self.z_channels = z_channels
    self.upsampling_factor = 2 ** (len(ch_mult) - 1)
    self.latent_resolution = resolution // self.upsampling_factor
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    block_kw = dict(dropout=dropout, num_groups=num_groups, remat=remat, **kw)

    channels = ch * ch_mult[-1]
    current_resolution = self.latent_resolution
    self.conv_in = conv(z_channels, channels, 3, padding=1, **kw)
    self.mid = MidBlock(channels, **block_kw)
    levels_deepest_first = []
    for i in reversed(range(len(ch_mult))):
      blocks, attns = [], []
      for _ in range(num_res_blocks + 1):
        blocks.append(ResnetBlock(channels, ch * ch_mult[i], **block_kw))
        channels = ch * ch_mult[i]
        if current_resolution in attn_resolutions:
          attns.append(AttnBlock(channels, num_groups=num_groups, remat=remat, **kw))
      upsample = None
      if i != 0:
        upsample = Upsample(channels, remat=remat, **kw)
        current_resolution *= 2
      levels_deepest_first.append(_Level(blocks, attns, upsample, "upsample"))
    # Stored by level index like taming (up[0] is the full-resolution level, run last).
    self.up = nnx.List(levels_deepest_first[::-1])
    self.norm_out = group_norm(channels, num_groups=num_groups, **kw)
    self.conv_out = conv(channels, out_channels, 3, padding=1, **kw)

  def last_layer_input(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, z_channels] → [B, h·f, w·f, C], what `conv_out` (the last layer) sees."""
    if z.ndim != 4 or z.shape[-1] != self.z_channels:
      raise ValueError(f"expected latents [B, h, w, {self.z_channels}], got shape {z.shape}.")
    h = self.mid(self.conv_in(z))
    for level in reversed(self.up):
      h = level(h)
    return swish(self.norm_out(h))

  def __call__(self, z: jax.Array) -> jax.Array:
    """z: [B, h, w, z_channels] → [B, h·f, w·f, out_channels]."""
    return self.conv_out(self.last_layer_input(z))
