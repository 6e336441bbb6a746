"""Losses and updates that train the codebook of a nearest-neighbour quantizer."""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp

from rvq_jax.ops import _checks
from rvq_jax.ops.divergences import AxisName


def vq_losses(z: jax.Array, z_q: jax.Array, *, beta: float = 0.25) -> tuple[jax.Array, jax.Array]:
  """VQ-VAE's codebook and commitment losses.

  codebook = mean‖sg(z) − z_q‖² moves the codes towards the encoder outputs;
  commitment = β · mean‖z − sg(z_q)‖² keeps the encoder near its codes. β weights the
  *encoder* term, as in the VQ-VAE paper (taming's `legacy=True` puts it on the other).

  Args:
    z: [..., D] encoder outputs.
    z_q: [..., D] their codes (before any straight-through).
    beta: commitment weight.

  Returns:
    (codebook_loss, commitment_loss), float32 scalars; commitment already includes β.
  """
  _checks.check_same_shape(("z", "z_q"), z, z_q)
  z32, zq32 = z.astype(jnp.float32), z_q.astype(jnp.float32)
  codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z32) - zq32))
  commitment_loss = beta * jnp.mean(jnp.square(z32 - jax.lax.stop_gradient(zq32)))
  return codebook_loss, commitment_loss


def disentanglement_loss(subcodes: Sequence[jax.Array]) -> jax.Array:
  """FQGAN's disentanglement regularizer over M ≥ 2 sub-codes.

  For each pair (a, b): the mean over tokens of (q̂_a · q̂_b)², q̂ the unit-normalized
  quantized vectors; the result is averaged over the M(M−1)/2 pairs. It is 0 when the
  sub-codes of every token are orthogonal and 1 when they are parallel.

  Args:
    subcodes: M arrays [..., D] (same shape).

  Returns:
    float32 scalar.
  """
  if len(subcodes) < 2:
    raise ValueError(f"disentanglement_loss needs at least 2 sub-codes, got {len(subcodes)}.")
  for index, code in enumerate(subcodes[1:], start=1):
    _checks.check_same_shape(("subcodes[0]", f"subcodes[{index}]"), subcodes[0], code)

  def unit(v):
    v = v.astype(jnp.float32)
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-12))

  normalized = [unit(code) for code in subcodes]
  pair_losses = [jnp.mean(jnp.square(jnp.sum(a * b, axis=-1)))
                 for a, b in itertools.combinations(normalized, 2)]
  return jnp.mean(jnp.stack(pair_losses))


def ema_codebook_update(
    cluster_size: jax.Array,
    embed_sum: jax.Array,
    z: jax.Array,
    indices: jax.Array,
    *,
    decay: float = 0.99,
    eps: float = 1e-5,
    axis_name: AxisName = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One exponential-moving-average codebook update (VQ-VAE-2, with Laplace smoothing).

  Counts and sums are over the global batch (sharded `jit`), or summed over `axis_name`
  inside shard_map/pmap.

  Args:
    cluster_size: [K] running count of vectors assigned to each code.
    embed_sum: [K, D] running sum of those vectors.
    z: [..., D] encoder outputs of this batch.
    indices: [...] their assigned codes.
    decay: EMA decay.
    eps: Laplace smoothing, so an unused code keeps a finite vector.
    axis_name: mapped axis (or axes) inside shard_map/pmap.

  Returns:
    (cluster_size [K], embed_sum [K, D], codebook [K, D]) as float32.
  """
  _checks.check_codebook(embed_sum)
  num_codes, dim = embed_sum.shape
  if z.shape[-1] != dim or z.shape[:-1] != indices.shape:
    raise ValueError(
        f"z [..., {dim}] and indices [...] must agree, got {tuple(z.shape)} and "
        f"{tuple(indices.shape)}.")
  flat_z = z.reshape(-1, dim).astype(jnp.float32)
  one_hot = jax.nn.one_hot(indices.reshape(-1), num_codes, dtype=jnp.float32)
  batch_counts = jnp.sum(one_hot, axis=0)
  batch_sums = one_hot.T @ flat_z
  if axis_name is not None:
    batch_counts = jax.lax.psum(batch_counts, axis_name)
    batch_sums = jax.lax.psum(batch_sums, axis_name)
  cluster_size = decay * cluster_size.astype(jnp.float32) + (1 - decay) * batch_counts
  embed_sum = decay * embed_sum.astype(jnp.float32) + (1 - decay) * batch_sums
  total = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
  codebook = embed_sum / smoothed[:, None]
  return cluster_size, embed_sum, codebook
