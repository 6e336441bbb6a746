"""Gumbel-softmax sampling of tokens, hard (straight-through) or soft."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rvq_jax.ops import _checks
from rvq_jax.ops.reductions import argmax_last
from rvq_jax.ops.straight_through import straight_through


def gumbel_softmax(
    key: jax.Array,
    logits: jax.Array,
    *,
    tau: float | jax.Array = 1.0,
    hard: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """Samples a token per position from softmax(logits) with the Gumbel-max trick.

  Forward: index = argmax(ℓ + g), g ~ Gumbel(0, 1), so indices follow softmax(ℓ) exactly.
  With `hard=True` the returned sample is that one-hot, carrying the gradient of
  softmax((ℓ + g)/τ) (straight-through); with `hard=False` it is the soft sample itself.

  Args:
    key: PRNG key.
    logits: [..., K] unnormalized log-probabilities.
    tau: temperature of the relaxed (soft) sample; > 0.
    hard: return the straight-through one-hot (True) or the relaxed sample (False).

  Returns:
    (sample [..., K] in the dtype of `logits`, indices [...] int32 = argmax of ℓ + g).
  """
  _checks.check_min_rank("logits", logits, 1)
  logits32 = logits.astype(jnp.float32)
  noise = jax.random.gumbel(key, logits.shape, jnp.float32)
  perturbed = logits32 + noise
  indices = argmax_last(perturbed)
  soft = jax.nn.softmax(perturbed / tau, axis=-1)
  if not hard:
    return soft.astype(logits.dtype), indices
  one_hot = jax.nn.one_hot(indices, logits.shape[-1], dtype=jnp.float32)
  return straight_through(one_hot, soft).astype(logits.dtype), indices
