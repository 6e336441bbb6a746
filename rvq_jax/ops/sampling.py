"""Logit filtering, classifier-free guidance and categorical sampling for the priors.

Shapes: any leading batch dimensions, the vocabulary on the last axis. Filters return
float32 logits in which every removed entry is exactly −inf (so that softmax gives it
probability 0 and `jax.random.categorical` never picks it); the kept entries are
unchanged. Each filter always keeps at least the argmax, so a row is never all −inf.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_logits(logits: jax.Array) -> jax.Array:
  logits = jnp.asarray(logits)
  if logits.ndim < 1 or logits.shape[-1] < 1:
    raise ValueError(f"logits need a non-empty last (vocabulary) axis, got {logits.shape}.")
  return logits.astype(jnp.float32)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row, sets the rest to −inf: [..., V] → [..., V].

  k <= 0 or k >= V keeps everything. Ties at the k-th value are all kept (as taming's
  `top_k_logits`, which compares against the k-th largest value).
  """
  logits = _check_logits(logits)
  if not isinstance(k, int):
    raise ValueError(f"top_k must be an int, got {k!r}.")
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the smallest set of largest-probability entries whose mass ≥ p.

  [..., V] → [..., V]. Probabilities are softmax(logits) in float32. Sorted descending,
  entry i is kept iff the mass of the entries before it is < p, so the argmax is always
  kept and p >= 1 keeps everything. Ties are broken by index (sort order).
  """
  logits = _check_logits(logits)
  p = float(p)
  if not 0.0 < p:
    raise ValueError(f"top_p must be in (0, 1], got {p}.")
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1, stable=True)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_before < p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # Scatter the sorted decisions back to vocabulary order.
  inverse = jnp.argsort(order, axis=-1)
  keep = jnp.take_along_axis(keep_sorted, inverse, axis=-1)
  return jnp.where(keep, logits, -jnp.inf)


def classifier_free_guidance(cond_logits: jax.Array, uncond_logits: jax.Array,
                             scale: float) -> jax.Array:
  """uncond + scale·(cond − uncond) on log-probabilities: [..., V] × 2 → [..., V].

  Both inputs are log-softmax-normalized first (so the result is VQ-Diffusion's
  `log p_u + s·(log p_c − log p_u)`, unnormalized; sampling renormalizes). scale = 1
  gives log p_cond, scale = 0 log p_uncond. Returns float32.
  """
  cond = jax.nn.log_softmax(_check_logits(cond_logits), axis=-1)
  uncond = jax.nn.log_softmax(_check_logits(uncond_logits), axis=-1)
  if cond.shape != uncond.shape:
    raise ValueError(f"cond and uncond logits differ in shape: {cond.shape} vs {uncond.shape}.")
  return uncond + scale * (cond - uncond)


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """logits / temperature, then top-k, then top-p (taming's order); temperature > 0."""
  if not float(temperature) > 0:
    raise ValueError(f"filter_logits needs temperature > 0, got {temperature}.")
  logits = _check_logits(logits) / float(temperature)
  return top_p_filter(top_k_filter(logits, top_k), top_p)


def sample_logits(key: jax.Array, logits: jax.Array, *, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Samples ids [...] int32 from logits [..., V].

  temperature 0 is greedy (argmax; filters are irrelevant then and the key is unused);
  otherwise a categorical draw from softmax(filter_logits(logits)).
  """
  temperature = float(temperature)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}.")
  logits = _check_logits(logits)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
