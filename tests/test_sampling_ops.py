"""Sampling ops: filters and guidance against hand-computed and NumPy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvq_jax import ops


def _numpy_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _numpy_top_k(logits, k):
  out = logits.copy()
  for row in out.reshape(-1, out.shape[-1]):
    kth = np.sort(row)[::-1][k - 1]
    row[row < kth] = -np.inf
  return out


def _numpy_top_p(logits, p):
  out = np.full_like(logits, -np.inf)
  for row_in, row_out in zip(logits.reshape(-1, logits.shape[-1]),
                             out.reshape(-1, out.shape[-1])):
    probs = _numpy_softmax(row_in.astype(np.float64))
    mass = 0.0
    for index in np.argsort(-row_in, kind="stable"):
      row_out[index] = row_in[index]
      mass += probs[index]
      if mass >= p:
        break
  return out


def test_top_k_and_top_p_on_a_hand_computed_example():
  logits = jnp.log(jnp.array([0.15, 0.5, 0.05, 0.3]))
  top2 = np.asarray(ops.top_k_filter(logits, 2))
  np.testing.assert_array_equal(np.isfinite(top2), [False, True, False, True])
  np.testing.assert_allclose(top2[[1, 3]], np.log([0.5, 0.3]), rtol=1e-6)
  # Sorted masses 0.5, 0.8, 0.95, 1.0: p = 0.8 needs {0.5, 0.3}; p = 0.81 adds 0.15.
  keep = lambda p: np.isfinite(np.asarray(ops.top_p_filter(logits, p)))
  np.testing.assert_array_equal(keep(0.8), [False, True, False, True])
  np.testing.assert_array_equal(keep(0.81), [True, True, False, True])
  np.testing.assert_array_equal(keep(0.01), [False, True, False, False])  # argmax stays
  np.testing.assert_array_equal(keep(1.0), [True] * 4)
  np.testing.assert_array_equal(np.isfinite(ops.top_k_filter(logits, 0)), [True] * 4)


@pytest.mark.parametrize("k", [1, 3, 7, 11])
def test_top_k_matches_numpy_on_random_logits(k):
  logits = np.asarray(jax.random.normal(jax.random.key(k), (5, 3, 11)), np.float32)
  np.testing.assert_array_equal(np.asarray(ops.top_k_filter(jnp.asarray(logits), k)),
                                _numpy_top_k(logits, k))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.6, 0.9, 0.999])
def test_top_p_matches_numpy_on_random_logits(p):
  logits = 2 * np.asarray(jax.random.normal(jax.random.key(1), (4, 6, 13)), np.float32)
  np.testing.assert_array_equal(np.asarray(ops.top_p_filter(jnp.asarray(logits), p)),
                                _numpy_top_p(logits, p))


def test_guidance_is_the_log_probability_extrapolation():
  cond, uncond = (np.asarray(jax.random.normal(jax.random.key(i), (3, 9)), np.float64)
                  for i in (0, 1))
  log_softmax = lambda x: np.log(_numpy_softmax(x))
  for scale in (0.0, 1.0, 3.0):
    expected = log_softmax(uncond) + scale * (log_softmax(cond) - log_softmax(uncond))
    got = ops.classifier_free_guidance(jnp.asarray(cond), jnp.asarray(uncond), scale)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # Scale 1 is the conditional distribution, scale 0 the unconditional one.
  np.testing.assert_allclose(
      jax.nn.softmax(ops.classifier_free_guidance(cond, uncond, 1.0)), _numpy_softmax(cond),
      atol=1e-6)


def test_sampling_frequencies_match_the_filtered_distribution():
  logits = jnp.log(jnp.array([0.05, 0.3, 0.1, 0.4, 0.15]))
  num = 20000
  sample = jax.jit(lambda key, t, k, p: ops.sample_logits(
      key, jnp.broadcast_to(logits, (num, 5)), temperature=t, top_k=k, top_p=p),
                   static_argnums=(1, 2, 3))
  cases = {  # (temperature, top_k, top_p) → expected probabilities
      (1.0, 0, 1.0): np.array([0.05, 0.3, 0.1, 0.4, 0.15]),
      (1.0, 3, 1.0): np.array([0, 0.3, 0, 0.4, 0.15]) / 0.85,
      (1.0, 0, 0.7): np.array([0, 0.3, 0, 0.4, 0]) / 0.7,
      (0.5, 0, 1.0): _numpy_softmax(np.log([0.05, 0.3, 0.1, 0.4, 0.15]) / 0.5),
  }
  for i, ((t, k, p), expected) in enumerate(cases.items()):
    ids = np.asarray(sample(jax.random.key(i), t, k, p))
    freq = np.bincount(ids, minlength=5) / num
    bound = 5 * np.sqrt(expected * (1 - expected) / num) + 1e-9
    assert np.all(np.abs(freq - expected) <= bound), ((t, k, p), freq, expected)
    assert np.all(freq[expected == 0] == 0)
  greedy = ops.sample_logits(jax.random.key(0), jnp.stack([logits, -logits]), temperature=0)
  np.testing.assert_array_equal(greedy, [3, 0])


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="top_p"):
    ops.top_p_filter(jnp.zeros(4), 0.0)
  with pytest.raises(ValueError, match="temperature"):
    ops.sample_logits(jax.random.key(0), jnp.zeros(4), temperature=-1.0)
  with pytest.raises(ValueError, match="differ in shape"):
    ops.classifier_free_guidance(jnp.zeros((2, 4)), jnp.zeros((2, 5)), 2.0)
