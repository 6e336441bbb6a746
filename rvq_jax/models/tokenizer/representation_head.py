"""FQGAN's representation head: one quantized sub-code predicts a frozen teacher's global
image feature, trained with in-batch InfoNCE (`background/fqgan.md` §1.4).

  subcode [B, h, w, code_dim] ─ FeaturePredictionHead ─→ predicted [B, D]
  images  [B, H, W, 3]        ─ frozen Teacher ─ sg ───→ target    [B, D]
  loss = info_nce(predicted, target, τ)          (FQGAN: τ = 1, weight 0.5)

The head is used only in training (its loss is `train.tokenizer_losses.representation_loss`);
its gradient reaches the encoder branch of its sub-codebook through the (straight-through)
quantized sub-code. The teachers are in `rvq_jax.models.pretrained.teachers`.

Logical axis names of the head's parameters: those of `factorized_adapter` ('embed',
'heads', 'kv', 'mlp', 'norm') plus 'code' for the sub-code input, 'position' for the
position embedding, and an unnamed (replicated) axis for the teacher-feature output of
the optional final projection.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.layers import partitioning
from rvq_jax.models.layers.dtypes import Dtype
from rvq_jax.models.layers.transformer import TransformerBlock
from rvq_jax.models.layers.transformer import layer_norm


class FeaturePredictionHead(nnx.Module):
  """FQGAN's FeatPredHead: quantized sub-code map [B, h, w, code_dim] → global feature.

    Linear(code_dim → width) → ReLU → Linear(width → width)      per token
    prepend a learned CLS token, add a learned position embedding [h·w + 1, width]
    LayerNorm (ln_pre)
    `num_blocks` pre-LN TransformerBlocks (`num_heads` heads, MLP × `mlp_ratio`)
    LayerNorm (ln_post) → token 0 → [B, width]
    optional Linear(width → target_dim), when the teacher's feature width differs

  FQGAN: width = teacher width (1024 for CLIP-L, 384 DINOv2-S, 768 CLIP-B), 3 blocks,
  8 heads, MLP × 4, ln_pre and ln_post, no final projection (39.1M parameters at width 1024,
  grid 16, code_dim 8; FQGAN reports roughly 39M). The position embedding is for a
  fixed `grid_size` × `grid_size` token grid, so inputs must have exactly that grid.

  Parameters: `input_proj_1` [code_dim, width] ('code', 'embed'), `input_proj_2`
  [width, width] ('embed', None), `class_token` [width] ('embed',),
  `pos_embed` [h·w + 1, width] ('position', 'embed'), `ln_pre`, `blocks[i]`, `ln_post`, and
  `target_proj` [width, target_dim] ('embed', None) when `target_dim` is set.
  """

  def __init__(self, code_dim: int, width: int, *, num_blocks: int = 3, num_heads: int = 8,
               mlp_ratio: int = 4, grid_size: int, target_dim: int | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               remat: str = "none", rngs: nnx.Rngs):
    """Builds the head with random weights.

    Args:
      code_dim: width of the sub-code vectors (FQGAN: 8).
      width: transformer width D.
      num_blocks: TransformerBlocks (FQGAN: 3).
      num_heads: attention heads; must divide `width`.
      mlp_ratio: hidden width of each block's MLP, as a multiple of `width`.
      grid_size: h = w of the sub-code map (FQGAN f16 at 256: 16).
      target_dim: if set and ≠ `width`, a final Linear maps to this width (the teacher's
        feature width); None keeps the output at `width`.
      dtype: computation dtype (e.g. bfloat16); LayerNorm statistics and softmaxes stay
        float32 (see `factorized_adapter`).
      param_dtype: storage dtype of the parameters.
      remat: 'none' | 'blocks' | 'full', checkpointing of each block
        (`rvq_jax.models.layers.remat`).
      rngs: for the initialization.
    """
    for name, value in (("code_dim", code_dim), ("width", width),
                        ("num_blocks", num_blocks), ("num_heads", num_heads),
                        ("mlp_ratio", mlp_ratio), ("grid_size", grid_size)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if target_dim is not None and (not isinstance(target_dim, int) or target_dim < 1):
      raise ValueError(f"target_dim must be a positive int or None, got {target_dim!r}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.code_dim = code_dim
    self.width = width
    self.grid_size = grid_size
    self.dtype = dtype
    # The per-token MLP lifting the low-dimensional code into the transformer width.
    self.input_proj_1 = nnx.Linear(
        code_dim, width, kernel_metadata=partitioning.logical("code", "embed"),
        bias_metadata=partitioning.logical("embed"), **kw)
    # Both axes are model width; only the input one is named so that a rule sharding
    # 'embed' shards this kernel once rather than asking for the same mesh axis twice.
    self.input_proj_2 = nnx.Linear(
        width, width, kernel_metadata=partitioning.logical("embed", None),
        bias_metadata=partitioning.logical(None), **kw)
    # OpenCLIP's initialization (scale width^-1/2), which FQGAN's head copies.
    scale = width ** -0.5
    self.class_token = partitioning.param(
        scale * jax.random.normal(rngs.params(), (width,), param_dtype), "embed")
    self.pos_embed = partitioning.param(
        scale * jax.random.normal(rngs.params(), (grid_size * grid_size + 1, width),
                                  param_dtype),
        "position", "embed")
    self.ln_pre = layer_norm(width, **kw)
    self.blocks = nnx.List([TransformerBlock(width, num_heads, mlp_ratio=mlp_ratio,
                                             remat=remat, **kw)
                            for _ in range(num_blocks)])
    self.ln_post = layer_norm(width, **kw)
    self.output_dim = width if target_dim is None else target_dim
    needs_projection = target_dim is not None and target_dim != width
    self.target_proj = nnx.Linear(
        width, target_dim, kernel_metadata=partitioning.logical("embed", None),
        bias_metadata=partitioning.logical(None), **kw) if needs_projection else None

  def __call__(self, subcode: jax.Array) -> jax.Array:
    """subcode: [B, h, w, code_dim], h = w = grid_size → [B, output_dim] (compute dtype)."""
    batch, height, width, channels = subcode.shape
    if (height, width, channels) != (self.grid_size, self.grid_size, self.code_dim):
      raise ValueError(
          f"FeaturePredictionHead expects sub-codes [B, {self.grid_size}, {self.grid_size}, "
          f"{self.code_dim}] (its position embedding is for that grid), got "
          f"{tuple(subcode.shape)}.")
    tokens = subcode.reshape(batch, height * width, channels).astype(self.dtype)
    tokens = self.input_proj_2(jax.nn.relu(self.input_proj_1(tokens)))  # [B, h·w, width]
    cls = jnp.broadcast_to(self.class_token[...].astype(self.dtype), (batch, 1, self.width))
    tokens = jnp.concatenate([cls, tokens], axis=1)  # [B, h·w + 1, width]
    tokens = self.ln_pre(tokens + self.pos_embed[...].astype(self.dtype))
    for block in self.blocks:
      tokens = block(tokens)
    features = self.ln_post(tokens[:, 0])  # only the CLS token is read: skip the others
    if self.target_proj is not None:
      features = self.target_proj(features)
    return features
