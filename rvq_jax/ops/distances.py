"""Squared Euclidean distances to a codebook, and memory-bounded nearest-code search."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rvq_jax.ops import _checks

# Nearest-code search materializes at most this many distance entries at once
# (float32: 256 MiB). Above it, the codebook is scanned in chunks.
DEFAULT_MAX_DISTANCE_ENTRIES = 1 << 26


def code_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Squared distances ‖z − c_k‖² from every vector to every code.

  Computed as ‖z‖² − 2 z·c + ‖c‖² so that no [..., K, D] difference tensor is formed;
  the arithmetic runs in float32 whatever the input dtype, since the expansion cancels
  badly in bfloat16.

  Args:
    z: [..., D] vectors.
    codebook: [K, D] codes.

  Returns:
    [..., K] float32 squared distances (clipped at 0 against rounding).
  """
  _checks.check_feature_dim("z", z, codebook)
  z32 = z.astype(jnp.float32)
  c32 = codebook.astype(jnp.float32)
  cross = jnp.einsum("...d,kd->...k", z32, c32, preferred_element_type=jnp.float32)
  z_sq = jnp.sum(z32 * z32, axis=-1, keepdims=True)
  c_sq = jnp.sum(c32 * c32, axis=-1)
  return jnp.maximum(z_sq - 2.0 * cross + c_sq, 0.0)


# Rows of z per block on the CPU: keeps a block's [rows, K] scores in cache.
CPU_BLOCK_ENTRIES = 1 << 21


def _block_argmin(z_block: jax.Array, codes: jax.Array, code_sq: jax.Array,
                  offset: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
  """(min score, first index of it) of ‖c‖² − 2 z·c over `codes` for each row of `z_block`.

  ‖c‖² − 2 z·c orders codes exactly like ‖z − c‖² (‖z‖² is the same for every code).
  The index is found as the smallest position holding the minimum, not by `argmin`:
  XLA's CPU backend runs a value-and-index reduction as a scalar loop, several times
  slower than two plain reductions.
  """
  scores = code_sq[None, :] - 2.0 * jnp.einsum(
      "nd,kd->nk", z_block, codes, preferred_element_type=jnp.float32)
  best = jnp.min(scores, axis=-1)
  positions = jnp.arange(codes.shape[0], dtype=jnp.int32)
  index = jnp.min(jnp.where(scores == best[:, None], positions, codes.shape[0]), axis=-1)
  # A NaN row matches no position; keep its index in range.
  index = jnp.minimum(index, codes.shape[0] - 1)
  return best, index + offset


def _chunked_argmin(z_block: jax.Array, codes: jax.Array, code_sq: jax.Array,
                    chunk_size: int) -> jax.Array:
  """Nearest code scanning the codebook in chunks with a running minimum (huge K)."""
  num_codes, dim = codes.shape
  num_chunks = math.ceil(num_codes / chunk_size)
  padding = num_chunks * chunk_size - num_codes
  # Padded codes get an infinite norm so they never win.
  codes = jnp.pad(codes, ((0, padding), (0, 0))).reshape(num_chunks, chunk_size, dim)
  code_sq = jnp.pad(code_sq, (0, padding), constant_values=jnp.inf).reshape(
      num_chunks, chunk_size)

  def scan_chunk(carry, chunk):
    best_score, best_index = carry
    chunk_codes, chunk_sq, offset = chunk
    score, index = _block_argmin(z_block, chunk_codes, chunk_sq, offset)
    # Strictly better only: an equal score in a later chunk keeps the earlier index.
    better = score < best_score
    return (jnp.where(better, score, best_score), jnp.where(better, index, best_index)), None

  rows = z_block.shape[0]
  init = (jnp.full((rows,), jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.int32))
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
  (_, best_index), _ = jax.lax.scan(scan_chunk, init, (codes, code_sq, offsets))
  return best_index


def nearest_code(
    z: jax.Array,
    codebook: jax.Array,
    *,
    chunk_size: int | None = None,
    recall_target: float = 1.0,
) -> jax.Array:
  """Index of the nearest code (squared Euclidean) for every vector.

  Never forms an [N, K, D] tensor. The [N, K] score matrix is formed whole only while
  it stays under `DEFAULT_MAX_DISTANCE_ENTRIES`; beyond that (or when `chunk_size` is
  given) the codebook is scanned in chunks of `chunk_size` codes keeping a running
  minimum, so memory is O(N · chunk_size). On the CPU the rows of z are also taken in
  blocks whose scores fit in cache. Ties go to the lowest index, as `argmin`.

  With `recall_target` < 1 the search is `jax.lax.approx_min_k` (k = 1): on TPUs it
  reduces each row in partial buckets and returns the true nearest code with about that
  probability; other backends run it as an exact top-k (a sort), so there it is exact
  and slower than the default (benchmarks/README.md). Rows are taken in blocks of at
  most `DEFAULT_MAX_DISTANCE_ENTRIES` scores; ties are not guaranteed to go to the
  lowest index.

  Args:
    z: [..., D] vectors.
    codebook: [K, D] codes.
    chunk_size: codes per chunk (exact search); None picks one from the memory budget.
    recall_target: 1.0 (default) for the exact search; in (0, 1) for approx_min_k with
      that expected recall.

  Returns:
    [...] int32 indices into the codebook.
  """
  _checks.check_feature_dim("z", z, codebook)
  if not 0.0 < recall_target <= 1.0:
    raise ValueError(f"recall_target must lie in (0, 1], got {recall_target}.")
  if recall_target < 1.0:
    return _approx_nearest_code(z, codebook, recall_target)
  num_codes, dim = codebook.shape
  lead_shape = z.shape[:-1]
  z2d = z.reshape(-1, dim).astype(jnp.float32)
  codes = codebook.astype(jnp.float32)
  code_sq = jnp.sum(codes * codes, axis=-1)
  num_vectors = z2d.shape[0]
  if chunk_size is not None and chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")

  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:
    rows = max(8, CPU_BLOCK_ENTRIES // num_codes)
  else:
    rows = num_vectors
  rows = min(rows, max(num_vectors, 1))
  if chunk_size is None:
    budget = DEFAULT_MAX_DISTANCE_ENTRIES // rows
    chunk_size = num_codes if budget >= num_codes else max(1, budget)
  chunk_size = min(chunk_size, num_codes)

  def block(z_block):
    if chunk_size == num_codes:
      return _block_argmin(z_block, codes, code_sq)[1]
    return _chunked_argmin(z_block, codes, code_sq, chunk_size)

  return _map_row_blocks(block, z2d, rows).reshape(lead_shape)


def _map_row_blocks(block, z2d: jax.Array, rows: int) -> jax.Array:
  """`block` ([rows, D] → [rows]) over z2d [N, D] in blocks of `rows` (the last padded),
  one block at a time so that only [rows, K] distances exist at once → [N]."""
  num_vectors, dim = z2d.shape
  if rows >= num_vectors:
    return block(z2d)
  num_blocks = math.ceil(num_vectors / rows)
  padded = jnp.pad(z2d, ((0, num_blocks * rows - num_vectors), (0, 0)))
  return jax.lax.map(block, padded.reshape(num_blocks, rows, dim)).reshape(-1)[:num_vectors]


def _approx_nearest_code(z: jax.Array, codebook: jax.Array, recall_target: float) -> jax.Array:
  """`nearest_code` by `jax.lax.approx_min_k` over ‖c‖² − 2 z·c, in row blocks."""
  num_codes, dim = codebook.shape
  lead_shape = z.shape[:-1]
  z2d = z.reshape(-1, dim).astype(jnp.float32)
  codes = codebook.astype(jnp.float32)
  code_sq = jnp.sum(codes * codes, axis=-1)

  def block(z_block):
    scores = code_sq[None, :] - 2.0 * jnp.einsum(
        "nd,kd->nk", z_block, codes, preferred_element_type=jnp.float32)
    _, index = jax.lax.approx_min_k(scores, 1, recall_target=recall_target)
    return index[:, 0].astype(jnp.int32)

  num_vectors = z2d.shape[0]
  rows = min(max(1, DEFAULT_MAX_DISTANCE_ENTRIES // num_codes), max(num_vectors, 1))
  return _map_row_blocks(block, z2d, rows).reshape(lead_shape)


def lookup(indices: jax.Array, codebook: jax.Array) -> jax.Array:
  """Codes for integer indices: [...] → [..., D] (a gather, differentiable in the codebook)."""
  _checks.check_codebook(codebook)
  return jnp.take(codebook, indices, axis=0)
