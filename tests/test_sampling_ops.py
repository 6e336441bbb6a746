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


# ------------------------------------------------------- traced (array) option values


def _random_logits(seed, shape=(4, 6, 13), ties=False):
  logits = 2 * jax.random.normal(jax.random.key(seed), shape)
  return jnp.round(logits) if ties else logits  # rounding makes many equal values


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_with_a_traced_k_equals_the_static_k_filter(ties):
  logits = _random_logits(2, ties=ties)
  vocab = logits.shape[-1]
  traced = jax.jit(lambda x, k: ops.top_k_filter(x, k))
  for k in (-1, 0, 1, 2, 3, 7, 12, 13, 20):
    static = ops.top_k_filter(logits, k)
    np.testing.assert_array_equal(traced(logits, jnp.int32(k)), static, err_msg=f"k={k}")
    if 0 < k < vocab:
      np.testing.assert_array_equal(static, _numpy_top_k(np.asarray(logits), k))
  assert traced._cache_size() == 1  # one program for every k
  # A static bound below V: exact for every k up to it.
  bounded = jax.jit(lambda x, k: ops.top_k_filter(x, k, max_k=8))
  for k in range(0, 9):
    np.testing.assert_array_equal(bounded(logits, jnp.int32(k)), ops.top_k_filter(logits, k))
  assert bounded._cache_size() == 1


def test_traced_top_p_temperature_guidance_and_truncation_equal_the_python_path():
  logits = _random_logits(3)
  traced_p = jax.jit(lambda x, p: ops.top_p_filter(x, p))
  for p in (0.05, 0.3, 0.6, 0.9, 0.999, 1.0):
    np.testing.assert_array_equal(traced_p(logits, jnp.float32(p)), ops.top_p_filter(logits, p))
  assert traced_p._cache_size() == 1

  cond, uncond = _random_logits(4), _random_logits(5)
  # (Separate lambdas: jits of one function share its compilation cache.)
  traced_g = jax.jit(lambda c, u, s: ops.classifier_free_guidance(c, u, s))
  static_g = jax.jit(lambda c, u, s: ops.classifier_free_guidance(c, u, s), static_argnums=2)
  for scale in (0.0, 1.0, 2.5):
    static = static_g(cond, uncond, scale)
    np.testing.assert_array_equal(traced_g(cond, uncond, jnp.float32(scale)), static)
  assert traced_g._cache_size() == 1

  log_p = jax.nn.log_softmax(logits)
  traced_r = jax.jit(lambda x, r: ops.truncate(x, r))
  static_r = jax.jit(lambda x, r: ops.truncate(x, r), static_argnums=1)
  for rate in (1e-3, 0.5, 0.85, 1.0):
    np.testing.assert_array_equal(traced_r(log_p, jnp.float32(rate)), static_r(log_p, rate))
  assert traced_r._cache_size() == 1


def test_sample_logits_with_traced_options_draws_the_same_ids():
  """Same key, same values: the array path (one program) = the Python-number path (one
  program per value), greedy (temperature 0) included."""
  logits = _random_logits(6, (64, 17))
  static = jax.jit(lambda key, x, t, k, p: ops.sample_logits(
      key, x, temperature=t, top_k=k, top_p=p), static_argnums=(2, 3, 4))
  traced = jax.jit(lambda key, x, t, k, p: ops.sample_logits(
      key, x, temperature=t, top_k=k, top_p=p))
  cases = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 10, 0.8), (0.9, 0, 0.6),
           (0.0, 0, 1.0), (0.0, 4, 0.5), (2.0, 16, 0.95)]
  for i, (t, k, p) in enumerate(cases):
    key = jax.random.key(i)
    want = static(key, logits, t, k, p)
    got = traced(key, logits, jnp.float32(t), jnp.int32(k), jnp.float32(p))
    np.testing.assert_array_equal(got, want, err_msg=str((t, k, p)))
  np.testing.assert_array_equal(traced(key, logits, jnp.float32(0.0), jnp.int32(3),
                                       jnp.float32(0.5)), jnp.argmax(logits, axis=-1))
  assert traced._cache_size() == 1
  # Only the temperature: filters stay off (Python defaults), no sort is compiled.
  temperature_only = jax.jit(lambda key, x, t: ops.sample_logits(key, x, temperature=t))
  for t in (0.0, 0.5, 1.5):
    np.testing.assert_array_equal(temperature_only(key, logits, jnp.float32(t)),
                                  static(key, logits, t, 0, 1.0))
  assert temperature_only._cache_size() == 1


def test_traced_option_arrays_are_checked_for_shape_and_dtype():
  logits = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match="top_k must be an int"):
    ops.top_k_filter(logits, jnp.float32(2.0))
  with pytest.raises(ValueError, match="top_k must be an int"):
    ops.top_k_filter(logits, 2.0)
  with pytest.raises(ValueError, match="top_p must be a scalar"):
    ops.top_p_filter(logits, jnp.ones(2))
