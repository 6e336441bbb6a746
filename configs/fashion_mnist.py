"""Fashion-MNIST at 32×32: Reg-VQ, then class-conditional AR and diffusion priors with
classifier-free guidance — the labelled data set the paper's claims are tested on here.

  apt-get update && apt-get install -y dataset-fashion-mnist    # the IDX files, once
  python -m rvq_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
  python -m rvq_jax.main --config=configs/fashion_mnist.py:vq --workdir=runs/fmnist_vq
  python -m rvq_jax.main --config=configs/fashion_mnist.py:runlocal --workdir=runs/check

Variants (comma-separated after ':'): a stage name, a quantizer kind, `runlocal`.
Data: Debian's copy of the original IDX files (`data.idx_path`, default
/usr/share/datasets/fashion-mnist): 60,000 training and 10,000 test images, the test
split held out for every metric. The 28×28 images are centred on a black 32×32 canvas
(no resampling) and replicated to RGB.
"""
from rvq_jax import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.base_config()
  config.data.update(source="idx", image_size=32, idx_pad_to=32, random_crop=False,
                     random_flip=False, num_workers=2)

  tokenizer = config.tokenizer
  # f = 4: 8×8 tokens per image; one attention-free level per factor of 2 (CPU-sized).
  tokenizer.model.update(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                         z_channels=64)
  tokenizer.quantizer.update(kind="regvq", num_codes=1024, code_dim=64)
  # LPIPS on (VGG16 weights from $RVQ_JAX_WEIGHTS_DIR or weights.lpips); the GAN starts
  # after the autoencoder has learned the shapes. PCL needs VGG features: off by default.
  tokenizer.loss.update(perceptual_weight=1.0, pcl_weight=0.0, disc_start=2000,
                        disc_layers=2)
  tokenizer.optim.update(learning_rate=2e-4, disc_learning_rate=2e-4)
  tokenizer.train.update(batch_size=32, num_steps=5000, log_every=50, checkpoint_every=500,
                         eval_every=1000, summary_every=500)
  # 40 × 64 = 2,560 held-out images per evaluation.
  tokenizer.eval.update(batch_size=64, num_batches=40)

  config.prior.update(condition="class", num_classes=10)
  for prior in (config.ar, config.diffusion):
    prior.model.update(width=256, depth=6, num_heads=8)
    prior.loss.condition_dropout = 0.1  # A learned null class, for guidance.
    prior.optim.update(learning_rate=5e-4, warmup_steps=200)
    prior.train.update(batch_size=64, num_steps=10_000, log_every=50,
                       checkpoint_every=1000, eval_every=2000, summary_every=1000)
    prior.eval.update(batch_size=64, num_batches=40)
    prior.sample.update(num_samples=40, guidance_scale=2.0)
  config.diffusion.model.num_timesteps = 100
  config.diffusion.sample.num_steps = 25
  return config_lib.apply_variant(config, arg)
