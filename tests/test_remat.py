"""Rematerialization (`<stage>.model.remat`) changes what the backward pass stores, never
what it computes; bfloat16 compute keeps float32 parameters, optimizer state and losses.

Tolerances (float32): losses to rtol 1e-6 and whole gradients to a relative L2 error of
1e-5. Checkpointing recomputes the same operations on the same inputs, so the only
differences are XLA's fusion and summation order around the checkpoint boundaries
(measured: ~1e-9 for the tokenizer, ~3e-7 for the priors). Leaves whose gradient is 0 in
exact arithmetic (attention key biases) hold float noise, hence whole-gradient norms.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvq_jax import config as config_lib
from rvq_jax.models.layers import remat as remat_lib
from rvq_jax.models.priors.ar import ARPrior
from rvq_jax.models.priors.diffusion import DiffusionPrior
from rvq_jax.models.tokenizer.discriminator import NLayerDiscriminator
from rvq_jax.ops import gan_losses
from rvq_jax.train.tokenizer_stage import TokenizerStage
from rvq_jax.train.tokenizer_stage import build_tokenizer
from tests import tiny_configs

MODES = remat_lib.REMAT_MODES
GRAD_RTOL = 1e-5
LOSS_RTOL = 1e-6


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _assert_same_gradients(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  got, want = _flat(got), _flat(want)
  assert np.linalg.norm(got - want) <= GRAD_RTOL * np.linalg.norm(want), (
      np.linalg.norm(got - want) / np.linalg.norm(want))


def _tokenizer_config(remat: str, dtype: str = "float32"):
  config = tiny_configs.tiny_config("regvq")
  # Every loss on, the GAN from step 0: the step's whole graph, D included.
  config.tokenizer.loss.update(perceptual_weight=0.5, pcl_weight=1.0, pcl_num_locations=8,
                               pcl_tau=0.5, disc_start=0)
  config.tokenizer.model.update(remat=remat, dtype=dtype)
  config_lib.validate(config)
  return config


def _tokenizer_step_outputs(remat: str):
  """(generator gradients, GAN weight, losses and terms, discriminator loss and gradients)
  of one GAN-phase step of the tiny tokenizer."""
  stage = TokenizerStage(_tokenizer_config(remat))
  container = stage.create(nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3), jnp.float32, -1.0, 1.0)

  @nnx.jit
  def step(container, key):
    grads, gan_weight, gan, rec_total, terms, _, reconstructions, _ = (
        stage.generator_gradients(container, stage.frozen, images, key, jnp.int32(0), True))
    graphdef, params, rest = nnx.split(container.discriminator, nnx.Param, ...)

    def d_loss(params):
      discriminator = nnx.merge(graphdef, params, rest)
      return gan_losses.discriminator_loss(discriminator(images),
                                           discriminator(reconstructions))

    d_value, d_grads = jax.value_and_grad(d_loss)(params)
    return grads, gan_weight, gan, rec_total, terms, d_value, d_grads

  params = nnx.state(container, nnx.Param)
  return params, step(container, jax.random.key(2))


@pytest.fixture(scope="module")
def tokenizer_reference():
  return _tokenizer_step_outputs("none")


@pytest.mark.parametrize("remat", ["blocks", "full"])
def test_tokenizer_step_losses_and_gradients_equal_no_remat(remat, tokenizer_reference):
  ref_params, (ref_grads, ref_weight, ref_gan, ref_total, ref_terms, ref_d, ref_d_grads) = (
      tokenizer_reference)
  params, (grads, weight, gan, total, terms, d_value, d_grads) = _tokenizer_step_outputs(remat)
  # The same initialization (remat is a static setting, not a parameter).
  np.testing.assert_array_equal(_flat(params), _flat(ref_params))
  for got, want in [(weight, ref_weight), (gan, ref_gan), (total, ref_total),
                    (d_value, ref_d)] + [(terms[k], ref_terms[k]) for k in ref_terms]:
    np.testing.assert_allclose(float(got), float(want), rtol=LOSS_RTOL, atol=1e-7)
  _assert_same_gradients(grads, ref_grads)
  _assert_same_gradients(d_grads, ref_d_grads)


def _prior_loss_and_grads(prior_class, remat: str, **options):
  model = prior_class(vocab_size=16, grid_size=(4, 4), condition="class", num_classes=3,
                      width=32, depth=2, num_heads=2, dropout=0.1, remat=remat,
                      rngs=nnx.Rngs(0), **options)
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, 16)
  condition = jnp.arange(4) % 3

  @nnx.jit
  def loss_and_grads(model):
    # nnx.value_and_grad: the diffusion prior updates its loss history (non-parameters).
    return nnx.value_and_grad(lambda m: m.loss(tokens, condition, key=jax.random.key(3))[0])(
        model)

  return loss_and_grads(model)


@pytest.mark.parametrize("prior_class,options", [(ARPrior, {}),
                                                 (DiffusionPrior, {"num_timesteps": 4})],
                         ids=["ar", "diffusion"])
def test_prior_loss_and_gradients_equal_no_remat_with_dropout(prior_class, options):
  """Dropout on: the recomputed forward must draw the same masks as the saved one."""
  ref_loss, ref_grads = _prior_loss_and_grads(prior_class, "none", **options)
  for remat in ("blocks", "full"):
    loss, grads = _prior_loss_and_grads(prior_class, remat, **options)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=LOSS_RTOL)
    _assert_same_gradients(grads, ref_grads)


def test_discriminator_builds_with_each_setting_and_rejects_a_bad_one():
  for remat in MODES:
    assert NLayerDiscriminator(ndf=32, n_layers=2, remat=remat, rngs=nnx.Rngs(0)).remat == remat
  with pytest.raises(ValueError, match=r"remat must be one of \('none', 'blocks', 'full'\)"):
    NLayerDiscriminator(ndf=32, n_layers=2, remat="some", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("key", ["tokenizer", "ar", "diffusion"])
def test_a_bad_remat_value_is_a_named_config_error(key):
  config = tiny_configs.tiny_config()
  config[key].model.remat = "everything"
  with pytest.raises(ValueError, match=rf"{key}\.model\.remat='everything': choose from "
                     r"\('none', 'blocks', 'full'\)"):
    config_lib.validate(config)


def test_bfloat16_tokenizer_step_keeps_float32_state_and_finite_losses():
  """bfloat16 compute (G, D, the LPIPS/PCL VGG) with remat on: parameters, optimizer
  state and EMA stay float32; losses and quantizer statistics are finite float32."""
  config = _tokenizer_config("blocks", dtype="bfloat16")
  config.tokenizer.train.ema_decay = 0.9
  stage = TokenizerStage(config)
  container = stage.create(nnx.Rngs(0))
  assert container.discriminator.conv_in.dtype == jnp.bfloat16
  images = jax.random.uniform(jax.random.key(1), (8, 16, 16, 3), jnp.float32, -1.0, 1.0)
  step = nnx.jit(lambda c, key: stage.train_step(c, stage.constants(), {"image": images}, key,
                                                 jnp.int32(0), True))
  metrics = step(container, jax.random.key(2))
  for name in ("loss", "l1", "lpips", "pcl", "quantizer", "d_loss", "gan_weight", "usage",
               "perplexity", "grad_norm", "d_grad_norm"):
    assert metrics[name].dtype == jnp.float32, (name, metrics[name].dtype)
    assert np.isfinite(float(metrics[name])), (name, metrics[name])
  state = nnx.state(container, nnx.Not(nnx.RngState))
  floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  assert floats and all(x.dtype == jnp.float32 for x in floats), {x.dtype for x in floats}
  # The step changed the float32 parameters (the bfloat16 cotangents reached them).
  fresh = stage.create(nnx.Rngs(0))
  assert not np.allclose(_flat(nnx.state(container.model, nnx.Param)),
                         _flat(nnx.state(fresh.model, nnx.Param)))


def test_remat_shrinks_what_the_backward_pass_keeps():
  """What JAX saves between forward and backward (platform-independent): each setting
  keeps less than the one before, for the tokenizer, the discriminator and a prior."""
  config = _tokenizer_config("none")
  images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  saved = {}
  for remat in MODES:
    config.tokenizer.model.remat = remat
    model = nnx.eval_shape(lambda: build_tokenizer(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def generator_loss(p, x, graphdef=graphdef, rest=rest):
      reconstructions, output = nnx.merge(graphdef, p, rest)(
          x, key=jax.random.key(0), step=0, deterministic=False)
      return jnp.mean(jnp.abs(reconstructions - x)) + output.total_loss

    disc = NLayerDiscriminator(ndf=32, n_layers=2, remat=remat, rngs=nnx.Rngs(0))
    d_graphdef, d_params = nnx.split(disc, nnx.Param)
    prior = ARPrior(vocab_size=16, grid_size=(4, 4), width=32, depth=2, num_heads=2,
                    remat=remat, rngs=nnx.Rngs(0))
    p_graphdef, p_params, p_rest = nnx.split(prior, nnx.Param, ...)
    tokens = jnp.zeros((2, 16), jnp.int32)
    saved[remat] = (
        remat_lib.saved_residual_bytes(generator_loss, params, images),
        remat_lib.saved_residual_bytes(
            lambda p, x, g=d_graphdef: jnp.mean(nnx.merge(g, p)(x)), d_params, images),
        remat_lib.saved_residual_bytes(
            lambda p, t, g=p_graphdef, r=p_rest: nnx.merge(g, p, r).loss(
                t, key=jax.random.key(0))[0], p_params, tokens))
  for network in range(3):
    none, blocks, full = (saved[remat][network] for remat in MODES)
    assert none > blocks > full, (network, none, blocks, full)
