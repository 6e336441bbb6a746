"""Codebook usage statistics: histogram, usage fraction, perplexity, dead codes."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rvq_jax.ops.divergences import AxisName


def code_histogram(indices: jax.Array, num_codes: int, *, axis_name: AxisName = None) -> jax.Array:
  """How often each code was chosen: [...] int indices → [K] float32 counts (global)."""
  counts = jnp.zeros((num_codes,), jnp.float32).at[indices.reshape(-1)].add(1.0)
  if axis_name is not None:
    counts = jax.lax.psum(counts, axis_name)
  return counts


def codebook_stats(
    indices: jax.Array, num_codes: int, *, axis_name: AxisName = None
) -> dict[str, jax.Array]:
  """Usage statistics of a batch of token indices.

  Args:
    indices: [...] int token indices in [0, K).
    num_codes: K.
    axis_name: mapped axis (or axes) inside shard_map/pmap; under sharded `jit` the
      statistics are global without it.

  Returns:
    dict of float32 scalars: `usage` (fraction of codes used at least once), `perplexity`
    (exp of the entropy of the code histogram: K for uniform use, 1 for collapse) and
    `dead_codes` (number of codes never used in the batch).
  """
  if num_codes <= 0:
    raise ValueError(f"num_codes must be positive, got {num_codes}.")
  counts = code_histogram(indices, num_codes, axis_name=axis_name)
  total = jnp.maximum(jnp.sum(counts), 1.0)
  probs = counts / total
  entropy = -jnp.sum(jax.scipy.special.xlogy(probs, probs))
  used = jnp.sum((counts > 0).astype(jnp.float32))
  return {
      "usage": used / num_codes,
      "perplexity": jnp.exp(entropy),
      "dead_codes": num_codes - used,
  }
