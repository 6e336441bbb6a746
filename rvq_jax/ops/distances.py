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


def _partial_scores(z2d: jax.Array, codes: jax.Array, code_sq: jax.Array) -> jax.Array:
  # ‖c‖² − 2 z·c orders codes exactly like ‖z − c‖²: ‖z‖² is the same for every code.
  cross = jnp.einsum("nd,kd->nk", z2d, codes, preferred_element_type=jnp.float32)
  return code_sq[None, :] - 2.0 * cross


def nearest_code(
    z: jax.Array,
    codebook: jax.Array,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
  """Index of the nearest code (squared Euclidean) for every vector.

  Never forms an [N, K, D] tensor. The [N, K] score matrix is formed whole only while
  it stays under `DEFAULT_MAX_DISTANCE_ENTRIES`; beyond that (or when `chunk_size` is
  given) the codebook is scanned in chunks of `chunk_size` codes keeping a running
  minimum, so memory is O(N · chunk_size). Ties go to the lowest index, as `argmin`.

  Args:
    z: [..., D] vectors.
    codebook: [K, D] codes.
    chunk_size: codes per chunk; None picks one from the memory budget.

  Returns:
    [...] int32 indices into the codebook.
  """
  _checks.check_feature_dim("z", z, codebook)
  num_codes, dim = codebook.shape
  lead_shape = z.shape[:-1]
  z2d = z.reshape(-1, dim).astype(jnp.float32)
  codes = codebook.astype(jnp.float32)
  num_vectors = z2d.shape[0]

  if chunk_size is None:
    budget = DEFAULT_MAX_DISTANCE_ENTRIES // max(num_vectors, 1)
    chunk_size = num_codes if budget >= num_codes else max(1, budget)
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
  chunk_size = min(chunk_size, num_codes)

  code_sq = jnp.sum(codes * codes, axis=-1)
  if chunk_size == num_codes:
    indices = jnp.argmin(_partial_scores(z2d, codes, code_sq), axis=-1)
    return indices.astype(jnp.int32).reshape(lead_shape)

  num_chunks = math.ceil(num_codes / chunk_size)
  padding = num_chunks * chunk_size - num_codes
  # Padded codes get an infinite norm so they never win.
  codes = jnp.pad(codes, ((0, padding), (0, 0)))
  code_sq = jnp.pad(code_sq, (0, padding), constant_values=jnp.inf)
  codes = codes.reshape(num_chunks, chunk_size, dim)
  code_sq = code_sq.reshape(num_chunks, chunk_size)

  def scan_chunk(carry, chunk):
    best_score, best_index = carry
    chunk_codes, chunk_sq, offset = chunk
    scores = _partial_scores(z2d, chunk_codes, chunk_sq)
    local_index = jnp.argmin(scores, axis=-1)
    local_score = jnp.take_along_axis(scores, local_index[:, None], axis=-1)[:, 0]
    # Strictly better only: an equal score in a later chunk keeps the earlier index.
    better = local_score < best_score
    best_score = jnp.where(better, local_score, best_score)
    best_index = jnp.where(better, local_index.astype(jnp.int32) + offset, best_index)
    return (best_score, best_index), None

  init = (
      jnp.full((num_vectors,), jnp.inf, jnp.float32),
      jnp.zeros((num_vectors,), jnp.int32),
  )
  offsets = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size
  (_, best_index), _ = jax.lax.scan(scan_chunk, init, (codes, code_sq, offsets))
  return best_index.reshape(lead_shape)


def lookup(indices: jax.Array, codebook: jax.Array) -> jax.Array:
  """Codes for integer indices: [...] → [..., D] (a gather, differentiable in the codebook)."""
  _checks.check_codebook(codebook)
  return jnp.take(codebook, indices, axis=0)
