"""CelebA-HQ 256×256, the paper's tokenizer setup (taming's face VQGAN + Reg-VQ).

  python -m rvq_jax.main --config=configs/celebahq.py --workdir=gs://bucket/run
  python -m rvq_jax.main --config=configs/celebahq.py:vq --workdir=...           # baseline
  python -m rvq_jax.main --config=configs/celebahq.py:tokenizer,runlocal --workdir=...
  python -m rvq_jax.main --config=configs/celebahq.py:ar --workdir=...   # one prior stage

Variants (comma-separated after ':'): a stage name, a quantizer kind
(vq | gumbel | regvq | fq | regfq), `runlocal` (tiny model and run: checks a set-up).
Data: TFDS `celeb_a_hq/256` (manual download; see README "Training on CelebA-HQ").
TFDS has only a 'train' split of 30k images: the last 5k are held out, as taming's
25k/5k split (not the same files).
"""
from rvq_jax import config as config_lib


def get_config(arg: str | None = None):
  config = config_lib.base_config()
  config.data.update(source="tfds", name="celeb_a_hq/256", train_split="train[:25000]",
                     eval_split="train[25000:]", image_size=256, random_flip=True)

  tokenizer = config.tokenizer
  # Taming's face VQGAN (f = 16, 16×16 tokens) and Reg-VQ's K = 1024, d = 256, r = 0.4.
  tokenizer.model.update(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                         attn_resolutions=(16,), z_channels=256, dropout=0.0)
  # λ_kl, τ and the PCL weight are not in the paper: λ_kl = 0.1 and τ = 1 are kept by the
  # codebook study (docs/results/codebook_study.md); PCL 0.1 is untested there (no VGG-19).
  tokenizer.quantizer.update(kind="regvq", num_codes=1024, code_dim=256)
  tokenizer.quantizer.regvq.update(mask_ratio=0.4, prior_kl_weight=0.1,
                                   temperature_start=1.0, temperature_end=1.0)
  tokenizer.loss.update(perceptual_weight=1.0, pcl_weight=0.1, disc_start=30001,
                        disc_weight=0.8)
  # Taming scales a base rate of 4.5e-6 by the batch size; Adam(0.5, 0.9).
  tokenizer.train.update(batch_size=32, num_steps=300_000, log_every=100,
                         checkpoint_every=2000, eval_every=10_000, summary_every=2000)
  tokenizer.optim.update(learning_rate=4.5e-6 * 32, disc_learning_rate=4.5e-6 * 32)
  tokenizer.eval.update(batch_size=32, num_batches=16)

  # Priors over the 16×16 tokens. Taming's face transformer: GPT with 24 layers, 16
  # heads, width 1024, AdamW(0.9, 0.95) with weight decay 0.01, base rate 4.5e-6 × batch.
  config.ar.model.update(width=1024, depth=24, num_heads=16, dropout=0.0)
  config.ar.optim.update(learning_rate=4.5e-6 * 32, b1=0.9, b2=0.95, weight_decay=0.01,
                         warmup_steps=0)
  config.ar.sample.update(top_k=100, temperature=1.0)
  # VQ-Diffusion at the same size as the AR model (the paper's fair comparison):
  # T = 100, auxiliary weight 5e-4, AdamW(0.9, 0.96) wd 4.5e-2, warm-up 5000,
  # truncation 0.86 at sampling.
  config.diffusion.model.update(width=1024, depth=24, num_heads=16, dropout=0.0,
                                num_timesteps=100)
  config.diffusion.loss.aux_weight = 5e-4
  config.diffusion.optim.update(learning_rate=3e-6 * 32, b1=0.9, b2=0.96,
                                weight_decay=4.5e-2, warmup_steps=5000)
  config.diffusion.sample.update(num_steps=0, truncation_rate=0.86)
  for prior in (config.ar, config.diffusion):
    prior.train.update(batch_size=32, num_steps=500_000, log_every=100,
                       checkpoint_every=2000, eval_every=10_000, summary_every=2000)
    prior.eval.update(batch_size=32, num_batches=16)
  return config_lib.apply_variant(config, arg, per_quantizer=_per_quantizer)


def _per_quantizer(config) -> None:
  if config_lib.is_factorized(config):
    # FQGAN's semantic branch on the second sub-codebook; VGG16 stands in for CLIP.
    config.tokenizer.loss.update(representation_weight=0.5, teacher="vgg16",
                                 representation_branch=1)
