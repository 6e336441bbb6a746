"""A tiny run for tests that start `python -m rvq_jax.main` (tests/test_bad_inputs.py):
the tiny tokenizer of `tiny_configs` and one-block priors, a step or two each, on one
device. Variants as in configs/*.py (`:tokenizer,ar`, a quantizer kind).
"""
from rvq_jax import config as config_lib
from tests import tiny_configs


def get_config(arg=None):
  config = tiny_configs.tiny_config("regvq", num_steps=1)
  for name in config_lib.PRIOR_STAGES:
    prior = config[name]
    prior.model.update(width=32, depth=1, num_heads=2)
    prior.train.update(batch_size=8, num_steps=1, log_every=1, checkpoint_every=1,
                       eval_every=0, summary_every=0)
    # No sampling inside evaluations: the generation metrics have their own tests.
    prior.eval.update(batch_size=8, num_batches=1, generation_fid=False,
                      generation_fd_vgg=False, generation_classifier=False)
    prior.sample.num_samples = 2
  config.diffusion.model.num_timesteps = 4
  return config_lib.apply_variant(config, arg)
