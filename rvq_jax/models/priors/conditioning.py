"""Condition embeddings for the generative priors: the prefix tokens of a condition.

  kind        condition                    prefix [B, Lc, W]          null condition
  'none'      None                         one learned SOS token      (the SOS token)
  'class'     [B] int in [0, num_classes)  class embedding, Lc = 1    class `num_classes`
  'semantic'  [B, h, w] int labels in      per-cell label embedding   label `num_classes`
              [0, num_classes), already    + position embedding,      in every cell
              at token resolution          Lc = h·w (raster order)

`drop: [B] bool` swaps a row's condition for the null condition: condition dropout in
training and the unconditional branch of classifier-free guidance. Ids outside
[0, num_classes) cannot be checked under `jit`; do not pass them.

`downsample_label_map` brings a full-resolution segmentation to the token grid (the
most frequent label of each cell).

Logical axis names: embedding tables ('vocab', 'embed') [num_classes + 1, W] (a table
whose row count the 'model' mesh axis does not divide stays replicated), the SOS token
and the position embedding ('position', 'embed').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.layers import dtypes
from rvq_jax.models.layers import partitioning
from rvq_jax.models.layers.dtypes import Dtype

CONDITION_KINDS = ("none", "class", "semantic")

# ViT/GPT-2's customary N(0, 0.02) for learned embeddings.


def downsample_label_map(label_map: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """The most frequent label of each cell: label_map [B, S1, S2] int → [B, h, w] int.

  Cells are (S1/h) × (S2/w) blocks; h must divide S1 and w divide S2. Ties go to the
  smallest label. Sort-based (no label count needed): O(n log n) per cell of n pixels.
  """
  if label_map.ndim != 3:
    raise ValueError(f"label_map must be [B, S1, S2], got shape {label_map.shape}.")
  if not jnp.issubdtype(label_map.dtype, jnp.integer):
    raise ValueError(f"label_map must be integer, got {label_map.dtype}.")
  batch, s1, s2 = label_map.shape
  h, w = grid
  if h < 1 or w < 1 or s1 % h or s2 % w:
    raise ValueError(f"grid {tuple(grid)} does not divide the label map {(s1, s2)}.")
  cells = label_map.reshape(batch, h, s1 // h, w, s2 // w).transpose(0, 1, 3, 2, 4)
  cells = jnp.sort(cells.reshape(batch, h, w, -1), axis=-1)  # [B, h, w, n]

  def mode(values):  # values: [n] sorted ascending
    counts = (jnp.searchsorted(values, values, side="right")
              - jnp.searchsorted(values, values, side="left"))
    # argmax returns the first maximum, i.e. the smallest of the tied labels.
    return values[jnp.argmax(counts)]

  flat = cells.reshape(-1, cells.shape[-1])
  return jax.vmap(mode)(flat).reshape(batch, h, w)


class ConditionEmbedding(nnx.Module):
  """Condition → prefix tokens [B, Lc, width] (see the module docstring)."""

  def __init__(self, kind: str, width: int, *, num_classes: int = 0,
               grid_size: tuple[int, int] = (1, 1), dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if kind not in CONDITION_KINDS:
      raise ValueError(f"condition kind must be one of {CONDITION_KINDS}, got {kind!r}.")
    if not isinstance(width, int) or width < 1:
      raise ValueError(f"width must be a positive int, got {width!r}.")
    if kind != "none" and (not isinstance(num_classes, int) or num_classes < 1):
      raise ValueError(f"condition {kind!r} needs num_classes >= 1, got {num_classes!r}.")
    grid_size = tuple(grid_size)
    if len(grid_size) != 2 or any(not isinstance(g, int) or g < 1 for g in grid_size):
      raise ValueError(f"grid_size must be two positive ints, got {grid_size!r}.")
    self.kind = kind
    self.width = width
    self.num_classes = num_classes if kind != "none" else 0
    self.grid_size = grid_size
    self.dtype = dtype
    init = nnx.initializers.normal(dtypes.EMBED_STDDEV)
    if kind == "none":
      self.sos = partitioning.param(init(rngs.params(), (1, width), param_dtype),
                                    "position", "embed")
      return
    # Row `num_classes` is the learned null condition.
    self.embedding = nnx.Embed(
        num_classes + 1, width, dtype=dtype, param_dtype=param_dtype, embedding_init=init,
        embedding_metadata=partitioning.logical("vocab", "embed"), rngs=rngs)
    if kind == "semantic":
      self.pos_embed = partitioning.param(
          init(rngs.params(), (grid_size[0] * grid_size[1], width), param_dtype),
          "position", "embed")

  @property
  def null_id(self) -> int:
    """The class / label id of the null condition."""
    return self.num_classes

  @property
  def prefix_length(self) -> int:
    """Lc, the number of prefix tokens."""
    return self.grid_size[0] * self.grid_size[1] if self.kind == "semantic" else 1

  def check_condition(self, condition: jax.Array | None, batch_size: int | None) -> None:
    """Raises ValueError unless `condition` fits this kind (and batch size, if given)."""
    if self.kind == "none":
      if condition is not None:
        raise ValueError("condition kind 'none' takes condition=None, got an array of "
                         f"shape {jnp.shape(condition)}.")
      return
    if condition is None:
      raise ValueError(f"condition kind {self.kind!r} needs a condition, got None.")
    expected = (batch_size,) if self.kind == "class" else (batch_size, *self.grid_size)
    shape = jnp.shape(condition)
    if len(shape) != len(expected) or (
        batch_size is None and shape[1:] != expected[1:]) or (
            batch_size is not None and shape != expected):
      names = "[B]" if self.kind == "class" else f"[B, {self.grid_size[0]}, {self.grid_size[1]}]"
      raise ValueError(f"condition {self.kind!r} must be {names} int with B = {batch_size}, "
                       f"got shape {shape}.")
    if not jnp.issubdtype(jnp.asarray(condition).dtype, jnp.integer):
      raise ValueError(f"condition must be integer ids, got {jnp.asarray(condition).dtype}.")

  def __call__(self, condition: jax.Array | None, *, batch_size: int | None = None,
               drop: jax.Array | None = None) -> jax.Array:
    """Prefix tokens [B, Lc, width] in the compute dtype.

    condition: None ('none'), [B] int ('class') or [B, h, w] int ('semantic').
    batch_size: B; needed for 'none' (which has no condition array to take it from).
    drop: [B] bool; True rows get the null condition.
    """
    if batch_size is None:
      if condition is None:
        raise ValueError("condition kind 'none' needs batch_size.")
      batch_size = jnp.shape(condition)[0]
    self.check_condition(condition, batch_size)
    if self.kind == "none":
      # The SOS token is also the null condition, so `drop` changes nothing.
      sos = self.sos[...].astype(self.dtype)
      return jnp.broadcast_to(sos[None], (batch_size, 1, self.width))
    ids = jnp.asarray(condition, jnp.int32)
    if drop is not None:
      drop = jnp.asarray(drop, bool).reshape((batch_size,) + (1,) * (ids.ndim - 1))
      ids = jnp.where(drop, self.null_id, ids)
    tokens = self.embedding(ids.reshape(batch_size, -1))  # [B, Lc, W]
    if self.kind == "semantic":
      tokens = tokens + self.pos_embed[...].astype(self.dtype)
    return tokens.astype(self.dtype)
