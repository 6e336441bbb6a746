"""Regression tests for four review findings: the adaptive GAN weight's NLL-only numerator,
EMA-VQ's initial statistics, Gumbel-VQ's τ-independent per-position KL (and its τ schedule),
and the feature-prediction head's `ln_pre`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvq_jax import config as config_lib
from rvq_jax.models.tokenizer import representation_head
from rvq_jax.models.tokenizer.quantizers.gumbel import GumbelQuantizer
from rvq_jax.models.tokenizer.quantizers.output import TemperatureSchedule
from rvq_jax.models.tokenizer.quantizers.vector import VectorQuantizer
from rvq_jax.ops import gan_losses
from rvq_jax.train import tokenizer_losses as losses_lib
from rvq_jax.train.tokenizer_stage import TokenizerStage
from rvq_jax.train.tokenizer_stage import build_tokenizer
from tests import tiny_configs

# ------------------------------------------------------------------ 1. adaptive GAN weight


def _last_layer_grad(model, loss_fn):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(p):
    return loss_fn(nnx.merge(graphdef, p, rest))

  grads = jax.jit(jax.grad(f))(params)  # Compiled: eager op-by-op costs over a minute.
  tree = grads
  for key in model.last_layer_path():
    tree = tree[key]
  return np.asarray(tree[...] if isinstance(tree, nnx.Variable) else tree, np.float64)


def test_adaptive_gan_weight_uses_the_nll_gradient_only():
  config = tiny_configs.tiny_config("regvq")
  config.tokenizer.loss.update(perceptual_weight=0.5, pcl_weight=1.0, pcl_num_locations=8,
                               disc_start=0, disc_weight=0.8, disc_factor=1.0)
  stage = TokenizerStage(config)
  container = stage.create(nnx.Rngs(0))
  loss_config = config.tokenizer.loss
  images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3), jnp.float32, -1.0, 1.0)
  key, step = jax.random.key(2), 0
  quantizer_key, pcl_key = jax.random.split(key)
  frozen = stage.frozen
  discriminator = container.discriminator

  def outputs(model):
    return model(images, key=quantizer_key, step=step, deterministic=False)

  def nll(model):
    reconstructions, output = outputs(model)
    l1 = losses_lib.masked_l1(images, reconstructions, output.aux["deterministic_region"])
    lpips = jnp.mean(frozen.lpips(images, reconstructions))
    return loss_config.l1_weight * l1 + loss_config.perceptual_weight * lpips

  def rec_total(model):  # The old numerator: everything but the GAN term.
    reconstructions, output = outputs(model)
    total, _ = stage._reconstruction_losses(model, frozen, images, reconstructions, output,
                                            pcl_key)
    return total

  def gan(model):
    reconstructions, _ = outputs(model)
    return gan_losses.generator_loss(discriminator(reconstructions), kind=loss_config.disc_loss)

  model = nnx.clone(container.model)
  gan_norm = np.linalg.norm(_last_layer_grad(model, gan))
  nll_norm = np.linalg.norm(_last_layer_grad(model, nll))
  old_norm = np.linalg.norm(_last_layer_grad(model, rec_total))
  scale = loss_config.disc_weight * loss_config.disc_factor
  want = np.clip(nll_norm / (gan_norm + 1e-4), 0.0, 1e4) * scale
  old = np.clip(old_norm / (gan_norm + 1e-4), 0.0, 1e4) * scale
  assert abs(old - want) > 1e-3 * want, (old, want)  # PCL reaches the last layer.

  train_step = nnx.jit(stage.train_step, static_argnums=5)
  metrics = train_step(container, stage.constants(), {"image": images}, key,
                       jnp.int32(step), True)
  np.testing.assert_allclose(float(metrics["gan_weight"]), want, rtol=1e-4)


# ------------------------------------------------------------------ 2. EMA-VQ statistics


def test_ema_vq_unused_codes_keep_their_initial_values():
  num_codes, dim, decay = 8, 16, 0.9
  quantizer = VectorQuantizer(num_codes, dim, use_ema=True, ema_decay=decay, rngs=nnx.Rngs(0))
  initial = np.asarray(quantizer.codebook[...], np.float64)
  distances = np.linalg.norm(initial[:, None] - initial[None], axis=-1)
  spacing = distances[~np.eye(num_codes, dtype=bool)].min()
  used = np.arange(num_codes // 2)
  # Each used code's data: its code plus a fixed offset of 0.1 × the code spacing, so it
  # stays the nearest code of its own data and no other code is ever nearest.
  offsets = np.asarray(jax.random.normal(jax.random.key(3), (len(used), dim)), np.float64)
  offsets *= 0.1 * spacing / np.linalg.norm(offsets, axis=-1, keepdims=True)
  targets = initial[used] + offsets
  z = jnp.asarray(np.repeat(targets, 4, axis=0)[None], jnp.float32)  # [1, 16, D]
  for _ in range(5):
    out = quantizer(z)
    assert set(np.unique(np.asarray(out.indices))) == set(used.tolist())
  final = np.asarray(quantizer.codebook[...], np.float64)
  unused = np.arange(num_codes // 2, num_codes)
  np.testing.assert_allclose(final[unused], initial[unused], rtol=1e-3, atol=1e-6)
  before = np.linalg.norm(initial[used] - targets, axis=-1)
  after = np.linalg.norm(final[used] - targets, axis=-1)
  assert np.all(after < 0.7 * before), (before, after)


# ------------------------------------------------------------------ 3. Gumbel-VQ's KL


def _numpy_per_position_kl(logits):
  logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
  logits = logits - logits.max(-1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return np.mean(np.sum(probs * np.log(probs * logits.shape[-1] + 1e-30), axis=-1))


def test_gumbel_per_position_kl_is_on_softmax_of_the_logits_whatever_tau():
  weight, anneal = 5e-4, 100
  quantizer = GumbelQuantizer(16, 8, in_features=12, kl_weight=weight,
                              temperature=TemperatureSchedule(0.9, 1e-3, anneal),
                              rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(4), (2, 4, 4, 12), jnp.float32)
  logits = quantizer.logits(z, quantizer.codebook[...])
  hot = quantizer(z, step=0, deterministic=True)
  cold = quantizer(z, step=anneal, deterministic=True)
  np.testing.assert_allclose(float(hot.stats["temperature"]), 0.9, rtol=1e-6)
  np.testing.assert_allclose(float(cold.stats["temperature"]), 1e-3, rtol=1e-4)
  want = weight * _numpy_per_position_kl(logits)
  np.testing.assert_allclose(float(hot.losses["per_position_kl"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(cold.losses["per_position_kl"]), want, rtol=1e-4)


def test_gumbel_kind_gets_taming_temperature_schedule():
  config = config_lib.base_config()
  config_lib.set_quantizer(config, "gumbel")
  model = nnx.eval_shape(lambda: build_tokenizer(config, rngs=nnx.Rngs(0)))
  assert isinstance(model.quantizer, GumbelQuantizer)
  schedule = model.quantizer.temperature
  assert (schedule.start, schedule.end, schedule.anneal_steps) == (0.9, 1e-6, 1_000_000)


# ------------------------------------------------------------------ 4. the head's ln_pre


def test_feature_prediction_head_applies_ln_pre():
  head = representation_head.FeaturePredictionHead(8, 32, num_blocks=1, num_heads=2,
                                                   grid_size=4, rngs=nnx.Rngs(0))
  assert isinstance(head.ln_pre, nnx.LayerNorm)
  subcode = jax.random.normal(jax.random.key(5), (2, 4, 4, 8), jnp.float32)
  before = np.asarray(head(subcode))
  head.ln_pre.scale[...] = 3.0 * head.ln_pre.scale[...]
  after = np.asarray(head(subcode))
  assert not np.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize("pcl_weight", [0.0, 1.0])
def test_one_generator_backward_gives_the_full_graph_gradients(pcl_weight):
  """`generator_gradients` forms the adaptive weight from cotangents at the
  reconstructions and runs the generator backward once; the result must be the gradient
  of L_rec + w·L_gan taken through the whole graph, with w from the full-graph
  last-layer gradients of L_nll and L_gan (float32: relative L2 error ≤ 1e-4 over the
  whole gradient, and per leaf ≤ 2e-3 of its norm + 1e-5 of the whole's; leaving out the
  GAN term or the PCL cotangent gives errors of order 1)."""
  config = tiny_configs.tiny_config("regvq")
  # PCL at τ = 0.5: at the default 0.07 its InfoNCE amplifies float32 rounding to ~1e-3
  # of the gradient, which would hide a wiring error of that size.
  config.tokenizer.loss.update(perceptual_weight=0.5, pcl_weight=pcl_weight,
                               pcl_num_locations=8, pcl_tau=0.5, disc_start=0,
                               disc_weight=0.8, disc_factor=0.7)
  stage = TokenizerStage(config)
  container = stage.create(nnx.Rngs(0))
  loss_config = config.tokenizer.loss
  images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3), jnp.float32, -1.0, 1.0)
  key, step = jax.random.key(2), jnp.int32(0)
  quantizer_key, pcl_key = jax.random.split(key)
  frozen = stage.frozen
  model = nnx.clone(container.model)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses(p):
    m = nnx.merge(graphdef, p, rest)
    reconstructions, output = m(images, key=quantizer_key, step=step, deterministic=False)
    total, terms = stage._reconstruction_losses(m, frozen, images, reconstructions, output,
                                                pcl_key)
    nll = loss_config.l1_weight * terms["l1"] + loss_config.perceptual_weight * terms["lpips"]
    gan = gan_losses.generator_loss(container.discriminator(reconstructions),
                                    kind=loss_config.disc_loss)
    return total, nll, gan

  def last(grads):
    return _at_path_value(grads, model.last_layer_path())

  nll_grad = jax.jit(jax.grad(lambda p: losses(p)[1]))(params)
  gan_grad = jax.jit(jax.grad(lambda p: losses(p)[2]))(params)
  weight = float(np.clip(np.linalg.norm(last(nll_grad)) / (np.linalg.norm(last(gan_grad))
                                                            + 1e-4), 0, 1e4)) * 0.8 * 0.7
  grads, gan_weight, *_ = jax.jit(
      lambda c, k: stage.generator_gradients(c, frozen, images, k, step, True))(container, key)
  np.testing.assert_allclose(float(gan_weight), weight, rtol=1e-4)
  # The gradient for the weight the step used: w multiplies ‖∇L_gan‖, several times the
  # rest here, so w's own float32 rounding (1e-4) must not count against the backward.
  used = float(gan_weight)
  want = jax.jit(jax.grad(lambda p: losses(p)[0] + used * losses(p)[2]))(params)
  flat_got = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(grads)])
  flat_want = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(want)])
  scale = np.linalg.norm(flat_want)
  # The whole gradient: float32 rounding in another summation order only.
  assert np.linalg.norm(flat_got - flat_want) <= 1e-4 * scale
  # Each leaf as a whole (L2): rounding reaches ~1e-3 of small leaves, and leaves whose
  # gradient is 0 in exact arithmetic (attention key biases) hold float noise, hence the
  # floor of 1e-5 of the whole gradient's norm.
  for (path, got), expected in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(want)):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    error = np.linalg.norm(got - expected)
    assert error <= 2e-3 * np.linalg.norm(expected) + 1e-5 * scale, (
        jax.tree_util.keystr(path), error, np.linalg.norm(expected))


def _at_path_value(tree, path):
  for name in path:
    tree = tree[name]
  return np.asarray(tree[...] if isinstance(tree, nnx.Variable) else tree, np.float64)
