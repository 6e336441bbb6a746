"""Demo: Reg-VQ on the photographs embedded in scikit-image, small enough for a laptop CPU.

  python -m rvq_jax.main --config=configs/demo.py --workdir=runs/demo

Perceptual and contrastive losses are off (they need converted VGG weights, see README).
"""
from rvq_jax import config as config_lib


def get_config(arg: str | None = None):
  del arg
  config = config_lib.base_config()
  config.data.source = "embedded"
  config.data.image_size = 32
  config.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                      z_channels=32)
  config.quantizer.update(kind="regvq", num_codes=128, code_dim=32)
  config.loss.update(perceptual_weight=0.0, pcl_weight=0.0, disc_start=150)
  config.optim.update(learning_rate=5e-4, disc_learning_rate=2e-4)
  config.train.update(batch_size=8, num_steps=300, log_every=25, checkpoint_every=100,
                      eval_every=100, summary_every=100)
  config.eval.update(batch_size=8, num_batches=2)
  config.lock()
  return config
