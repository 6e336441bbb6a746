"""Codebook-usage regularizers: KL of token distributions to uniform, and entropy terms.

All arithmetic is float32 whatever the input dtype (log and entropy lose too much in
bfloat16). The statistics over positions are *global*: under `jax.jit` with sharded
inputs the mean already spans every device; inside `shard_map`/`pmap`, pass the mapped
`axis_name` and the per-device means are averaged across it (the shards must hold equal
numbers of positions, as even sharding guarantees).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from rvq_jax.ops import _checks

AxisName = str | Sequence[str] | None


def _mean_distribution(probs: jax.Array, axis_name: AxisName) -> jax.Array:
  probs32 = probs.astype(jnp.float32).reshape(-1, probs.shape[-1])
  mean = jnp.mean(probs32, axis=0)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  return mean


def _entropy(probs: jax.Array) -> jax.Array:
  """−Σ p log p with 0 log 0 = 0 in value *and* gradient.

  Probabilities that underflow to exactly 0 (sharp softmaxes, unused codes) would give
  d(p log p)/dp = log p + 1 = −inf, and −inf · 0 = NaN in the chain rule; taking the log
  of 1 there keeps the derivative finite (0) without changing the value.
  """
  safe = jnp.where(probs > 0, probs, 1.0)
  return -jnp.sum(probs * jnp.log(safe), axis=-1)


def kl_to_uniform(probs: jax.Array, *, axis_name: AxisName = None) -> jax.Array:
  """Reg-VQ's prior regularizer KL(p̄ ‖ uniform) = log K − H(p̄).

  p̄ is the mean token distribution over every position of the global batch; the loss
  is 0 when codes are used uniformly and log K when all positions pick one code.

  Args:
    probs: [..., K] token distributions (each row sums to 1).
    axis_name: mapped axis (or axes) to average p̄ over inside shard_map/pmap.

  Returns:
    float32 scalar.
  """
  _checks.check_min_rank("probs", probs, 1)
  mean = _mean_distribution(probs, axis_name)
  num_codes = probs.shape[-1]
  # Σ p̄ log(K p̄), not log K − H(p̄): near uniform use the two are nearly equal numbers
  # (log K alone has a float32 rounding of ~2e-7), while K p̄ ≈ 1 keeps every term small.
  # Where p̄ = 0 the term is 0 in value and gradient (log of 1, not of 0).
  safe = jnp.where(mean > 0, mean, 1.0 / num_codes)
  return jnp.sum(mean * jnp.log(num_codes * safe))


def per_position_kl_to_uniform(probs: jax.Array, *, axis_name: AxisName = None) -> jax.Array:
  """Gumbel-VQ's term: the mean over positions of KL(p_i ‖ uniform) = log K − H(p_i).

  Unlike `kl_to_uniform`, this pushes every single position towards uniform
  (taming-transformers' GumbelQuantize), not the batch's code usage.

  Args:
    probs: [..., K] token distributions.
    axis_name: mapped axis (or axes) to average over inside shard_map/pmap.

  Returns:
    float32 scalar.
  """
  _checks.check_min_rank("probs", probs, 1)
  probs32 = probs.astype(jnp.float32)
  per_position = jnp.log(jnp.float32(probs.shape[-1])) - _entropy(probs32)
  value = jnp.mean(per_position)
  if axis_name is not None:
    value = jax.lax.pmean(value, axis_name)
  return value


def mean_position_entropy(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    axis_name: AxisName = None,
) -> jax.Array:
  """mean_i H(softmax(ℓ_i / temperature)): the per-position half of FQGAN's entropy loss.

  Minimizing it makes every position confident; on its own it can collapse the codebook,
  so it is paired with a term that spreads the batch mean (Reg-VQ's `kl_to_uniform`).

  Args:
    logits: [..., K] affinities.
    temperature: softmax temperature.
    axis_name: mapped axis (or axes) to average over inside shard_map/pmap.

  Returns:
    float32 scalar in [0, log K].
  """
  _checks.check_min_rank("logits", logits, 1)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  # −Σ p log p from log-probabilities: finite where p underflows (p = 0 → term 0).
  value = jnp.mean(-jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1))
  if axis_name is not None:
    value = jax.lax.pmean(value, axis_name)
  return value


def entropy_loss(
    logits: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    axis_name: AxisName = None,
) -> jax.Array:
  """MaskGIT/FQGAN codebook entropy loss: mean per-position entropy − entropy of the mean.

  Minimizing it makes each position confident (low H(p_i)) while the batch as a whole
  uses many codes (high H(p̄)). For a distance-based quantizer pass logits = −distances
  (FQGAN uses temperature 0.01).

  Args:
    logits: [..., K] affinities.
    temperature: softmax temperature.
    axis_name: mapped axis (or axes) for the global statistics inside shard_map/pmap.

  Returns:
    float32 scalar H_sample − H_avg.
  """
  _checks.check_min_rank("logits", logits, 1)
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  sample_entropy = jnp.mean(_entropy(probs))
  if axis_name is not None:
    sample_entropy = jax.lax.pmean(sample_entropy, axis_name)
  average_entropy = _entropy(_mean_distribution(probs, axis_name))
  return sample_entropy - average_entropy
