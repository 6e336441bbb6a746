"""The quantizer and prior registries: the config, the variants, validation and the
tokenizer all follow what is registered, so a new quantizer is one module + one line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvq_jax import config as config_lib
from rvq_jax import ops
from rvq_jax.models.priors import PRIORS
from rvq_jax.models.priors import ARPrior
from rvq_jax.models.priors import DiffusionPrior
from rvq_jax.models.priors import Prior
from rvq_jax.models.priors import TokenLayout
from rvq_jax.models.tokenizer.quantizers import registry
from rvq_jax.models.tokenizer.quantizers.output import QuantizerOutput
from rvq_jax.models.tokenizer.quantizers.output import build_aux
from rvq_jax.train import loop
from rvq_jax.train.tokenizer_stage import TokenizerStage
from tests import tiny_configs

BUILTIN = ("vq", "gumbel", "regvq", "fq", "regfq")


def test_builtin_kinds_and_their_config_blocks():
  assert registry.kinds() == BUILTIN
  quantizer = config_lib.base_config().tokenizer.quantizer
  for kind in BUILTIN:
    # One options block per kind, holding exactly the options the spec declares.
    assert dict(quantizer[kind]) == dict(registry.get(kind).options)
  assert quantizer.regvq.mask_ratio == 0.4 and quantizer.gumbel.temperature_end == 1e-6
  assert quantizer.fq.normalize and quantizer.fq.entropy_weight == 0.03  # FQGAN's VQ
  assert not quantizer.vq.normalize
  # What the tokenizer needs to know comes from the spec, not from kind strings.
  assert [registry.get(k).categorical for k in BUILTIN] == [False, True, True, False, True]
  assert [registry.get(k).factorized for k in BUILTIN] == [False, False, False, True, True]


def test_variants_and_validation_follow_the_registry():
  config = config_lib.apply_variant(config_lib.base_config(), "tokenizer,fq")
  assert config.stages == ("tokenizer",)
  assert config.tokenizer.quantizer.kind == "fq" and config.tokenizer.quantizer.code_dim == 8
  config_lib.validate(config)
  config = config_lib.base_config()
  config.tokenizer.quantizer.fq.num_branches = 1
  config.tokenizer.quantizer.regvq.mask_ratio = 2.0  # Not the chosen kind: not checked.
  config_lib.set_quantizer(config, "fq")
  with pytest.raises(ValueError, match=r"tokenizer.quantizer.fq.num_branches=1 must be >= 2"):
    config_lib.validate(config)
  with pytest.raises(ValueError, match="unknown config variant 'lfq'"):
    config_lib.parse_arg("lfq")


# ------------------------------------------------ a new quantizer, defined only here


class SignQuantizer(nnx.Module):
  """Lookup-free quantization (MAGVIT-2's LFQ): each of D features becomes ±1, so the
  token is the D-bit integer and K = 2^D; straight-through, with a commitment loss."""

  def __init__(self, num_codes: int, code_dim: int, *, beta: float, rngs: nnx.Rngs):
    del rngs
    if num_codes != 2 ** code_dim:
      raise ValueError(f"LFQ needs num_codes = 2**code_dim, got {num_codes}, {code_dim}.")
    self.num_codes, self.code_dim, self.beta = num_codes, code_dim, beta

  def codes(self) -> jax.Array:
    bits = (jnp.arange(self.num_codes)[:, None] >> jnp.arange(self.code_dim)) & 1
    return jnp.where(bits == 1, 1.0, -1.0)  # [K, D]

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    return ops.lookup(indices, self.codes())

  def __call__(self, z, *, key=None, step=None, deterministic=None) -> QuantizerOutput:
    del key, step, deterministic
    z = z.astype(jnp.float32)
    signs = jnp.where(z > 0, 1.0, -1.0)
    indices = jnp.sum((z > 0).astype(jnp.int32) << jnp.arange(self.code_dim), axis=-1)
    losses = {"commitment": self.beta * jnp.mean((z - jax.lax.stop_gradient(signs)) ** 2)}
    aux = build_aux(jnp.zeros(indices.shape, bool), indices, indices, self.codes())
    return QuantizerOutput(ops.straight_through(signs, z), indices, losses,
                           ops.codebook_stats(indices, self.num_codes), aux)


LFQ_SPEC = registry.QuantizerSpec(
    kind="lfq", categorical=False, options={"beta": 0.25},
    build=lambda options, *, num_codes, code_dim, in_features, rngs: SignQuantizer(
        num_codes, code_dim, beta=options["beta"], rngs=rngs),
    check=lambda options: [] if options["beta"] >= 0 else ["beta must be >= 0"])


@pytest.fixture
def lfq_registered():
  registry.register(LFQ_SPEC)  # The one line a new quantizer adds.
  yield
  registry.unregister("lfq")


def test_a_registered_quantizer_trains_through_the_loop(lfq_registered, tmp_path):
  config = tiny_configs.tiny_config("lfq", num_steps=1)
  config.tokenizer.quantizer.update(num_codes=16, code_dim=4)
  assert dict(config.tokenizer.quantizer.lfq) == {"beta": 0.25}
  config_lib.validate(config)
  config.tokenizer.quantizer.lfq.beta = -1.0
  with pytest.raises(ValueError, match="tokenizer.quantizer.lfq.beta must be >= 0"):
    config_lib.validate(config)
  config.tokenizer.quantizer.lfq.beta = 0.25
  assert config_lib.parse_arg("lfq")["quantizer"] == "lfq"

  workdir = str(tmp_path / "lfq")
  stage = TokenizerStage(config)
  loop.run(stage, loop.loop_config_from(config, "tokenizer"), workdir)
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["step"] == 1
  assert np.isfinite(metrics["train/quantizer/commitment"])
  model, *_ = loop.load_trained(stage, loop.loop_config_from(config, "tokenizer"), workdir)
  assert isinstance(model.model.quantizer, SignQuantizer)
  # Its tokens are the sign bits of the encoder output: K = 16 on the 4×4 grid.
  images = jnp.zeros((2, 16, 16, 3))
  tokens = model.model.tokenize(images)
  assert tokens.shape == (2, 4, 4) and int(tokens.max()) < 16


# ------------------------------------------------------------------ priors


@pytest.mark.parametrize("kind", sorted(PRIORS))
def test_priors_share_one_interface(kind):
  config = config_lib.base_config()
  settings = config[kind]
  settings.model.update(width=16, depth=1, num_heads=2)
  settings.loss.condition_dropout = 0.2
  layout = TokenLayout(vocab_size=8, num_subtokens=1, grid_size=(2, 2))
  prior_cls = PRIORS[kind]
  prior = prior_cls.from_config(settings, layout, condition="class", num_classes=3,
                                rngs=nnx.Rngs(0))
  assert isinstance(prior, Prior) and prior.condition_dropout == 0.2
  tokens = jnp.array([[0, 1, 2, 3], [4, 5, 6, 7]], jnp.int32)
  labels = jnp.array([0, 2])
  loss, metrics = prior.loss(tokens, labels, key=jax.random.key(0))
  assert np.isfinite(float(loss)) and "accuracy" in metrics
  nll = prior.heldout_nll(tokens, labels, key=jax.random.key(1))
  assert nll.shape == (2,) and bool(jnp.all(nll > 0))
  options = prior_cls.sample_options(settings.sample, guidance_scale=2.0)
  assert set(options) == set(prior_cls.SAMPLE_OPTIONS)
  samples = prior.sample(jax.random.key(2), labels, num_samples=2, **options)
  assert samples.shape == (2, 4) and bool(jnp.all((samples >= 0) & (samples < 8)))
  with pytest.raises(ValueError, match="takes no option"):
    prior_cls.sample_options(settings.sample, beam_width=4)
  # The training options are the prior's own attributes, from <prior>.loss.
  if prior_cls is ARPrior:
    assert prior.pkeep == settings.loss.pkeep
  else:
    assert isinstance(prior, DiffusionPrior)
    assert prior.aux_weight == settings.loss.aux_weight
    assert prior.num_timesteps == settings.model.num_timesteps
