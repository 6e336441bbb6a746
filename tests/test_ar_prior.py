"""Auto-regressive prior: KV cache = recomputation, causality, sharding, overfitting."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rvq_jax import ops
from rvq_jax import parallel
from rvq_jax.models.priors.ar import ARPrior
from rvq_jax.models.priors.base import _sample_jit

K, GRID, L = 16, (4, 4), 16
TINY = dict(vocab_size=K, grid_size=GRID, width=32, depth=2, num_heads=4)


def _prior(condition="class", num_subtokens=1, seed=0, **kw):
  return ARPrior(condition=condition, num_subtokens=num_subtokens, num_classes=5,
                 rngs=nnx.Rngs(seed), **{**TINY, **kw})


def _sharpen(model):
  """Larger output weights, so that samples depend strongly on the context."""
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[0] in ("head", "sub_head") and path[-1] == "kernel":
      variable[...] = variable[...] * 100


def _tokens(seed, batch, num_subtokens=1):
  shape = (batch, L) + ((num_subtokens,) if num_subtokens > 1 else ())
  return jax.random.randint(jax.random.key(seed), shape, 0, K, jnp.int32)


@pytest.mark.parametrize("kind,num_subtokens,options", [
    ("none", 1, dict(temperature=0.0)),
    ("class", 1, dict(temperature=1.0, top_k=6, guidance_scale=2.5)),
    ("semantic", 2, dict(temperature=0.0, guidance_scale=3.0)),
    ("class", 2, dict(temperature=0.8, top_p=0.9)),
])
def test_kv_cache_sampling_equals_full_recomputation(kind, num_subtokens, options):
  model = _prior(condition=kind, num_subtokens=num_subtokens)
  _sharpen(model)
  condition = {"none": None, "class": jnp.array([0, 1, 4]),
               "semantic": jnp.arange(3 * L).reshape(3, *GRID) % 5}[kind]
  cached = model.sample(jax.random.key(7), condition, num_samples=3, **options)
  full = model.sample(jax.random.key(7), condition, num_samples=3, use_cache=False, **options)
  assert cached.shape == (3, L) + ((num_subtokens,) if num_subtokens > 1 else ())
  assert cached.dtype == jnp.int32 and int(cached.min()) >= 0 and int(cached.max()) < K
  np.testing.assert_array_equal(cached, full)
  # Samples are not all the same (the test would be vacuous otherwise).
  assert len(np.unique(np.asarray(cached))) > 2


def test_logits_at_i_ignore_later_tokens_and_sub_tokens():
  model = _prior(condition="semantic", num_subtokens=2)
  logits = nnx.jit(lambda m, t, c: m.logits(t, c))
  tokens, condition = _tokens(0, 2, 2), jnp.zeros((2, *GRID), jnp.int32)
  base = logits(model, tokens, condition)
  assert base.shape == (2, L, 2, K)
  i = 6
  later = tokens.at[:, i + 1:].set(_tokens(1, 2, 2)[:, i + 1:])
  np.testing.assert_allclose(logits(model, later, condition)[:, :i + 1], base[:, :i + 1],
                             rtol=1e-6, atol=1e-6)
  # Sub-token m of position i sees sub-tokens < m of position i and nothing after.
  second = tokens.at[:, i, 1].set((tokens[:, i, 1] + 1) % K)
  np.testing.assert_allclose(logits(model, second, condition)[:, :i + 1], base[:, :i + 1],
                             rtol=1e-6, atol=1e-6)
  first = logits(model, tokens.at[:, i, 0].set((tokens[:, i, 0] + 1) % K), condition)
  np.testing.assert_allclose(first[:, i, 0], base[:, i, 0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(first[:, i, 1], base[:, i, 1])
  assert not np.allclose(first[:, i + 1], base[:, i + 1])
  # ... and the condition reaches every position.
  other = logits(model, tokens, condition + 1)
  assert not np.allclose(other[:, 0], base[:, 0])


def test_log_likelihood_matches_the_deterministic_loss():
  model = _prior(num_subtokens=2)
  tokens, condition = _tokens(0, 3, 2), jnp.array([0, 2, 4])

  @nnx.jit
  def both(model, tokens, condition):
    loss, metrics = model.loss(tokens, condition, key=jax.random.key(0), deterministic=True)
    return loss, metrics, model.log_likelihood(tokens, condition)

  loss, metrics, log_likelihood = both(model, tokens, condition)
  assert log_likelihood.shape == (3,)
  np.testing.assert_allclose(-jnp.mean(log_likelihood) / (L * 2), loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["nll"], loss)
  assert abs(float(loss) - math.log(K)) < 0.2  # N(0, 0.02) output init: near uniform
  assert 0.0 <= float(metrics["accuracy"]) <= 1.0


def test_sharded_loss_and_gradient_equal_single_device():
  model = _prior(num_subtokens=2, dropout=0.1, depth=1)
  tokens, condition = _tokens(0, 8, 2), jnp.arange(8) % 5
  key = jax.random.key(3)

  def loss_and_grad(model, tokens, condition, key):
    return nnx.value_and_grad(lambda m: m.loss(
        tokens, condition, key=key, condition_dropout=0.3, pkeep=0.8)[0])(model)

  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, t, c, k: loss_and_grad(nnx.merge(graphdef, state), t, c, k))
  single = step(state, tokens, condition, key)
  mesh = parallel.make_mesh((4, 2, 1))
  shardings = parallel.state_shardings(state, mesh)
  sharded_state = jax.device_put(state, shardings)
  assert any(axis is not None for s in jax.tree.leaves(shardings) for axis in s.spec)
  sharded = step(sharded_state, jax.device_put(tokens, parallel.batch_sharding(mesh, 3)),
                 jax.device_put(condition, parallel.batch_sharding(mesh, 1)), key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), single, sharded)


def test_tiny_model_overfits_a_tiny_token_set():
  model = _prior(condition="none", dropout=0.0)
  tokens = _tokens(5, 4)
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def train(model, optimizer, tokens):
    def body(i, carry):
      model, optimizer = carry
      grads = nnx.grad(lambda m: m.loss(tokens, None, key=jax.random.key(i))[0])(model)
      optimizer.update(model, grads)
      return model, optimizer
    nnx.fori_loop(0, 150, body, (model, optimizer))
    return model.loss(tokens, None, key=jax.random.key(0), deterministic=True)

  loss, metrics = train(model, optimizer, tokens)
  assert float(loss) < 0.2 * math.log(K), float(loss)
  assert float(metrics["accuracy"]) > 0.9


def test_bfloat16_compute_gives_a_finite_loss_and_float32_params():
  model = _prior(condition="none", dtype="bfloat16")
  loss, _ = nnx.jit(lambda m, t: m.loss(t, None, key=jax.random.key(0)))(model, _tokens(0, 2))
  assert np.isfinite(float(loss))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_bad_arguments_fail_before_compiling():
  with pytest.raises(ValueError, match="divisible"):
    _prior(width=30)
  with pytest.raises(ValueError, match="kind"):
    _prior(condition="text")
  plain, factorized = _prior(), _prior(num_subtokens=2)
  condition = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="tokens must be"):
    plain.loss(_tokens(0, 2, 2), condition, key=jax.random.key(0))
  with pytest.raises(ValueError, match="tokens must be"):
    factorized.log_likelihood(_tokens(0, 2), condition)
  with pytest.raises(ValueError, match="tokens must be"):
    plain.loss(jnp.zeros((2, L - 1), jnp.int32), condition, key=jax.random.key(0))
  with pytest.raises(ValueError, match="needs a condition"):
    plain.loss(_tokens(0, 2), None, key=jax.random.key(0))
  with pytest.raises(ValueError, match="condition"):
    plain.sample(jax.random.key(0), jnp.zeros((2, *GRID), jnp.int32), num_samples=2)
  unconditional = _prior(condition="none")
  with pytest.raises(ValueError, match="condition=None"):
    unconditional.loss(_tokens(0, 2), condition, key=jax.random.key(0))
  with pytest.raises(ValueError, match="guidance"):
    unconditional.sample(jax.random.key(0), None, num_samples=2, guidance_scale=2.0)
  with pytest.raises(ValueError, match="pkeep"):
    plain.loss(_tokens(0, 2), condition, key=jax.random.key(0), pkeep=0.0)


# ------------------------------------------------------- sampling without recompiles


def _reference_samples(model, key, condition, num_samples, *, temperature=1.0, top_k=0,
                       top_p=1.0, guidance_scale=1.0):
  """The pre-traced sampler, brute force: teacher-forced logits of the whole sequence
  per (position, sub-token), guidance and `ops.sample_logits` with Python numbers (each
  value its own program), the sampler's keys (fold_in(key, i), then fold_in(·, m))."""
  m = model.num_subtokens
  guided = guidance_scale != 1.0
  batch = 2 * num_samples if guided else num_samples
  drop = jnp.arange(batch) >= num_samples if guided else None
  cond = jnp.concatenate([condition, condition]) if guided else condition
  logits_fn = nnx.jit(lambda model, tokens: model.logits(tokens, cond, drop=drop))

  @jax.jit
  def draw(step_key, logits):  # [batch, K] → [n]
    if guided:
      logits = ops.classifier_free_guidance(logits[:num_samples], logits[num_samples:],
                                            guidance_scale)
    return ops.sample_logits(step_key, logits, temperature=temperature, top_k=top_k,
                             top_p=top_p)

  tokens = jnp.zeros((num_samples, L, m), jnp.int32)
  for i in range(L):
    for j in range(m):
      both = jnp.concatenate([tokens, tokens]) if guided else tokens
      logits = logits_fn(model, both if m > 1 else both[..., 0])[:, i, j]
      step_key = jax.random.fold_in(key, i)
      step_key = jax.random.fold_in(step_key, j) if m > 1 else step_key
      tokens = tokens.at[:, i, j].set(draw(step_key, logits))
  return tokens[..., 0] if m == 1 else tokens


OPTION_SERIES = [  # each group: one static structure, two or three values
    [dict(temperature=0.7), dict(temperature=1.3), dict(temperature=0.0)],
    [dict(top_k=5), dict(top_k=10)],
    [dict(top_p=0.9), dict(top_p=0.8)],
    [dict(guidance_scale=2.0), dict(guidance_scale=3.0)],
]


def test_changing_sampling_values_compiles_once_per_static_structure(monkeypatch):
  """temperature 0.7 → 1.3 → 0 (greedy), top_k 5 → 10, top_p 0.9 → 0.8, guidance 2 → 3:
  four structures, four traces and four compiled programs, not one per value; and every
  sample equals the brute-force Python-number sampler's for the same key."""
  model = _prior(condition="class")  # not sharpened: every filter value matters
  structures = []
  trace = ARPrior._sample_impl

  def counting(self, *args, **options):
    structures.append({k: options[k] for k in ("guided", "top_k_on", "top_p_on")})
    return trace(self, *args, **options)

  monkeypatch.setattr(ARPrior, "_sample_impl", counting)
  _sample_jit.clear_cache()
  condition, key = jnp.array([0, 1, 4, 2, 3]), jax.random.key(11)
  samples = {}
  for group in OPTION_SERIES:
    for options in group:
      name = str(options)
      samples[name] = model.sample(key, condition, num_samples=5, **options)
      np.testing.assert_array_equal(samples[name],
                                    _reference_samples(model, key, condition, 5, **options),
                                    err_msg=name)
  assert structures == [
      dict(guided=False, top_k_on=False, top_p_on=False),
      dict(guided=False, top_k_on=True, top_p_on=False),
      dict(guided=False, top_k_on=False, top_p_on=True),
      dict(guided=True, top_k_on=False, top_p_on=False)]
  assert _sample_jit._cache_size() == 4
  # The values reached the programs: each series' samples differ.
  for group in OPTION_SERIES:
    assert len({np.asarray(samples[str(options)]).tobytes() for options in group}) == len(group)


@pytest.mark.parametrize("num_subtokens,options", [
    (1, dict(temperature=0.9, top_k=6, top_p=0.7, guidance_scale=2.5)),
    (2, dict(temperature=1.2, top_k=9, guidance_scale=1.5)),
    (2, dict(temperature=0.0, top_p=0.5)),
])
def test_samples_equal_the_python_number_reference(num_subtokens, options):
  model = _prior(condition="class", num_subtokens=num_subtokens)
  _sharpen(model)
  condition, key = jnp.array([3, 0, 1]), jax.random.key(5)
  want = _reference_samples(model, key, condition, 3, **options)
  for use_cache in (True, False):
    np.testing.assert_array_equal(
        model.sample(key, condition, num_samples=3, use_cache=use_cache, **options), want)


def test_traced_options_inside_a_users_jit_compile_once():
  """Arrays as options (here traced by an outer jit) skip the Python checks and compile
  every feature in; guidance 1 and k 0 / p 1 then equal the unguided, unfiltered path."""
  model = _prior(condition="class")
  _sharpen(model)
  condition, key = jnp.array([0, 1, 4]), jax.random.key(2)

  @jax.jit
  def draw(temperature, top_k, top_p, guidance_scale):
    return model.sample(key, condition, num_samples=3, temperature=temperature,
                        top_k=top_k, top_p=top_p, guidance_scale=guidance_scale)

  for t, k, p, g in [(0.8, 4, 0.9, 2.0), (1.1, 0, 1.0, 3.0), (0.0, 2, 0.5, 1.5)]:
    np.testing.assert_array_equal(
        draw(t, jnp.int32(k), p, g),
        model.sample(key, condition, num_samples=3, temperature=t, top_k=k, top_p=p,
                     guidance_scale=g))
  assert draw._cache_size() == 1
  # Guidance scale 1 on the guided program gives the conditional distribution: the same
  # greedy tokens as the unguided program.
  np.testing.assert_array_equal(
      draw(0.0, jnp.int32(0), 1.0, 1.0),
      model.sample(key, condition, num_samples=3, temperature=0.0))
  with pytest.raises(ValueError, match="top_k must be an int"):
    model.sample(key, condition, num_samples=3, top_k=jnp.float32(3.0))
  with pytest.raises(ValueError, match="max_top_k"):
    model.sample(key, condition, num_samples=3, top_k=9, max_top_k=8)
