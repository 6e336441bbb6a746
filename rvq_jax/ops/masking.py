"""Reg-VQ's stochastic mask: which token positions are sampled instead of argmax-ed."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rvq_jax.ops import _checks


def num_masked(length: int, ratio) -> jax.Array | int:
  """round(ratio · length), rounding halves up (so r=0.5, L=5 gives 3, not banker's 2)."""
  if isinstance(ratio, (int, float)):
    return int(ratio * length + 0.5)
  return jnp.floor(jnp.asarray(ratio, jnp.float32) * length + 0.5).astype(jnp.int32)


def stochastic_positions(key: jax.Array, batch: int, length: int, ratio: float) -> jax.Array:
  """Per row, the round(ratio · length) stochastic positions, chosen uniformly without replacement.

  The positions `stochastic_mask` sets for the same key: each row ranks its positions by
  uniform noise (MAE style) and keeps the lowest-ranked ones, so every subset of that
  size is equally likely. Their number is static, so the stochastic rows of a [B, L, K]
  array can be gathered ([B, S, K]) instead of masked.

  Args:
    key: PRNG key.
    batch: number of rows (samples).
    length: positions per row (tokens per image).
    ratio: fraction in [0, 1], a Python number (the count must be static).

  Returns:
    [batch, S] int32 positions in [0, length), S = round(ratio · length), distinct per
    row, in the order of their rank (not sorted).
  """
  _checks.check_ratio("mask ratio", ratio)
  if not isinstance(ratio, (int, float)):
    raise TypeError(f"stochastic_positions needs a Python ratio (a static count), got {ratio!r}.")
  if batch < 0 or length < 0:
    raise ValueError(f"batch and length must be non-negative, got {batch} and {length}.")
  noise = jax.random.uniform(key, (batch, length))
  order = jnp.argsort(noise, axis=-1).astype(jnp.int32)
  return order[:, :num_masked(length, ratio)]


def positions_to_mask(positions: jax.Array, length: int) -> jax.Array:
  """[B, S] distinct positions per row → [B, length] bool, True at those positions."""
  rows = jnp.arange(positions.shape[0])[:, None]
  return jnp.zeros((positions.shape[0], length), bool).at[rows, positions].set(True)


def stochastic_mask(key: jax.Array, batch: int, length: int, ratio) -> jax.Array:
  """Per row, exactly round(ratio · length) positions set, chosen uniformly without replacement.

  MAE-style: each row ranks its positions by uniform noise and sets the lowest-ranked
  ones, so every subset of that size is equally likely. For a Python ratio these are
  the positions `stochastic_positions` returns for the same key.

  Args:
    key: PRNG key.
    batch: number of rows (samples).
    length: positions per row (tokens per image).
    ratio: fraction in [0, 1]; a Python number is checked here, a traced one is not.

  Returns:
    [batch, length] bool; True = stochastic (Gumbel-sampled) position.
  """
  _checks.check_ratio("mask ratio", ratio)
  if batch < 0 or length < 0:
    raise ValueError(f"batch and length must be non-negative, got {batch} and {length}.")
  if isinstance(ratio, (int, float)):
    return positions_to_mask(stochastic_positions(key, batch, length, ratio), length)
  noise = jax.random.uniform(key, (batch, length))
  order = jnp.argsort(noise, axis=-1)
  # rank[b, order[b, j]] = j: a scatter of the permutation's inverse, exact (no ties).
  rows = jnp.arange(batch)[:, None]
  ranks = jnp.zeros((batch, length), jnp.int32).at[rows, order].set(
      jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)))
  return ranks < num_masked(length, ratio)


def masked_select(mask: jax.Array, stochastic: jax.Array, deterministic: jax.Array) -> jax.Array:
  """Takes `stochastic` where mask is True and `deterministic` elsewhere.

  The mask's shape must be a prefix of the values' shape (e.g. mask [B, L] for values
  [B, L, K]); it is broadcast over the trailing axes. Gradients flow to whichever
  branch was selected at each position.

  Args:
    mask: [*P] bool.
    stochastic: [*P, *T] values for masked positions.
    deterministic: [*P, *T] values for the other positions.

  Returns:
    [*P, *T] mixed values.
  """
  _checks.check_same_shape(("stochastic", "deterministic"), stochastic, deterministic)
  if stochastic.shape[: mask.ndim] != mask.shape:
    raise ValueError(
        f"mask shape {tuple(mask.shape)} must be a prefix of the value shape "
        f"{tuple(stochastic.shape)}."
    )
  expanded = mask.reshape(mask.shape + (1,) * (stochastic.ndim - mask.ndim))
  return jnp.where(expanded, stochastic, deterministic)
