"""Logit filtering, classifier-free guidance and categorical sampling for the priors.

Shapes: any leading batch dimensions, the vocabulary on the last axis. Filters return
float32 logits in which every removed entry is exactly −inf (so that softmax gives it
probability 0 and `jax.random.categorical` never picks it); the kept entries are
unchanged. Each filter always keeps at least the argmax, so a row is never all −inf.

Options (temperature, top_k, top_p, guidance scale) are either Python numbers or
scalar arrays. A Python number is checked here (clear errors before anything compiles)
and selects the cheapest program (top_k 0, top_p 1: no filter; temperature 0: argmax).
An array, traced or not, is a run-time value: it is not checked, the feature is always
compiled in, and the value only selects a branch with `jnp.where`, so a jitted caller
that passes arrays compiles once for every value; the results equal the Python-number
path's for the same values (same filters, same draw from the same key).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def _check_logits(logits: jax.Array) -> jax.Array:
  logits = jnp.asarray(logits)
  if logits.ndim < 1 or logits.shape[-1] < 1:
    raise ValueError(f"logits need a non-empty last (vocabulary) axis, got {logits.shape}.")
  return logits.astype(jnp.float32)


def _scalar_array(name: str, value, *, integer: bool = False) -> jax.Array:
  """A run-time option value as a 0-d array (float32, or int32 with `integer`)."""
  value = jnp.asarray(value)
  if value.ndim != 0:
    raise ValueError(f"{name} must be a scalar, got shape {value.shape}.")
  if integer:
    if not jnp.issubdtype(value.dtype, jnp.integer):
      raise ValueError(f"{name} must be an int, got an array of {value.dtype}.")
    return value.astype(jnp.int32)
  return value.astype(jnp.float32)


def top_k_filter(logits: jax.Array, k, *, max_k: int | None = None) -> jax.Array:
  """Keeps the k largest logits of each row, sets the rest to −inf: [..., V] → [..., V].

  k <= 0 or k >= V keeps everything. Ties at the k-th value are all kept (as taming's
  `top_k_logits`, which compares against the k-th largest value).

  k: a Python int (the k largest via `lax.top_k(logits, k)`), or a scalar integer array
  (traced or not; one program for every k): the row is sorted down to a static bound,
  `max_k` (default and at most V), and the threshold is the k-th largest value read at
  a dynamic index. An array k in (max_k, V) acts as max_k, so a `max_k` below V must be
  an upper bound of the k used; with the default the result equals the int path's.
  """
  logits = _check_logits(logits)
  vocab = logits.shape[-1]
  if isinstance(k, numbers.Integral) and not isinstance(k, bool):
    k = int(k)
    if k <= 0 or k >= vocab:
      return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)
  if isinstance(k, (numbers.Number, bool)):
    raise ValueError(f"top_k must be an int, got {k!r}.")
  k = _scalar_array("top_k", k, integer=True)
  if max_k is not None and (not isinstance(max_k, int) or max_k < 1):
    raise ValueError(f"max_k must be a positive int, got {max_k!r}.")
  bound = vocab if max_k is None else min(max_k, vocab)
  largest = jax.lax.top_k(logits, bound)[0]  # [..., bound], descending
  kth = jax.lax.dynamic_index_in_dim(largest, jnp.clip(k, 1, bound) - 1, axis=logits.ndim - 1)
  filtered = jnp.where(logits < kth, -jnp.inf, logits)
  return jnp.where((k <= 0) | (k >= vocab), logits, filtered)


def top_p_filter(logits: jax.Array, p) -> jax.Array:
  """Nucleus filter: keeps the smallest set of largest-probability entries whose mass ≥ p.

  [..., V] → [..., V]. Probabilities are softmax(logits) in float32. Sorted descending,
  entry i is kept iff the mass of the entries before it is < p, so the argmax is always
  kept and p >= 1 keeps everything. Ties are broken by index (sort order). p: a Python
  number in (0, 1] (checked), or a scalar array (unchecked; p >= 1 keeps everything).
  """
  logits = _check_logits(logits)
  static = isinstance(p, numbers.Real)
  if static:
    p = float(p)
    if not 0.0 < p:
      raise ValueError(f"top_p must be in (0, 1], got {p}.")
    if p >= 1.0:
      return logits
  else:
    p = _scalar_array("top_p", p)
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # Scatter the sorted decisions back to vocabulary order.
  inverse = jnp.argsort(order, axis=-1)
  keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
  if not static:
    keep = keep | (p >= 1.0)
  return jnp.where(keep, logits, -jnp.inf)


def classifier_free_guidance(cond_logits: jax.Array, uncond_logits: jax.Array,
                             scale) -> jax.Array:
  """uncond + scale·(cond − uncond) on log-probabilities: [..., V] × 2 → [..., V].

  Both inputs are log-softmax-normalized first (so the result is VQ-Diffusion's
  `log p_u + s·(log p_c − log p_u)`, unnormalized; sampling renormalizes). scale = 1
  gives log p_cond, scale = 0 log p_uncond; a Python number or a scalar array (traced).
  Returns float32.
  """
  cond = jax.nn.log_softmax(_check_logits(cond_logits), axis=-1)
  uncond = jax.nn.log_softmax(_check_logits(uncond_logits), axis=-1)
  if cond.shape != uncond.shape:
    raise ValueError(f"cond and uncond logits differ in shape: {cond.shape} vs {uncond.shape}.")
  if not isinstance(scale, numbers.Real):
    scale = _scalar_array("guidance scale", scale)
  return uncond + scale * (cond - uncond)


def filter_logits(logits: jax.Array, *, temperature=1.0, top_k=0, top_p=1.0,
                  max_top_k: int | None = None) -> jax.Array:
  """logits / temperature, then top-k, then top-p (taming's order); temperature > 0.

  Each option is a Python number (checked) or a scalar array (run-time, unchecked; see
  the module docstring); `max_top_k` is `top_k_filter`'s static bound for an array k.
  """
  if isinstance(temperature, numbers.Real):
    if not float(temperature) > 0:
      raise ValueError(f"filter_logits needs temperature > 0, got {temperature}.")
    temperature = float(temperature)
  else:
    temperature = _scalar_array("temperature", temperature)
  logits = _check_logits(logits) / temperature
  return top_p_filter(top_k_filter(logits, top_k, max_k=max_top_k), top_p)


def sample_logits(key: jax.Array, logits: jax.Array, *, temperature=1.0, top_k=0,
                  top_p=1.0, max_top_k: int | None = None) -> jax.Array:
  """Samples ids [...] int32 from logits [..., V].

  temperature 0 is greedy (argmax; filters are irrelevant then and the key is unused);
  otherwise a categorical draw from softmax(filter_logits(logits)). A Python temperature
  (checked, >= 0) picks one of the two programs; an array temperature (traced or not,
  unchecked) compiles both and selects per value with `jnp.where` (<= 0: greedy), so
  one program serves greedy and sampling alike and gives the same ids as the
  Python-number path.
  """
  logits = _check_logits(logits)
  if isinstance(temperature, numbers.Real):
    temperature = float(temperature)
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             max_top_k=max_top_k)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
  temperature = _scalar_array("temperature", temperature)
  greedy = temperature <= 0.0
  filtered = filter_logits(logits, temperature=jnp.where(greedy, 1.0, temperature),
                           top_k=top_k, top_p=top_p, max_top_k=max_top_k)
  drawn = jax.random.categorical(key, filtered, axis=-1)
  return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)
