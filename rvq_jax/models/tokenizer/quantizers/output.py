"""What every quantizer returns, and the schedule its temperature follows."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from rvq_jax import ops


@struct.dataclass
class QuantizerOutput:
  """The common result of all quantizers (a pytree, so it can leave a `jit`).

  Attributes:
    quantized: [B, ..., D] code vectors for the decoder (straight-through gradients).
    indices: [B, ...] int32 tokens ([B, ..., M] for a factorized quantizer).
    losses: name → float32 scalar, already weighted; the training loss adds them all.
    stats: name → float32 scalar for logging (usage, perplexity, dead codes, temperature).
    aux: what the tokenizer's losses need, same keys for every quantizer:
      `mask` [B, ...] bool, True where the token was sampled (Reg-VQ's stochastic part);
      `deterministic_region` [B, ...] bool, True where the token equals the argmax token
      (the plain L1 loss covers these);
      `sampled_codes`, `argmax_codes` [B, ..., D] float32 code vectors (no gradient);
      `pcl_weights` [B, ...] float32, each image's perturbation weights (sum 1 or all 0).
  """

  quantized: jax.Array
  indices: jax.Array
  losses: dict[str, jax.Array]
  stats: dict[str, jax.Array]
  aux: dict[str, jax.Array]

  @property
  def total_loss(self) -> jax.Array:
    return sum(self.losses.values(), jnp.zeros((), jnp.float32))


def build_aux(mask: jax.Array, indices: jax.Array, argmax_indices: jax.Array,
              codebook: jax.Array) -> dict[str, jax.Array]:
  """The `aux` dict from the used and the argmax tokens ([B, ...] each) and a [K, D] codebook."""
  codebook = jax.lax.stop_gradient(codebook.astype(jnp.float32))
  sampled_codes = ops.lookup(indices, codebook)
  argmax_codes = ops.lookup(argmax_indices, codebook)
  return {
      "mask": mask,
      "deterministic_region": indices == argmax_indices,
      "sampled_codes": sampled_codes,
      "argmax_codes": argmax_codes,
      "pcl_weights": ops.pcl_weights(sampled_codes, argmax_codes),
  }


@dataclasses.dataclass(frozen=True)
class TemperatureSchedule:
  """τ(step): cosine from `start` to `end` over `anneal_steps` (constant `start` if 0).

  Taming's Gumbel-VQ anneals 0.9 → 1e-6; Reg-VQ's default is a constant 1.0.
  """

  start: float = 1.0
  end: float = 1.0
  anneal_steps: int = 0

  def __post_init__(self):
    if self.start <= 0 or self.end <= 0:
      raise ValueError(f"temperatures must be > 0, got start={self.start}, end={self.end}.")
    if self.anneal_steps < 0:
      raise ValueError(f"anneal_steps must be >= 0, got {self.anneal_steps}.")

  def __call__(self, step: int | jax.Array | None) -> jax.Array:
    if step is None or self.anneal_steps == 0:
      return jnp.float32(self.start)
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / self.anneal_steps, 0.0, 1.0)
    cosine = 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.float32(self.end + (self.start - self.end) * cosine)


def check_input(name: str, z: jax.Array, features: int) -> None:
  """Trace-time check of a quantizer input [B, ..., C]."""
  if z.ndim < 2:
    raise ValueError(f"{name} input must be [B, ..., C] (rank >= 2), got shape {tuple(z.shape)}.")
  if z.shape[-1] != features:
    raise ValueError(
        f"{name} expects {features} input features, got shape {tuple(z.shape)} "
        f"(last axis {z.shape[-1]}).")
