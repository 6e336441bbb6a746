"""Gumbel-softmax sampling of tokens, hard (straight-through) or soft."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rvq_jax.ops import _checks
from rvq_jax.ops.reductions import argmax_last
from rvq_jax.ops.straight_through import straight_through

PRNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")


def gumbel_noise(key: jax.Array, shape: tuple[int, ...], *, prng: str = "threefry") -> jax.Array:
  """Gumbel(0, 1) noise of `shape` [..., K] in float32, for the categorical quantizers.

  `prng='threefry'`: row r of the flattened leading axes is `gumbel_rows(key, r, K)`, so
  `ops.categorical_quantize` can draw any rows of it block by block and get the same
  numbers. 'rbg' and 'unsafe_rbg' derive a key of that implementation from 4 words of
  `key` and draw the whole array from XLA's RngBitGenerator: cheap on TPUs, but its bits
  depend on the backend and may change with how the computation is sharded, so runs are
  reproducible only on the same backend and sharding (benchmarks/README.md has the CPU
  measurements).

  Args:
    key: PRNG key.
    shape: output shape.
    prng: 'threefry', 'rbg' or 'unsafe_rbg'.

  Returns:
    float32 array of `shape`.
  """
  if prng not in PRNG_IMPLS:
    raise ValueError(f"prng must be one of {PRNG_IMPLS}, got {prng!r}.")
  if prng == "threefry":
    rows = jnp.arange(math.prod(shape[:-1]), dtype=jnp.int32).reshape(shape[:-1])
    return gumbel_rows(key, rows, shape[-1])
  key = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl=prng)
  return jax.random.gumbel(key, shape, jnp.float32)


# Threefry-2x32 with 20 rounds (Salmon et al., SC 2011), as jax.random uses it.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = 0x1BD11BDA


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return (x << jnp.uint32(bits)) | (x >> jnp.uint32(32 - bits))


@jax.jit
def threefry2x32(key0: jax.Array, key1: jax.Array, count0: jax.Array,
                 count1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32-20 block function, elementwise over broadcast uint32 arrays.

  Bit for bit `jax.extend.random.threefry_2x32`, written out: XLA's CPU backend lowers
  JAX's version as a loop over its 5 groups of 4 rounds that copies its state arrays
  every turn; unrolled, the whole hash is one elementwise fusion. (Jitted: eager calls
  run it as one program.)

  Returns:
    The two output words.
  """
  keys = (key0, key1, key0 ^ key1 ^ jnp.uint32(_KEY_PARITY))
  x0, x1 = count0 + keys[0], count1 + keys[1]
  for group in range(5):
    for rotation in _ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    x0 = x0 + keys[(group + 1) % 3]
    x1 = x1 + keys[(group + 2) % 3] + jnp.uint32(group + 1)
  return x0, x1


def gumbel_rows(key: jax.Array, rows: jax.Array, num_codes: int) -> jax.Array:
  """Gumbel(0, 1) noise rows, each a function of (key, its row id) only.

  Row r is drawn from the key `fold_in(key, r)` with threefry2x32 counters 0 … K − 1,
  both output words of each block used (JAX's `threefry_2x32(fold_in(key, r),
  arange(K))`). So any subset of rows can be drawn in any order or block size and gives
  the same numbers: the Gumbel noise of Reg-VQ's stochastic positions is defined by
  their row ids, whatever blocks compute it.

  Args:
    key: PRNG key (threefry2x32; another kind is first turned into one).
    rows: [...] int32 row ids.
    num_codes: K, noise values per row.

  Returns:
    [..., K] float32.
  """
  if jax.random.key_data(key).shape != (2,):
    key = jax.random.wrap_key_data(jax.random.bits(key, (2,), jnp.uint32), impl="threefry2x32")
  key0, key1 = jax.random.key_data(key).astype(jnp.uint32)
  ids = rows.reshape(-1, 1).astype(jnp.uint32)
  # fold_in(key, r): the block of counter (0, r).
  row0, row1 = threefry2x32(key0, key1, jnp.zeros_like(ids), ids)
  # Counters 0 … K − 1 (padded to even), the first half as word 0, the second as word 1.
  half = (num_codes + 1) // 2
  counts = jnp.arange(2 * half, dtype=jnp.uint32)
  if num_codes % 2:
    counts = counts.at[-1].set(0)
  bits0, bits1 = threefry2x32(row0, row1, counts[:half], counts[half:])
  bits = jnp.concatenate([bits0, bits1], axis=-1)[:, :num_codes]
  # JAX's uniform on [tiny, 1): 23 random mantissa bits, then the Gumbel transform.
  mantissa = (bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000)
  uniform = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0
  tiny = jnp.finfo(jnp.float32).tiny
  uniform = jnp.maximum(tiny, uniform * (1.0 - tiny) + tiny)
  noise = -jnp.log(-jnp.log(uniform))
  return noise.reshape(rows.shape + (num_codes,))


def gumbel_softmax(
    key: jax.Array | None,
    logits: jax.Array,
    *,
    tau: float | jax.Array = 1.0,
    hard: bool = True,
    noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Samples a token per position from softmax(logits) with the Gumbel-max trick.

  Forward: index = argmax(ℓ + g), g ~ Gumbel(0, 1), so indices follow softmax(ℓ) exactly.
  With `hard=True` the returned sample is that one-hot, carrying the gradient of
  softmax((ℓ + g)/τ) (straight-through); with `hard=False` it is the soft sample itself.

  Args:
    key: PRNG key (unused when `noise` is given).
    logits: [..., K] unnormalized log-probabilities.
    tau: temperature of the relaxed (soft) sample; > 0.
    hard: return the straight-through one-hot (True) or the relaxed sample (False).
    noise: optional Gumbel(0, 1) noise of the logits' shape to use instead of drawing it
      from `key` (to compare implementations on the same noise).

  Returns:
    (sample [..., K] in the dtype of `logits`, indices [...] int32 = argmax of ℓ + g).
  """
  _checks.check_min_rank("logits", logits, 1)
  logits32 = logits.astype(jnp.float32)
  if noise is None:
    noise = jax.random.gumbel(key, logits.shape, jnp.float32)
  _checks.check_same_shape(("noise", "logits"), noise, logits)
  perturbed = logits32 + noise.astype(jnp.float32)
  indices = argmax_last(perturbed)
  soft = jax.nn.softmax(perturbed / tau, axis=-1)
  if not hard:
    return soft.astype(logits.dtype), indices
  one_hot = jax.nn.one_hot(indices, logits.shape[-1], dtype=jnp.float32)
  return straight_through(one_hot, soft).astype(logits.dtype), indices
