"""FQGAN's factorized encoder: one shared VQGAN trunk, one ViT adapter per sub-codebook.

  image → EncoderTrunk (conv_in … mid block) → features [B, h, w, C]
        → FactorizedAdapter_m for m = 1..M → z_m [B, h, w, z_channels]

An adapter is a pre-LN ViT over the h·w tokens of the trunk's feature map (width C, the
trunk's channel count; FQGAN: 6 blocks, 8 heads, MLP ratio 4, GELU) with a learned
absolute position embedding and `ln_pre` / `ln_post`, followed by GroupNorm → swish →
conv3×3 to `z_channels` (FQGAN: 512 → 256). Each branch has its own parameters; only the
trunk is shared. The per-branch projection to the code dimension (`quant_conv`) belongs to
the tokenizer model.

Logical axis names: as listed in `rvq_jax.models.tokenizer.vqgan` ('embed', 'heads', 'kv', 'mlp',
'position', 'norm', and the conv names).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.layers import partitioning
from rvq_jax.models.layers.dtypes import Dtype
from rvq_jax.models.layers.transformer import TransformerBlock
from rvq_jax.models.layers.transformer import layer_norm
from rvq_jax.models.tokenizer import vqgan


class FactorizedAdapter(nnx.Module):
  """One FQ branch: trunk features [B, h, w, width] → z [B, h, w, z_channels].

  Tokens get a learned absolute position embedding for the fixed `grid_size`×`grid_size`
  grid (so the input must have exactly that grid), then ln_pre → `depth` TransformerBlocks
  → ln_post, back to a feature map, then GroupNorm → swish → conv3×3.
  """

  def __init__(self, width: int, z_channels: int, grid_size: int, *, depth: int = 6,
               num_heads: int = 8, mlp_ratio: int = 4, num_groups: int = vqgan.NORM_GROUPS,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
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
    self.blocks = nnx.List([TransformerBlock(width, num_heads, mlp_ratio=mlp_ratio,
                                             remat=remat, **kw)
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
               param_dtype: Dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    if not isinstance(num_branches, int) or num_branches < 1:
      raise ValueError(f"num_branches must be a positive int, got {num_branches!r}.")
    super().__init__(in_channels=in_channels, ch=ch, ch_mult=ch_mult,
                     num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                     resolution=resolution, z_channels=z_channels, dropout=dropout,
                     num_groups=num_groups, dtype=dtype, param_dtype=param_dtype,
                     remat=remat, rngs=rngs)
    self.num_branches = num_branches
    self.adapters = nnx.List([
        FactorizedAdapter(self.trunk_channels, z_channels, self.latent_resolution,
                          depth=adapter_depth, num_heads=adapter_heads,
                          mlp_ratio=adapter_mlp_ratio, num_groups=num_groups, dtype=dtype,
                          param_dtype=param_dtype, remat=remat, rngs=rngs)
        for _ in range(num_branches)])

  def __call__(self, x: jax.Array) -> list[jax.Array]:
    """x: [B, H, W, in_channels] → M arrays [B, H/f, W/f, z_channels], one per branch."""
    features = self.trunk(x)
    return [adapter(features) for adapter in self.adapters]
