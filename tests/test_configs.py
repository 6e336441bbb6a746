"""Every config file: each variant builds a valid, locked config of the one shape."""
import importlib.util
import pathlib

import pytest

from rvq_jax import config as config_lib
from rvq_jax.models.tokenizer.quantizers import registry

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(f"configs_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("variant", [None, "runlocal", "tokenizer", "ar,diffusion",
                                     *registry.kinds()])
def test_every_config_and_variant_validates(path, variant):
  config = _load(path).get_config(variant)
  config_lib.validate(config)
  assert config.is_locked
  assert set(config.tokenizer) == {"model", "quantizer", "loss", "optim", "train", "eval"}
  for prior in config_lib.PRIOR_STAGES:
    assert set(config[prior]) == {"model", "loss", "optim", "train", "eval", "sample"}
  if variant in registry.kinds():
    assert config.tokenizer.quantizer.kind == variant
  if variant == "runlocal":
    assert all(config[stage].train.num_steps == 20 for stage in config_lib.STAGES)


def test_runlocal_shrinks_every_config_the_same_way():
  for path in CONFIGS:
    config = _load(path).get_config("runlocal")
    assert config.tokenizer.model.ch == 32 and config.tokenizer.quantizer.num_codes <= 64
    assert config.tokenizer.loss.perceptual_weight == 0.0
    assert config.ar.model.width == 64 and config.diffusion.model.num_timesteps <= 20
