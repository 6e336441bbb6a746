"""Shared pre-LN transformer pieces: attention with masks and a KV cache, AdaLN blocks.

Used by the FQGAN adapter (`factorized_adapter`), the representation head, and both
generative priors (`ar_prior`, the VQ-Diffusion denoiser).

  SelfAttention     [B, L, W] → [B, L, W]; optional causal mask, boolean mask, KV cache.
  TransformerBlock  pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x)); with
                    `adaptive_norm_width` an AdaLN-Zero block (DiT): affine-free norms,
                    shift/scale/gate predicted from a conditioning vector, zero-initialized
                    so that the block starts as the identity.
  Transformer       `depth` blocks + a final LayerNorm (AdaLN-modulated when adaptive).

KV cache: functional. `init_cache` preallocates k/v arrays [B, max_len, heads, head_dim]
and an index (number of filled positions, a scalar int32 shared by the batch); a call
with `cache=` writes its T new keys/values at [index, index + T), attends to the filled
part, and returns `(out, new_cache)`. Every shape is static, so a decoding loop over
positions jits under `lax.fori_loop` / `lax.scan` with the cache in the carry.

Masks: boolean, True = may attend. Masked attention logits are set to the most negative
finite float32 (not −inf) so that a fully masked row gives a uniform, finite softmax
instead of NaN.

Dropout is applied functionally from `rngs.dropout()` at call time (attention weights and
both residual branches), so modules hold no RNG state and their parameter tree is only
the layers listed here.

Rematerialization: `remat` ('none' | 'blocks' | 'full', `rvq_jax.models.layers.remat`)
checkpoints each TransformerBlock on its own in calls without a cache (training); calls
with a KV cache (sampling, no gradients) run it plainly.

Logical axis names (as `rvq_jax.models.tokenizer.vqgan`): q/k/v ('embed', 'heads', 'kv'), attention
output ('heads', 'kv', 'embed'), MLP ('embed', 'mlp') / ('mlp', 'embed'), norms ('norm',),
AdaLN modulation kernel ('embed', None, 'embed') [W_cond, 6, W] (the second 'embed' is
left replicated by the rules, since a mesh axis is used once per array).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.layers import partitioning
from rvq_jax.models.layers import remat as remat_lib
from rvq_jax.models.layers.dtypes import Dtype

# PyTorch nn.LayerNorm's default, which FQGAN's (OpenCLIP-style) ViT blocks use.
LAYER_NORM_EPSILON = 1e-5

# Masked attention logit: finite so that fully masked rows do not produce NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


class KVCache(NamedTuple):
  """One attention layer's cache (a pytree).

  key, value: [B, max_len, heads, head_dim] in the compute dtype.
  index: [] int32, the number of filled positions (the next write position).
  """
  key: jax.Array
  value: jax.Array
  index: jax.Array


def layer_norm(width: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs,
               affine: bool = True) -> nnx.LayerNorm:
  """LayerNorm over the last axis with annotated scale and bias (none if not `affine`)."""
  return nnx.LayerNorm(
      width, epsilon=LAYER_NORM_EPSILON, dtype=dtype, param_dtype=param_dtype,
      use_bias=affine, use_scale=affine, use_fast_variance=False, rngs=rngs,
      scale_metadata=partitioning.logical(*partitioning.NORM_AXES),
      bias_metadata=partitioning.logical(*partitioning.NORM_AXES))


def _dropout(x: jax.Array, rate: float, *, deterministic: bool,
             rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout from `rngs.dropout()`; identity when deterministic or rate == 0."""
  if deterministic or rate == 0.0:
    return x
  if rngs is None:
    raise ValueError("dropout > 0 with deterministic=False needs `rngs` (a 'dropout' stream).")
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _broadcast_mask(mask: jax.Array) -> jax.Array:
  """[Lq, Lk] | [B, Lq, Lk] | [B, heads, Lq, Lk] bool → rank 4 (broadcastable)."""
  if mask.ndim == 2:
    return mask[None, None]
  if mask.ndim == 3:
    return mask[:, None]
  if mask.ndim == 4:
    return mask
  raise ValueError(f"attention mask must have rank 2, 3 or 4, got shape {mask.shape}.")


class SelfAttention(nnx.Module):
  """Multi-head self-attention: [B, L, C] → [B, L, C].

  q/k/v kernels are [C, heads, head_dim] and the output kernel [heads, head_dim, C], so
  a mesh rule for 'heads' shards attention by head (tensor parallelism). `causal` masks
  keys after each query (positions counted from the cache index when a cache is used).
  """

  def __init__(self, width: int, num_heads: int, *, causal: bool = False,
               dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if not isinstance(num_heads, int) or num_heads < 1:
      raise ValueError(f"num_heads must be a positive int, got {num_heads!r}.")
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    self.num_heads = num_heads
    self.head_dim = width // num_heads
    self.causal = causal
    self.dropout = dropout
    self.dtype = dtype
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

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    """An empty cache: k/v zeros [batch_size, max_len, heads, head_dim], index 0."""
    shape = (batch_size, max_len, self.num_heads, self.head_dim)
    zeros = jnp.zeros(shape, self.dtype)
    return KVCache(zeros, zeros, jnp.zeros((), jnp.int32))

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               cache: KVCache | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    """x: [B, T, C] → [B, T, C], or `(out, new_cache)` when `cache` is given.

    mask: bool, True = attend; [T, Lk], [B, T, Lk] or [B, heads, T, Lk] with Lk = T
      without a cache and Lk = max_len with one (key j is cache position j).
    cache: the keys/values of positions [0, index); x holds positions [index, index + T).
    """
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, T, heads, head_dim]
    length = x.shape[1]
    if cache is None:
      q_pos = jnp.arange(length)
      k_pos = jnp.arange(length)
      valid = None
    else:
      start = cache.index
      k = jax.lax.dynamic_update_slice(cache.key, k.astype(cache.key.dtype),
                                       (0, start, 0, 0))
      v = jax.lax.dynamic_update_slice(cache.value, v.astype(cache.value.dtype),
                                       (0, start, 0, 0))
      cache = KVCache(k, v, start + length)
      q_pos = start + jnp.arange(length)
      k_pos = jnp.arange(k.shape[1])
      # Slots past the written positions hold zeros (or stale values): never attend.
      valid = (k_pos < start + length)[None, :]
    if self.causal:
      causal = k_pos[None, :] <= q_pos[:, None]
      valid = causal if valid is None else valid & causal
    allowed = None if valid is None else valid[None, None]  # [1, 1, T, Lk]
    if mask is not None:
      mask = _broadcast_mask(mask)
      allowed = mask if allowed is None else allowed & mask
    # Softmax in float32 whatever the compute dtype (as the VQGAN's AttnBlock).
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * self.head_dim**-0.5
    if allowed is not None:
      logits = jnp.where(allowed, logits, _MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    weights = _dropout(weights, self.dropout, deterministic=deterministic, rngs=rngs)
    out = self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v))
    return out if cache is None else (out, cache)


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


def _modulation(in_width: int, width: int, chunks: int, *, dtype: Dtype,
                param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.LinearGeneral:
  """Zero-initialized projection [B, in_width] → [B, chunks, width] (AdaLN-Zero)."""
  return nnx.LinearGeneral(
      in_width, (chunks, width), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
      kernel_init=nnx.initializers.zeros_init(), bias_init=nnx.initializers.zeros_init(),
      kernel_metadata=partitioning.logical("embed", None, "embed"),
      bias_metadata=partitioning.logical(None, "embed"))


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """x: [B, L, W]; shift, scale: [B, W] → x·(1 + scale) + shift."""
  return x * (1 + scale[:, None]) + shift[:, None]


class TransformerBlock(nnx.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  With `adaptive_norm_width` (AdaLN-Zero, as DiT): ln_1 / ln_2 have no affine parameters
  and `modulation` maps silu(conditioning) [B, adaptive_norm_width] to shift/scale/gate
  for each branch: x + gate·attn(ln_1(x)·(1 + scale) + shift). The modulation is
  zero-initialized, so gate = 0 and the block is the identity at initialization.
  """

  def __init__(self, width: int, num_heads: int, *, mlp_ratio: int = 4,
               causal: bool = False, adaptive_norm_width: int | None = None,
               dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    if not isinstance(mlp_ratio, int) or mlp_ratio < 1:
      raise ValueError(f"mlp_ratio must be a positive int, got {mlp_ratio!r}.")
    if adaptive_norm_width is not None and (
        not isinstance(adaptive_norm_width, int) or adaptive_norm_width < 1):
      raise ValueError(
          f"adaptive_norm_width must be None or a positive int, got {adaptive_norm_width!r}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat_lib.check_mode(remat)
    self.adaptive = adaptive_norm_width is not None
    self.dropout = dropout
    affine = not self.adaptive
    self.ln_1 = layer_norm(width, affine=affine, **kw)
    self.attn = SelfAttention(width, num_heads, causal=causal, dropout=dropout, **kw)
    self.ln_2 = layer_norm(width, affine=affine, **kw)
    self.mlp = Mlp(width, mlp_ratio * width, **kw)
    if self.adaptive:
      self.modulation = _modulation(adaptive_norm_width, width, 6, **kw)

  def init_cache(self, batch_size: int, max_len: int) -> KVCache:
    return self.attn.init_cache(batch_size, max_len)

  def __call__(self, x: jax.Array, *, conditioning: jax.Array | None = None,
               mask: jax.Array | None = None, cache: KVCache | None = None,
               deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """x: [B, T, C] → [B, T, C], or `(out, new_cache)` when `cache` is given.

    conditioning: [B, adaptive_norm_width], required iff the block is adaptive.
    mask, cache: as `SelfAttention`.
    """
    if self.adaptive != (conditioning is not None):
      raise ValueError("conditioning must be given exactly when adaptive_norm_width is set "
                       f"(adaptive={self.adaptive}).")
    if cache is None and self.remat != "none":
      # Arrays (and the Rngs) are the checkpointed function's arguments; the Python flag
      # is closed over.
      def forward(block, x, conditioning, mask, rngs):
        return block.forward(x, conditioning=conditioning, mask=mask,
                             deterministic=deterministic, rngs=rngs)
      return remat_lib.call(self.remat, forward, self, x, conditioning, mask, rngs)
    return self.forward(x, conditioning=conditioning, mask=mask, cache=cache,
                        deterministic=deterministic, rngs=rngs)

  def forward(self, x: jax.Array, *, conditioning: jax.Array | None = None,
              mask: jax.Array | None = None, cache: KVCache | None = None,
              deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """`__call__` without rematerialization."""
    drop = dict(deterministic=deterministic, rngs=rngs)
    if self.adaptive:
      mod = self.modulation(jax.nn.silu(conditioning.astype(x.dtype)))  # [B, 6, C]
      shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (mod[:, i] for i in range(6))
      h = _modulate(self.ln_1(x), shift_a, scale_a)
    else:
      h = self.ln_1(x)
    attn = self.attn(h, mask=mask, cache=cache, **drop)
    if cache is not None:
      attn, cache = attn
    attn = _dropout(attn, self.dropout, **drop)
    if self.adaptive:
      x = x + gate_a[:, None] * attn
      h = _modulate(self.ln_2(x), shift_m, scale_m)
      x = x + gate_m[:, None] * _dropout(self.mlp(h), self.dropout, **drop)
    else:
      x = x + attn
      x = x + _dropout(self.mlp(self.ln_2(x)), self.dropout, **drop)
    return x if cache is None else (x, cache)


class Transformer(nnx.Module):
  """`depth` TransformerBlocks + final LayerNorm `ln_f`: [B, T, W] → [B, T, W].

  With `adaptive_norm_width`, every block is AdaLN-Zero and `ln_f` is affine-free,
  modulated by shift/scale from `final_modulation` (zero-initialized).
  Caches are tuples with one `KVCache` per block (`init_cache`).
  """

  def __init__(self, width: int, depth: int, num_heads: int, *, mlp_ratio: int = 4,
               causal: bool = False, adaptive_norm_width: int | None = None,
               dropout: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, remat: str = "none", rngs: nnx.Rngs):
    for name, value in (("width", width), ("depth", depth), ("num_heads", num_heads)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.adaptive = adaptive_norm_width is not None
    self.blocks = nnx.List([
        TransformerBlock(width, num_heads, mlp_ratio=mlp_ratio, causal=causal,
                         adaptive_norm_width=adaptive_norm_width, dropout=dropout,
                         remat=remat, **kw)
        for _ in range(depth)])
    self.ln_f = layer_norm(width, affine=not self.adaptive, **kw)
    if self.adaptive:
      self.final_modulation = _modulation(adaptive_norm_width, width, 2, **kw)

  def init_cache(self, batch_size: int, max_len: int) -> tuple[KVCache, ...]:
    """One empty `KVCache` per block."""
    return tuple(block.init_cache(batch_size, max_len) for block in self.blocks)

  def __call__(self, x: jax.Array, *, conditioning: jax.Array | None = None,
               mask: jax.Array | None = None, cache: tuple[KVCache, ...] | None = None,
               deterministic: bool = True, rngs: nnx.Rngs | None = None):
    """x: [B, T, W] → [B, T, W], or `(out, new_caches)` when `cache` is given."""
    new_caches = []
    for i, block in enumerate(self.blocks):
      out = block(x, conditioning=conditioning, mask=mask,
                  cache=None if cache is None else cache[i], deterministic=deterministic,
                  rngs=rngs)
      if cache is None:
        x = out
      else:
        x, layer_cache = out
        new_caches.append(layer_cache)
    x = self.ln_f(x)
    if self.adaptive:
      shift, scale = (m[:, 0] for m in jnp.split(
          self.final_modulation(jax.nn.silu(conditioning.astype(x.dtype))), 2, axis=1))
      x = _modulate(x, shift, scale)
    return x if cache is None else (x, tuple(new_caches))
