"""The tokenizer's reconstruction terms as the step composes them: one VGG16 pass shared by
LPIPS and PCL, the PCL network and reduction, and the L1 region option."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvq_jax import config as config_lib
from rvq_jax.models.pretrained import vgg
from rvq_jax.train import tokenizer_losses as losses_lib
from rvq_jax.train.tokenizer_stage import TokenizerStage
from tests import tiny_configs


def _terms(config, seed=0):
  """(terms, images, reconstructions, quantizer output, stage) of one training forward."""
  stage = TokenizerStage(config)
  model = stage.create(nnx.Rngs(seed)).model
  images = jax.random.uniform(jax.random.key(seed + 1), (4, 16, 16, 3), jnp.float32, -1, 1)
  reconstructions, output = model(images, key=jax.random.key(seed + 2), step=0,
                                  deterministic=False)
  _, terms = stage._reconstruction_losses(model, stage.frozen, images, reconstructions,
                                          output, jax.random.key(seed + 3))
  return terms, images, reconstructions, output, stage


def _regvq_config(**loss):
  config = tiny_configs.tiny_config("regvq")
  # A high mask ratio and a flat τ: many stochastic positions differ from their argmax.
  config.tokenizer.quantizer.regvq.update(mask_ratio=1.0)
  config.tokenizer.loss.update(pcl_num_locations=8, **loss)
  return config


def test_lpips_and_pcl_share_one_vgg16_pass_and_equal_their_separate_definitions():
  config = _regvq_config(perceptual_weight=0.5, pcl_weight=1.0)
  terms, images, reconstructions, output, stage = _terms(config)
  assert stage.frozen.vgg19 is None  # PCL reads LPIPS's VGG16: no second network.
  np.testing.assert_allclose(float(terms["lpips"]),
                             float(jnp.mean(stage.frozen.lpips(images, reconstructions))),
                             rtol=1e-5)
  # Features computed again here, per image set (one call on both: the same shapes as the
  # step's, so nothing recompiles).
  both = stage.frozen.lpips.features(jnp.concatenate([images, reconstructions]),
                                     layers=vgg.PERCEPTUAL_LAYERS)
  features_x = {name: f[:4] for name, f in both.items()}
  features_y = {name: f[4:] for name, f in both.items()}
  aux = output.aux
  want = losses_lib.pcl_over_layers(
      jax.random.key(3), features_x, features_y, aux["pcl_weights"],
      ~aux["deterministic_region"], num_locations=8, tau=config.tokenizer.loss.pcl_tau,
      eps=config.tokenizer.loss.pcl_eps, reduction="mean")
  np.testing.assert_allclose(float(terms["pcl"]), float(want), rtol=1e-4)
  # 'mean' is one anchor's loss (a few units), not a sum over anchors and layers.
  assert 0 < float(terms["pcl"]) < 20


def test_uniform_pcl_weighting_is_the_plain_contrastive_loss_of_the_ablation():
  """'uniform' weighs every perturbed token equally; it differs from PCL's ‖Δc‖² weights."""
  config = _regvq_config(perceptual_weight=0.5, pcl_weight=1.0, pcl_weighting="uniform")
  terms, images, reconstructions, output, stage = _terms(config)
  both = stage.frozen.lpips.features(jnp.concatenate([images, reconstructions]),
                                     layers=vgg.PERCEPTUAL_LAYERS)
  features_x = {name: f[:4] for name, f in both.items()}
  features_y = {name: f[4:] for name, f in both.items()}
  active = ~output.aux["deterministic_region"]
  uniform = active.astype(jnp.float32)
  uniform = uniform / jnp.maximum(uniform.sum(axis=(1, 2), keepdims=True), 1.0)
  args = dict(num_locations=8, tau=config.tokenizer.loss.pcl_tau,
              eps=config.tokenizer.loss.pcl_eps, reduction="mean")
  want = losses_lib.pcl_over_layers(jax.random.key(3), features_x, features_y, uniform,
                                    active, **args)
  np.testing.assert_allclose(float(terms["pcl"]), float(want), rtol=1e-4)
  weighted = losses_lib.pcl_over_layers(jax.random.key(3), features_x, features_y,
                                        output.aux["pcl_weights"], active, **args)
  assert float(weighted) != pytest.approx(float(want), rel=1e-4)


def test_pcl_on_vgg19_loads_vgg19_and_no_lpips_without_the_perceptual_loss():
  terms, _, _, _, stage = _terms(_regvq_config(perceptual_weight=0.0, pcl_weight=1.0,
                                               pcl_network="vgg19"))
  assert isinstance(stage.frozen.vgg19, vgg.VGG19)
  assert stage.frozen.lpips is None
  assert np.isfinite(float(terms["pcl"])) and "lpips" not in terms


def test_l1_region_all_is_the_mean_error_over_the_whole_image():
  all_terms, images, reconstructions, output, _ = _terms(_regvq_config(l1_region="all"))
  np.testing.assert_allclose(float(all_terms["l1"]),
                             float(jnp.mean(jnp.abs(images - reconstructions))), rtol=1e-5)
  match_terms, _, _, _, _ = _terms(_regvq_config(l1_region="argmax_match"))
  region = np.asarray(output.aux["deterministic_region"])
  assert not region.all()  # Some tokens were sampled away from their argmax ...
  assert float(match_terms["l1"]) != pytest.approx(float(all_terms["l1"]), rel=1e-6)


@pytest.mark.parametrize("field,value", [("l1_region", "deterministic"),
                                         ("pcl_network", "resnet"),
                                         ("pcl_reduction", "max"),
                                         ("pcl_weighting", "equal")])
def test_bad_loss_options_are_named_before_anything_runs(field, value):
  config = tiny_configs.tiny_config("regvq")
  config.tokenizer.loss[field] = value
  with pytest.raises(ValueError, match=f"tokenizer.loss.{field}={value!r}"):
    config_lib.validate(config)


class _EvalContainer(nnx.Module):
  """What `TokenizerStage.eval_step` reads of the train container."""

  def __init__(self, config):
    from rvq_jax.train import tokenizer_stage
    self.model = tokenizer_stage.build_tokenizer(config, rngs=nnx.Rngs(0))
    self.ema_model = nnx.data(None)


@pytest.mark.parametrize("kind", ["regvq", "regfq", "vq"])
def test_eval_reports_the_held_out_soft_perplexity_of_valid_tokens(kind):
  """exp H(p̄) with p̄ the mean of softmax(ℓ_i/τ) over the valid examples' tokens only,
  computed here from the quantizer's logits; VQ has no soft distribution to report."""
  config = tiny_configs.tiny_config(kind)
  if kind != "vq":
    config.tokenizer.quantizer[kind].update(temperature_start=0.5, temperature_end=0.5)
  stage = TokenizerStage(config)
  container = _EvalContainer(config)
  graphdef, state = nnx.split(container)
  images = jax.random.uniform(jax.random.key(4), (4, 16, 16, 3), jnp.float32, -1, 1)
  valid = np.array([True, False, True, True])
  totals = jax.device_get(jax.jit(lambda s, c, b: stage.eval_step(nnx.merge(graphdef, s), c, b))(
      state, stage.constants(), {"image": images, "valid": valid}))
  metrics = stage.finalize_eval({k: np.asarray(v, np.float64) for k, v in totals.items()})
  if kind == "vq":
    assert "soft_perplexity" not in metrics
    return
  model = container.model
  features = model.quantizer_input(images)
  quantizers = (model.quantizer.quantizers if kind == "regfq" else [model.quantizer])
  branches = features if kind == "regfq" else [features]
  want = []
  for quantizer, branch in zip(quantizers, branches):
    logits = np.asarray(quantizer.logits(branch, quantizer.codebook[...]), np.float64)
    probs = np.exp(logits / 0.5 - (logits / 0.5).max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    mean = probs[valid].reshape(-1, probs.shape[-1]).mean(0)
    want.append(np.exp(-np.sum(mean * np.log(mean))))
  assert metrics["soft_perplexity"] == pytest.approx(np.mean(want), rel=1e-4)
  assert 1.0 <= metrics["soft_perplexity"] <= config.tokenizer.quantizer.num_codes
