"""Straight-through estimators: a hard value forward, a soft value's gradient backward."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rvq_jax.ops.reductions import argmax_last


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
  indices = argmax_last(logits)
  soft = jax.nn.softmax(logits.astype(jnp.float32) / tau, axis=-1)
  hard = jax.nn.one_hot(indices, logits.shape[-1], dtype=jnp.float32)
  return straight_through(hard, soft).astype(logits.dtype), indices


@jax.custom_vjp
def one_hot_lookup(one_hot: jax.Array, indices: jax.Array, codebook: jax.Array) -> jax.Array:
  """`one_hot @ codebook` for a (straight-through) one-hot of `indices`, as a gather.

  The forward value of a straight-through one-hot is one_hot(indices), so the product is
  the gather codebook[indices]; the gradients are those of the product: g · codebookᵀ for
  the one-hot (its soft part) and the per-code sum of g for the codebook. This skips the
  [N, K] × [K, D] matmul forward and its codebook-side transpose backward.

  Args:
    one_hot: [..., K] straight-through one-hot whose value is one_hot(indices).
    indices: [...] int32.
    codebook: [K, D].

  Returns:
    [..., D] in the dtype of `one_hot`.
  """
  return jnp.take(codebook, indices, axis=0).astype(one_hot.dtype)


def _one_hot_lookup_fwd(one_hot, indices, codebook):
  # A 0-d array carries the one-hot's dtype: residuals must be arrays.
  return one_hot_lookup(one_hot, indices, codebook), (indices, codebook,
                                                      jnp.zeros((), one_hot.dtype))


def _one_hot_lookup_bwd(residuals, grad):
  indices, codebook, dtype_carrier = residuals
  grad32 = grad.astype(jnp.float32)
  grad_one_hot = jnp.einsum("...d,kd->...k", grad32, codebook.astype(jnp.float32))
  grad_codebook = jnp.zeros(codebook.shape, jnp.float32).at[indices.reshape(-1)].add(
      grad32.reshape(-1, codebook.shape[-1]))
  return grad_one_hot.astype(dtype_carrier.dtype), None, grad_codebook.astype(codebook.dtype)


one_hot_lookup.defvjp(_one_hot_lookup_fwd, _one_hot_lookup_bwd)
