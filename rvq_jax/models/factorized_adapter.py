"""FQGAN's factorized encoder: one shared VQGAN trunk, one ViT adapter per sub-codebook.

  image → EncoderTrunk (conv_in … mid block) → features [B, h, w, C]
        → FactorizedAdapter_m for m = 1..M → z_m [B, h, w, z_channels]

An adapter is a pre-LN ViT over the h·w tokens of the trunk's feature map (width C, the
trunk's channel count; FQGAN: 6 blocks, 8 heads, MLP ratio 4, GELU) with a learned
absolute position embedding and `ln_pre` / `ln_post`, followed by GroupNorm → swish →
conv3×3 to `z_channels` (FQGAN: 512 → 256). Each branch has its own parameters; only the
trunk is shared. The per-branch projection to the code dimension (`quant_conv`) belongs to
the tokenizer model.

Logical axis names: as listed in `rvq_jax.models.vqgan` ('embed', 'heads', 'kv', 'mlp',
'position', 'norm', and the conv names).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models import partitioning
from rvq_jax.models import vqgan
from rvq_jax.models.vqgan import Dtype

# PyTorch nn.LayerNorm's default, which FQGAN's (OpenCLIP-style) ViT blocks use.
LAYER_NORM_EPSILON = 1e-5


def layer_norm(width: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last axis with annotated scale and bias."""
  return nnx.LayerNorm(
      width, epsilon=LAYER_NORM_EPSILON, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False, rngs=rngs,
      scale_metadata=partitioning.logical(*vqgan.NORM_AXES),
      bias_metadata=partitioning.logical(*vqgan.NORM_AXES))


class SelfAttention(nnx.Module):
  """Multi-head self-attention (no mask): [B, L, C] → [B, L, C].

  q/k/v kernels are [C, heads, head_dim] and the output kernel [heads, head_dim, C], so
  a mesh rule for 'heads' shards attention by head (tensor parallelism).
  """

  def __init__(self, width: int, num_heads: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
    self.num_heads = num_heads
    self.head_dim = width // num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    in_kw = dict(kernel_metadata=partitioning.logical("embed", "heads", "kv"),
                 bias_metadata=partitioning.logical("heads", "kv"), **kw)
    heads_shape = (num_heads, self.head_dim)
    self.query = nnx.LinearGeneral(width, heads_shape, **in_kw)
    self.key = nnx.LinearGeneral(width, heads_shape, **in_kw)
    self.value = nnx.LinearGeneral(width, heads_shape, **in_kw)
    self.out = nnx.LinearGeneral(
        heads_shape, width, axis=(-2, -1),
        kernel_metadata=partitioning.logical("heads", "kv", "embed"),
        bias_metadata=partitioning.logical("embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, C] → [B, L, C]."""
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, L, heads, head_dim]
    # Softmax in float32 whatever the compute dtype (see vqgan.AttnBlock).
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * self.head_dim**-0.5, axis=-1).astype(v.dtype)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v))


class Mlp(nnx.Module):
  """Linear(C → ratio·C) → GELU (exact, as PyTorch's nn.GELU) → Linear(ratio·C → C)."""

  def __init__(self, width: int, hidden: int, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc = nnx.Linear(width, hidden, kernel_metadata=partitioning.logical("embed", "mlp"),
                         bias_metadata=partitioning.logical("mlp"), **kw)
    self.proj = nnx.Linear(hidden, width,
                           kernel_metadata=partitioning.logical("mlp", "embed"),
                           bias_metadata=partitioning.logical("embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] → [..., C]."""
    return self.proj(jax.nn.gelu(self.fc(x), approximate=False))


class TransformerBlock(nnx.Module):
  """Pre-LN ViT block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, width: int, num_heads: int, *, mlp_ratio: int = 4,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_1 = layer_norm(width, **kw)
    self.attn = SelfAttention(width, num_heads, **kw)
    self.ln_2 = layer_norm(width, **kw)
    self.mlp = Mlp(width, mlp_ratio * width, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, L, C] → [B, L, C]."""
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class FactorizedAdapter(nnx.Module):
  """One FQ branch: trunk features [B, h, w, width] → z [B, h, w, z_channels].

  Tokens get a learned absolute position embedding for the fixed `grid_size`×`grid_size`
  grid (so the input must have exactly that grid), then ln_pre → `depth` TransformerBlocks
  → ln_post, back to a feature map, then GroupNorm → swish → conv3×3.
  """

  def __init__(self, width: int, z_channels: int, grid_size: int, *, depth: int = 6,
               num_heads: int = 8, mlp_ratio: int = 4, num_groups: int = vqgan.NORM_GROUPS,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    for name, value in (("width", width), ("z_channels", z_channels),
                        ("grid_size", grid_size), ("depth", depth),
                        ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if width % num_heads:
      raise ValueError(f"adapter width {width} is not divisible by num_heads {num_heads}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.width = width
    self.grid_size = grid_size
    self.dtype = dtype
    # ViT's customary N(0, 0.02) for learned position embeddings.
    self.pos_embed = partitioning.param(
        0.02 * jax.random.normal(rngs.params(), (grid_size * grid_size, width), param_dtype),
        "position", "embed")
    self.ln_pre = layer_norm(width, **kw)
    self.blocks = nnx.List([TransformerBlock(width, num_heads, mlp_ratio=mlp_ratio, **kw)
                            for _ in range(depth)])
    self.ln_post = layer_norm(width, **kw)
    self.norm_out = vqgan.group_norm(width, num_groups=num_groups, **kw)
    self.conv_out = vqgan.conv(width, z_channels, 3, padding=1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, h, w, width] with h = w = grid_size → [B, h, w, z_channels]."""
    batch, height, width, channels = x.shape
    if (height, width) != (self.grid_size, self.grid_size) or channels != self.width:
      raise ValueError(
          f"FactorizedAdapter expects features [B, {self.grid_size}, {self.grid_size}, "
          f"{self.width}] (its position embedding is for that grid), got {x.shape}.")
    tokens = x.reshape(batch, height * width, channels)
    tokens = tokens.astype(self.dtype) + self.pos_embed[...].astype(self.dtype)
    tokens = self.ln_pre(tokens)
    for block in self.blocks:
      tokens = block(tokens)
    h = self.ln_post(tokens).reshape(batch, height, width, channels)
    return self.conv_out(vqgan.swish(self.norm_out(h)))


class FactorizedEncoder(vqgan.EncoderTrunk):
  """FQGAN encoder: image [B, H, W, in_channels] → list of M maps [B, H/f, W/f, z_channels].

  Trunk arguments as `vqgan.Encoder`; `num_branches` = M sub-codebooks (2 "Dual",
  3 "Triple"); `adapter_depth`, `adapter_heads`, `adapter_mlp_ratio` configure each
  FactorizedAdapter (width = ch * ch_mult[-1]; its token grid is resolution / f, so the
  encoder takes only images of exactly `resolution`).
  """

  def __init__(self, *, num_branches: int, in_channels: int = 3, ch: int = 128,
               ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
               attn_resolutions: Sequence[int] = (16,), resolution: int = 256,
               z_channels: int = 256, dropout: float = 0.0, adapter_depth: int = 6,
               adapter_heads: int = 8, adapter_mlp_ratio: int = 4,
               num_groups: int = vqgan.NORM_GROUPS, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(num_branches, int) or num_branches < 1:
      raise ValueError(f"num_branches must be a positive int, got {num_branches!r}.")
    super().__init__(in_channels=in_channels, ch=ch, ch_mult=ch_mult,
                     num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                     resolution=resolution, z_channels=z_channels, dropout=dropout,
                     num_groups=num_groups, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_branches = num_branches
    self.adapters = nnx.List([
        FactorizedAdapter(self.trunk_channels, z_channels, self.latent_resolution,
                          depth=adapter_depth, num_heads=adapter_heads,
                          mlp_ratio=adapter_mlp_ratio, num_groups=num_groups, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)
        for _ in range(num_branches)])

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: [B, H, W, in_channels] → M arrays [B, H/f, W/f, z_channels], one per branch."""
    features = self.trunk(x)
    return [adapter(features) for adapter in self.adapters]
