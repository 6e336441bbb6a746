"""The VQ-Diffusion prior: loss at every t, importance sampling, overfitting, sampling,
sharding, and argument checks. Tiny models: width 32, 2 layers, K=16, 4×4 grids, T=10."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rvq_jax import config as config_lib
from rvq_jax import ops
from rvq_jax import parallel
from rvq_jax.models.priors.base import _sample_jit
from rvq_jax.models.priors.diffusion import DiffusionLossHistory
from rvq_jax.models.priors.diffusion import DiffusionPrior
from rvq_jax.ops import diffusion

K, T, GRID, L = 16, 10, (4, 4), 16


def _prior(condition="none", num_subtokens=1, **overrides):
  config = dict(vocab_size=K, num_subtokens=num_subtokens, grid_size=GRID,
                condition=condition, num_classes=3 if condition != "none" else 0,
                num_timesteps=T, width=32, depth=2, num_heads=2, mlp_ratio=2,
                aux_weight=1e-3)
  config.update(overrides)
  return DiffusionPrior(**config, rngs=nnx.Rngs(0))


def _tokens(batch, num_subtokens=1, key=0):
  shape = (batch, L) if num_subtokens == 1 else (batch, L, num_subtokens)
  return jax.random.randint(jax.random.key(key), shape, 0, K)


def _condition(kind, batch):
  if kind == "class":
    return jnp.arange(batch) % 3
  if kind == "semantic":
    return jax.random.randint(jax.random.key(5), (batch, *GRID), 0, 3)
  return None


def test_loss_is_finite_at_every_timestep_with_finite_gradients():
  condition, num_subtokens = "semantic", 2
  prior = _prior(condition, num_subtokens)
  tokens = _tokens(T, num_subtokens)  # one row per t, t = 0 and T−1 included
  cond = _condition(condition, T)

  @nnx.jit
  def loss_and_grad(prior, tokens, cond):
    def loss_fn(prior):
      return prior.loss(tokens, cond, key=jax.random.key(1), condition_dropout=0.5,
                        timesteps=jnp.arange(T))
    return nnx.value_and_grad(loss_fn, has_aux=True, argnums=nnx.DiffState(0, nnx.Param))(
        prior)

  (loss, metrics), grads = loss_and_grad(prior, tokens, cond)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(np.isfinite(float(v)) for v in metrics.values())
  np.testing.assert_allclose(metrics["vlb_bits"], metrics["vlb"] / np.log(2), rtol=1e-6)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  # Training mode recorded each t once.
  np.testing.assert_array_equal(prior.loss_count[...], np.ones(T))


def test_importance_history_is_state_not_a_param_and_updates_only_in_training():
  prior = _prior()
  assert not issubclass(DiffusionLossHistory, nnx.Param)
  assert len(jax.tree.leaves(nnx.state(prior, DiffusionLossHistory))) == 2
  params = nnx.state(prior, nnx.Param)
  assert "loss_sq" not in params and "loss_count" not in params
  assert "loss_sq" in nnx.state(prior) and "tok_embed" in params
  tokens = _tokens(8)
  loss = nnx.jit(lambda p, x, k, d: p.loss(x, key=k, deterministic=d)[1]["warm"],
                 static_argnums=3)
  loss(prior, tokens, jax.random.key(0), True)
  assert int(prior.loss_count[...].sum()) == 0
  for step in range(40):  # 320 draws of 10 timesteps: every t seen > 10 times
    warm = loss(prior, tokens, jax.random.key(step), False)
  assert int(prior.loss_count[...].sum()) == 320 and float(warm) == 1.0
  assert (np.asarray(prior.loss_sq[...]) > 0).all()


def test_a_tiny_model_overfits_a_tiny_token_set():
  prior = _prior("class")
  tokens = _tokens(4, key=7)
  cond = jnp.array([0, 1, 2, 0])
  optimizer = nnx.Optimizer(prior, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def train_step(prior, optimizer, key):
    def loss_fn(prior):
      return prior.loss(tokens, cond, key=key)[0]
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(prior)
    optimizer.update(prior, grads)
    return loss

  @nnx.jit
  def elbo(prior):  # exact in t, averaged over 4 noise draws of each sequence
    return jnp.mean(prior.negative_elbo(jnp.tile(tokens, (4, 1)), jnp.tile(cond, 4),
                                        key=jax.random.key(99), exact=True))

  start = float(elbo(prior))
  for step in range(100):
    train_step(prior, optimizer, jax.random.key(step))
  end = float(elbo(prior))
  # Untrained: about 2·log K nats per token (the x0-parameterized decoder term costs
  # log K until the network learns to copy x_t at t=0); memorized: far below log K.
  assert np.isfinite(end) and end < 0.25 * start, (start, end)


@pytest.mark.parametrize("condition,num_subtokens,options", [
    ("none", 1, dict()),  # the full chain, T steps
    ("class", 2, dict(num_steps=4, truncation_rate=0.86, guidance_scale=3.0)),
    ("semantic", 1, dict(num_steps=1, temperature=0.7, truncation_rate=0.5,
                         guidance_scale=1.5)),
])
def test_sampling_returns_codes_without_mask(condition, num_subtokens, options):
  prior = _prior(condition, num_subtokens)
  samples = prior.sample(jax.random.key(3), _condition(condition, 5), num_samples=5,
                         **options)
  want = (5, L) if num_subtokens == 1 else (5, L, num_subtokens)
  assert samples.shape == want and samples.dtype == jnp.int32
  assert int(samples.min()) >= 0 and int(samples.max()) < K  # K would be [MASK]


def test_both_skip_rules_sample_and_each_compiles_once(monkeypatch):
  """Strided sampling under 'exact' and 'released': one trace per rule, none on repeats;
  with all T steps the rules coincide and share the 'exact' program."""
  prior = _prior(depth=1)
  traces = []
  trace = DiffusionPrior._sample_impl

  def counting(self, *args, **options):
    traces.append((options["num_steps"], options["skip_rule"]))
    return trace(self, *args, **options)

  monkeypatch.setattr(DiffusionPrior, "_sample_impl", counting)
  key, samples = jax.random.key(4), {}
  for rule in ("exact", "released", "exact", "released"):
    samples[rule] = prior.sample(key, num_samples=3, num_steps=4, skip_rule=rule)
    assert samples[rule].shape == (3, L)
    assert int(samples[rule].min()) >= 0 and int(samples[rule].max()) < K
  assert traces == [(4, "exact"), (4, "released")]
  assert not np.array_equal(samples["exact"], samples["released"])
  # All T steps: nothing is skipped, so 'released' runs the 'exact' program.
  compiled = []
  monkeypatch.setattr("rvq_jax.models.priors.base._sample_jit",
                      lambda *args, options, **kwargs: compiled.append(dict(options)))
  prior.sample(key, num_samples=3, skip_rule="released")
  assert compiled[0]["num_steps"] == T and compiled[0]["skip_rule"] == "exact"


def test_skip_rule_config_is_validated():
  config = config_lib.base_config()
  config_lib.validate(config)
  assert config.diffusion.sample.skip_rule == "exact"
  config.diffusion.sample.skip_rule = "fast"
  with pytest.raises(ValueError, match=r"diffusion.sample.skip_rule='fast': choose from "
                                       r"\('exact', 'released'\)"):
    config_lib.validate(config)


def test_negative_elbo_estimate_is_unbiased_for_the_exact_sum():
  prior = _prior()
  tokens = jnp.tile(_tokens(1, key=3), (256, 1))  # one sequence, many estimates
  estimate = nnx.jit(lambda p, x, k: p.negative_elbo(x, key=k))(prior, tokens,
                                                               jax.random.key(0))
  exact = nnx.jit(lambda p, x, k: p.negative_elbo(x, key=k, exact=True))(prior, tokens[:32],
                                                                         jax.random.key(1))
  assert estimate.shape == (256,) and np.isfinite(estimate).all()
  standard_error = float(jnp.std(estimate)) / 16 + float(jnp.std(exact)) / np.sqrt(32)
  assert abs(float(jnp.mean(estimate)) - float(jnp.mean(exact))) < 4 * standard_error + 1e-3


def test_loss_gradient_and_history_are_the_same_sharded_over_8_devices():
  prior = _prior("class", num_subtokens=2)
  # Warm the history so the importance-sampled branch is the one compared.
  prior.loss_count[...] = jnp.full((T,), 11, jnp.int32)
  prior.loss_sq[...] = jnp.linspace(1.0, 4.0, T)
  tokens, cond = _tokens(8, 2), _condition("class", 8)
  key = jax.random.key(10)
  graphdef, state = nnx.split(prior)

  def apply(state, tokens, cond, key):
    model = nnx.merge(graphdef, state)

    def loss_fn(model):
      return model.loss(tokens, cond, key=key, condition_dropout=0.25)

    (loss, metrics), grads = nnx.value_and_grad(
        loss_fn, has_aux=True, argnums=nnx.DiffState(0, nnx.Param))(model)
    return loss, metrics, grads, nnx.state(model, DiffusionLossHistory)

  single = jax.jit(apply)(state, tokens, cond, key)
  mesh = parallel.make_mesh((4, 2, 1))
  rules = (("vocab", "fsdp"), ("embed", "model"), ("mlp", "fsdp"))
  state_sharding = parallel.state_shardings(state, mesh, rules)
  tokens_sharded = jax.device_put(tokens, parallel.batch_sharding(mesh, tokens.ndim))
  cond_sharded = jax.device_put(cond, parallel.batch_sharding(mesh, 1))
  sharded = jax.jit(apply)(jax.device_put(state, state_sharding), tokens_sharded,
                           cond_sharded, key)
  assert len(tokens_sharded.sharding.device_set) == 8
  assert any(len(s.spec) and any(a is not None for a in s.spec)
             for s in jax.tree.leaves(state_sharding))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-4, atol=2e-6),
      single, sharded)


def test_bad_arguments_fail_early_with_clear_messages(monkeypatch):
  prior = _prior("class")

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before checking its arguments")

  monkeypatch.setattr("rvq_jax.models.priors.base._sample_jit", no_compile)
  cond = jnp.arange(2)
  with pytest.raises(ValueError, match=r"num_steps must be an int in \[1, T=10\]"):
    prior.sample(jax.random.key(0), cond, num_samples=2, num_steps=T + 1)
  for rate in (0.0, 1.2):
    with pytest.raises(ValueError, match=r"truncation_rate must lie in \(0, 1\]"):
      prior.sample(jax.random.key(0), cond, num_samples=2, truncation_rate=rate)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    prior.sample(jax.random.key(0), cond, num_samples=2, temperature=0.0)
  with pytest.raises(ValueError, match=r"skip_rule must be one of \('exact', 'released'\)"):
    prior.sample(jax.random.key(0), cond, num_samples=2, num_steps=4, skip_rule="ddim")
  with pytest.raises(ValueError, match=r"condition 'class' must be \[B\]"):
    prior.sample(jax.random.key(0), jnp.arange(3), num_samples=2)
  with pytest.raises(ValueError, match="needs a class or semantic condition"):
    _prior().sample(jax.random.key(0), num_samples=2, guidance_scale=2.0)
  with pytest.raises(ValueError, match=r"tokens must be \[B, 16\]"):
    prior.loss(jnp.zeros((2, 15), jnp.int32), cond, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"tokens must be \[B, 16, 2\]"):
    _prior(num_subtokens=2).loss(jnp.zeros((2, 16), jnp.int32), key=jax.random.key(0))
  with pytest.raises(ValueError, match="tokens must be integer"):
    prior.negative_elbo(jnp.zeros((2, 16)), cond, key=jax.random.key(0))
  with pytest.raises(ValueError, match="num_timesteps must be an int >= 2"):
    _prior(num_timesteps=1)
  with pytest.raises(ValueError, match="condition_dropout must be in"):
    prior.loss(jnp.zeros((2, 16), jnp.int32), cond, key=jax.random.key(0),
               condition_dropout=1.5)


# ------------------------------------------------------- sampling without recompiles


def _reference_samples(prior, key, condition, num_samples, *, num_steps=None,
                       truncation_rate=1.0, temperature=1.0, guidance_scale=1.0,
                       skip_rule="exact"):
  """The pre-traced sampler step by step: a Python loop over the reverse steps, each
  jitted with its options as Python numbers (so `ops` take their static paths, and
  temperature 1 / rate 1 skip their computations as they did)."""
  n, vocab = num_samples, prior.vocab_size
  steps = num_steps or T
  skip_rule = "exact" if steps == T else skip_rule
  guided = guidance_scale != 1.0
  batch = 2 * n if guided else n
  cond = jnp.concatenate([condition, condition]) if guided else condition
  drop = jnp.arange(batch) >= n if guided else None

  @nnx.jit
  def step(prior, x, t, s, step_key):
    prefix = prior.cond(cond, batch_size=batch, drop=drop)
    x_in = jnp.concatenate([x, x]) if guided else x
    log_p = prior.predict_x0(x_in, jnp.full((batch,), t), prefix)
    if guided:
      log_p = jax.nn.log_softmax(
          ops.classifier_free_guidance(log_p[:n], log_p[n:], guidance_scale), axis=-1)
    if temperature != 1.0:
      log_p = jax.nn.log_softmax(log_p / temperature, axis=-1)
    log_p = ops.truncate(jnp.maximum(log_p, diffusion.LOG_ZERO), truncation_rate)
    log_post = ops.log_strided_posterior(log_p, x, jnp.full((n,), t), jnp.full((n,), s),
                                         prior.schedule, rule=skip_rule)
    log_post = jnp.where((s < 0) & (jnp.arange(vocab + 1) == vocab), -jnp.inf, log_post)
    return diffusion.sample_categorical(step_key, log_post)

  x = jnp.full((n, L, prior.num_subtokens), vocab, jnp.int32)
  times, targets = diffusion.sampling_timesteps(T, steps)
  for index, (t, s) in enumerate(zip(times, targets)):
    x = step(prior, x, jnp.int32(t), jnp.int32(s), jax.random.fold_in(key, index))
  return x[..., 0] if prior.num_subtokens == 1 else x


def _opened(prior):
  """AdaLN-Zero's gates are 0 at init, so the condition would not reach the tokens and
  guidance would change nothing: opens them, and enlarges output and condition weights."""
  for path, variable in nnx.to_flat_state(nnx.state(prior, nnx.Param)):
    if "modulation" in path and path[-1] == "bias":
      variable[...] = jnp.ones_like(variable[...])
    if path[0] == "head" and path[-1] == "kernel" or path[:2] == ("cond", "embedding"):
      variable[...] = variable[...] * 10
  return prior


DIFFUSION_SERIES = [  # each group: one static structure, two values
    [dict(temperature=0.7), dict(temperature=1.3)],
    [dict(truncation_rate=0.9), dict(truncation_rate=0.5)],
    [dict(guidance_scale=2.0), dict(guidance_scale=3.0)],
]


def test_changing_sampling_values_compiles_once_per_static_structure(monkeypatch):
  """temperature 0.7 → 1.3 (→ 1), truncation 0.9 → 0.5, guidance 2 → 3: three
  structures, three traces and programs, not one per value; every sample equals the
  step-by-step Python-number sampler's for the same key."""
  prior = _opened(_prior("class", depth=1))
  structures = []
  trace = DiffusionPrior._sample_impl

  def counting(self, *args, **options):
    structures.append({k: options[k] for k in ("num_steps", "guided", "truncated")})
    return trace(self, *args, **options)

  monkeypatch.setattr(DiffusionPrior, "_sample_impl", counting)
  _sample_jit.clear_cache()
  condition, key = jnp.array([0, 1, 2, 1, 0]), jax.random.key(8)
  samples = {}
  for group in DIFFUSION_SERIES:
    for options in group + ([dict(temperature=1.0)] if "temperature" in group[0] else []):
      name = str(options)
      samples[name] = prior.sample(key, condition, num_samples=5, num_steps=4, **options)
      np.testing.assert_array_equal(
          samples[name], _reference_samples(prior, key, condition, 5, num_steps=4, **options),
          err_msg=name)
  assert structures == [dict(num_steps=4, guided=False, truncated=False),
                        dict(num_steps=4, guided=False, truncated=True),
                        dict(num_steps=4, guided=True, truncated=False)]
  assert _sample_jit._cache_size() == 3
  for group in DIFFUSION_SERIES:  # the values reached the programs
    assert len({np.asarray(samples[str(options)]).tobytes() for options in group}) == 2, group


@pytest.mark.parametrize("condition,num_subtokens,options", [
    ("class", 2, dict(num_steps=4, truncation_rate=0.86, guidance_scale=3.0,
                      temperature=0.8)),
    ("semantic", 1, dict(num_steps=3, skip_rule="released", temperature=1.2,
                         truncation_rate=0.7, guidance_scale=1.5)),
    ("none", 1, dict(temperature=0.9)),  # all T steps
])
def test_samples_equal_the_python_number_reference(condition, num_subtokens, options):
  prior = _opened(_prior(condition, num_subtokens))
  cond, key = _condition(condition, 3), jax.random.key(6)
  np.testing.assert_array_equal(prior.sample(key, cond, num_samples=3, **options),
                                _reference_samples(prior, key, cond, 3, **options))


def test_traced_options_inside_a_users_jit_compile_once():
  prior = _opened(_prior("class", depth=1))
  condition, key = jnp.array([2, 0, 1]), jax.random.key(1)

  @jax.jit
  def draw(temperature, truncation_rate, guidance_scale):
    return prior.sample(key, condition, num_samples=3, num_steps=3, temperature=temperature,
                        truncation_rate=truncation_rate, guidance_scale=guidance_scale)

  for t, r, g in [(0.8, 0.9, 2.0), (1.0, 1.0, 3.0), (1.3, 0.6, 1.5)]:
    np.testing.assert_array_equal(
        draw(t, r, g), prior.sample(key, condition, num_samples=3, num_steps=3,
                                    temperature=t, truncation_rate=r, guidance_scale=g))
  assert draw._cache_size() == 1
