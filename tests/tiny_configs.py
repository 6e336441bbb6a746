"""The tiny run config the end-to-end tests start from (16px images, K = 16, a few steps).

Tests switch on what they check (perceptual losses, the GAN, priors) on top of it.
"""
from rvq_jax import config as config_lib


def tiny_config(kind: str = "regvq", *, num_steps: int = 2, mesh_shape=(1, 1, 1)):
  """A tokenizer config that compiles and trains in seconds on a CPU; not validated or
  locked, so a test can change it first."""
  config = config_lib.base_config()
  config.data.update(image_size=16, num_workers=1, embedded_train_crops_per_photo=8,
                     embedded_eval_crops_per_photo=4)
  config.tokenizer.model.update(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                                attn_resolutions=(4,), z_channels=32, adapter_depth=1,
                                adapter_heads=2)
  config.tokenizer.quantizer.update(num_codes=16, code_dim=8)
  config_lib.set_quantizer(config, kind)
  # Random pretrained networks; perceptual losses and the GAN off until a test asks.
  config.weights.random = True
  config.tokenizer.loss.update(perceptual_weight=0.0, pcl_weight=0.0, disc_start=10**9,
                               disc_layers=2, disc_channels=32)
  config.tokenizer.train.update(batch_size=8, num_steps=num_steps, log_every=1,
                                checkpoint_every=100, eval_every=0, summary_every=0)
  config.tokenizer.eval.update(batch_size=8, num_batches=1)
  config.mesh.shape = tuple(mesh_shape)
  return config
