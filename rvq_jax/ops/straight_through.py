"""Straight-through estimators: a hard value forward, a soft value's gradient backward."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """Returns `hard` in the forward pass with the gradient of `soft`.

  `soft + stop_gradient(hard − soft)`: used for the VQ code (hard = nearest code,
  soft = encoder output) and for the one-hot token (hard = one-hot, soft = softmax).

  Args:
    hard: [...] the value to output.
    soft: [...] same shape; the value whose gradient flows.

  Returns:
    [...] equal to `hard`, with d/d(soft) = identity; in the dtype of `soft`.
  """
  if hard.shape != soft.shape:
    raise ValueError(
        f"hard and soft must have the same shape, got {tuple(hard.shape)} and "
        f"{tuple(soft.shape)}."
    )
  hard = hard.astype(soft.dtype)
  return soft + jax.lax.stop_gradient(hard - soft)


def straight_through_argmax(logits: jax.Array, *, tau: float | jax.Array = 1.0) -> tuple[
    jax.Array, jax.Array]:
  """Deterministic quantization of Reg-VQ: one-hot(argmax) forward, softmax(ℓ/τ) backward.

  Args:
    logits: [..., K] token logits.
    tau: softmax temperature of the backward path.

  Returns:
    (one_hot [..., K] in the dtype of `logits`, indices [...] int32).
  """
  indices = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  soft = jax.nn.softmax(logits.astype(jnp.float32) / tau, axis=-1)
  hard = jax.nn.one_hot(indices, logits.shape[-1], dtype=jnp.float32)
  return straight_through(hard, soft).astype(logits.dtype), indices
