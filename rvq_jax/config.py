"""Shared configuration defaults and the checks that run before anything compiles.

Dataset configs (`configs/*.py`) start from `base_config()` and change what differs;
`validate(config)` turns every bad value into one clear error before a model is built.
ConfigDicts are locked, so a misspelt override (`--config.quantizer.mask_ratoi=0.4`)
fails at once with the key's name.
"""
from __future__ import annotations

import math

import ml_collections

from rvq_jax import parallel
from rvq_jax.data import factory as data_factory

# The stages main can run, in the order a config runs them.
STAGES = ("tokenizer", "ar", "diffusion")
PRIOR_STAGES = ("ar", "diffusion")
CONDITION_KINDS = ("none", "class", "semantic")
QUANTIZER_KINDS = ("vq", "gumbel", "regvq", "fq", "regfq")


def base_config() -> ml_collections.ConfigDict:
  """Every key any stage reads, with the paper's defaults where it gives one."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = STAGES

  # The data layer's fields (see rvq_jax.data.factory); batch sizes live in train/eval.
  config.data = data_factory.get_default_config()
  del config.data["batch_size"]
  del config.data["eval_batch_size"]

  # Taming's VQGAN (the face model: ch 128, ch_mult (1,1,2,2,4), attention at 16).
  config.model = ml_collections.ConfigDict(dict(
      ch=128,
      ch_mult=(1, 1, 2, 2, 4),
      num_res_blocks=2,
      attn_resolutions=(16,),
      z_channels=256,
      dropout=0.0,
      adapter_depth=6,       # FQ: ViT blocks per sub-codebook branch
      adapter_heads=8,
      representation_head_width=512,  # FQ: head predicting the teacher feature
      representation_head_blocks=3,
      representation_head_heads=8,
      dtype="float32",       # compute dtype; parameters stay float32
  ))

  config.quantizer = ml_collections.ConfigDict(dict(
      kind="regvq",
      num_codes=1024,
      code_dim=256,
      # VQ / FQ
      beta=0.25,
      normalize=False,
      use_ema=False,
      ema_decay=0.99,
      entropy_weight=0.0,
      entropy_temperature=0.01,
      # Gumbel-VQ
      kl_weight=5e-4,
      # Reg-VQ
      mask_ratio=0.4,
      # λ_kl: the paper gives none. 0.1 kept by the codebook study: usage 15/32/61/80 % at
      # λ_kl 0/0.01/0.1/1 for −0.2/−0.5 dB PSNR (docs/results/codebook_study.md).
      prior_kl_weight=0.1,
      per_position_kl_weight=0.0,
      logits="projection",
      # τ: constant 1.0, as in the authors' code. The codebook study's τ = 0.5 used more
      # codes, but τ also scales the prior KL (a sharper p̄), so it is kept.
      temperature_start=1.0,
      temperature_end=1.0,
      temperature_anneal_steps=0,
      # FQ / Reg-FQ
      num_branches=2,
      disentangle_weight=0.1,
  ))

  config.loss = ml_collections.ConfigDict(dict(
      l1_weight=1.0,
      perceptual_weight=1.0,
      lpips_weights="",      # .npz from convert_weights ('' = $RVQ_JAX_WEIGHTS_DIR/vgg16_lpips.npz)
      # Reg-VQ's probabilistic contrastive loss (needs VGG-19 weights). A sum over sampled
      # locations and 5 layers: ~10³ early on in the codebook study's probe (random VGG-19)
      # against an L1 of ~1, so weigh it against l1_weight.
      pcl_weight=0.0,
      pcl_tau=0.07,
      pcl_num_locations=256,
      pcl_eps=1e-6,
      vgg19_weights="",      # '' = $RVQ_JAX_WEIGHTS_DIR/vgg19.npz
      random_pretrained=False,  # tests only: random VGG/LPIPS weights instead of files
      # FQ representation alignment: a head on one sub-code predicts a frozen teacher's
      # global feature (in-batch InfoNCE). FQGAN: CLIP/DINOv2 teachers, weight 0.5.
      representation_weight=0.0,
      representation_temperature=1.0,
      representation_branch=1,
      teacher="vgg16",       # vgg16 | vgg19 (stand-ins: any Flax module + weight file fits)
      teacher_weights="",    # '' = $RVQ_JAX_WEIGHTS_DIR/<teacher>.npz
      teacher_resolution=224,
      disc_start=30001,
      disc_weight=0.8,
      disc_factor=1.0,
      disc_loss="hinge",     # hinge | vanilla
      disc_layers=3,
      disc_channels=64,
  ))

  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4,
      disc_learning_rate=1e-4,
      b1=0.5,
      b2=0.9,
      weight_decay=0.0,
      warmup_steps=0,
      grad_clip=1.0,
  ))

  config.train = ml_collections.ConfigDict(dict(
      batch_size=8,          # global
      num_steps=100_000,
      log_every=50,
      checkpoint_every=1000,
      eval_every=5000,
      summary_every=5000,
      keep_checkpoints=3,
      ema_decay=0.0,         # EMA of generator weights (0 = off)
  ))

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=8,
      num_batches=4,
      # FID Inception weights (rvq_jax.metrics.inception): '' = $RVQ_JAX_WEIGHTS_DIR/
      # inception_fid.npz; no file = no rFID/IS; 'random' = random weights (tests only).
      inception_weights="",
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),
      axes=parallel.DEFAULT_MESH_AXES,
      rules=parallel.DEFAULT_RULES,
  ))

  # What both priors share: where their tokens come from and what conditions them.
  config.prior = ml_collections.ConfigDict(dict(
      condition="none",      # none | class (data 'label') | semantic (data 'label_map')
      num_classes=0,         # class: labels in [0, num_classes); semantic: label values
      tokenizer_workdir="",  # '' = <workdir>/tokenizer
      train_tokens="",       # .npz from `--mode=encode` ('' = tokenize images on the fly)
      eval_tokens="",
  ))
  config.ar = prior_config("ar")
  config.diffusion = prior_config("diffusion")
  return config


def prior_config(kind: str) -> ml_collections.ConfigDict:
  """One prior stage's settings: model, optimizer, loop, evaluation and sampling.

  Defaults are a small model; configs/celebahq.py sets the paper-scale ones (taming's
  GPT: 24 layers, 16 heads, width 1024; VQ-Diffusion: T = 100).
  """
  prior = ml_collections.ConfigDict(dict(
      model=dict(width=512, depth=8, num_heads=8, mlp_ratio=4, dropout=0.0,
                 dtype="float32"),
      # Taming's GPT: AdamW(0.9, 0.95), weight decay 0.01 on kernels only.
      optim=dict(learning_rate=3e-4, b1=0.9, b2=0.95, weight_decay=0.01, warmup_steps=0,
                 grad_clip=1.0),
      train=dict(batch_size=8, num_steps=100_000, log_every=50, checkpoint_every=1000,
                 eval_every=5000, summary_every=5000, keep_checkpoints=3),
      # generation_fid: sample one image per held-out example for gFID / IS (only when
      # the FID Inception's weights exist, see eval.inception_weights).
      eval=dict(batch_size=8, num_batches=4, generation_fid=True),
      # Classifier-free guidance needs a learned null condition: drop it this often.
      condition_dropout=0.0,
      sample=dict(num_samples=16, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0),
  ))
  if kind == "ar":
    prior.pkeep = 1.0        # taming: input tokens kept with prob pkeep, else uniform
  elif kind == "diffusion":
    prior.num_timesteps = 100
    prior.aux_weight = 5e-4  # VQ-Diffusion's auxiliary x0 loss weight
    prior.sample.num_steps = 0         # 0 = T; fewer = strided fast sampling
    prior.sample.truncation_rate = 1.0  # keep the top-r probability mass (0.86 released)
  else:
    raise ValueError(f"unknown prior {kind!r}: choose from {PRIOR_STAGES}")
  return prior


def parse_arg(arg: str | None) -> dict:
  """The `:variant` part of `--config=configs/x.py:variant`, comma-separated tokens.

  A token is a stage (run only that stage), a quantizer kind (vq, gumbel, regvq, fq,
  regfq) or `runlocal` (a tiny, fast version of the run to check a set-up), e.g.
  `configs/celebahq.py:tokenizer,fq,runlocal`.
  """
  parsed = {"stages": None, "quantizer": None, "runlocal": False}
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if token == "runlocal":
      parsed["runlocal"] = True
    elif token in STAGES:
      parsed["stages"] = (parsed["stages"] or ()) + (token,)
    elif token in QUANTIZER_KINDS:
      parsed["quantizer"] = token
    else:
      raise ValueError(f"unknown config variant {token!r}: use a stage {STAGES}, a quantizer "
                       f"{QUANTIZER_KINDS} or 'runlocal', comma-separated.")
  return parsed


def apply_quantizer_kind(config: ml_collections.ConfigDict, kind: str) -> None:
  """Switches the quantizer with the settings each kind is defined with."""
  config.quantizer.kind = kind
  if kind == "gumbel":
    # Taming's GumbelQuantize: τ annealed by cosine 0.9 → 1e-6 over ~1e6 steps (the
    # base config's constant τ = 1 is Reg-VQ's).
    config.quantizer.update(temperature_start=0.9, temperature_end=1e-6,
                            temperature_anneal_steps=1_000_000)
  elif kind == "fq":
    # FQGAN: cosine codes of width 8, entropy loss 0.03 on −d/0.01.
    config.quantizer.update(code_dim=8, normalize=True, entropy_weight=0.03)
  elif kind == "regfq":
    config.quantizer.update(code_dim=8)


def downsampling_factor(config: ml_collections.ConfigDict) -> int:
  return 2 ** (len(config.model.ch_mult) - 1)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key for any value that cannot work."""
  problems = []

  def check(condition, message):
    if not condition:
      problems.append(message)

  for stage in config.stages:
    check(stage in STAGES, f"stages: unknown stage {stage!r} (choose from {STAGES})")
  q = config.quantizer
  check(q.kind in QUANTIZER_KINDS, f"quantizer.kind={q.kind!r}: choose from {QUANTIZER_KINDS}")
  check(0.0 <= q.mask_ratio <= 1.0, f"quantizer.mask_ratio={q.mask_ratio} must lie in [0, 1]")
  check(q.num_codes > 0 and q.code_dim > 0, "quantizer.num_codes and code_dim must be positive")
  check(q.logits in ("projection", "distance"), f"quantizer.logits={q.logits!r}")
  check(q.temperature_start > 0 and q.temperature_end > 0, "quantizer temperatures must be > 0")
  if q.kind in ("fq", "regfq"):
    check(q.num_branches >= 2, f"quantizer.num_branches={q.num_branches} must be >= 2 for FQ")
  f = downsampling_factor(config)
  size = config.data.image_size
  check(f in (4, 8, 16), f"model.ch_mult has {len(config.model.ch_mult)} levels: the "
        f"downsampling factor {f} must be 4, 8 or 16")
  check(size % f == 0, f"data.image_size={size} is not divisible by the downsampling "
        f"factor {f} of model.ch_mult={tuple(config.model.ch_mult)}")
  check(config.model.ch % 32 == 0, f"model.ch={config.model.ch} must be a multiple of 32 "
        "(GroupNorm with 32 groups)")
  try:
    data_factory.validate_config(config.data)
  except ValueError as error:
    problems.append(f"data: {error}")
  check(config.loss.disc_loss in ("hinge", "vanilla"), f"loss.disc_loss={config.loss.disc_loss!r}")
  if config.loss.representation_weight > 0:
    check(q.kind in ("fq", "regfq"), "loss.representation_weight > 0 needs a factorized "
          f"quantizer (fq or regfq), not {q.kind!r}")
    check(0 <= config.loss.representation_branch < q.num_branches,
          f"loss.representation_branch={config.loss.representation_branch} must index one of "
          f"the {q.num_branches} sub-codebooks")
    check(config.loss.teacher in ("vgg16", "vgg19"), f"loss.teacher={config.loss.teacher!r}")
  check(config.train.batch_size > 0 and config.eval.batch_size > 0, "batch sizes must be > 0")
  check(config.train.num_steps >= 0, "train.num_steps must be >= 0")
  for name in ("log_every", "checkpoint_every"):
    check(config.train[name] > 0, f"train.{name} must be > 0")
  check(0.0 <= config.train.ema_decay < 1.0, "train.ema_decay must lie in [0, 1)")
  check(len(config.mesh.shape) == len(config.mesh.axes), "mesh.shape and mesh.axes differ")
  check(config.model.dtype in ("float32", "bfloat16"), f"model.dtype={config.model.dtype!r}")
  _validate_priors(config, check)
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _validate_priors(config: ml_collections.ConfigDict, check) -> None:
  prior = config.prior
  check(prior.condition in CONDITION_KINDS,
        f"prior.condition={prior.condition!r}: choose from {CONDITION_KINDS}")
  if prior.condition in ("class", "semantic"):
    check(prior.num_classes > 0, f"prior.condition={prior.condition!r} needs "
          "prior.num_classes > 0")
  data = config.data
  if prior.condition == "class" and not prior.train_tokens:
    check(data.class_labels or data.label_key, "prior.condition='class' needs class labels in "
          "the data (data.class_labels=True for a folder, or data.label_key for TFDS)")
  if prior.condition == "semantic" and not prior.train_tokens:
    check(data.label_path or data.label_map_key, "prior.condition='semantic' needs label maps "
          "in the data (data.label_path for a folder, or data.label_map_key for TFDS)")
  for name in PRIOR_STAGES:
    stage = config[name]
    where = f"{name}."
    check(stage.model.width % stage.model.num_heads == 0,
          f"{where}model.width={stage.model.width} is not divisible by "
          f"{where}model.num_heads={stage.model.num_heads}")
    check(stage.model.depth >= 1, f"{where}model.depth must be >= 1")
    check(stage.model.dtype in ("float32", "bfloat16"), f"{where}model.dtype")
    check(stage.train.batch_size > 0 and stage.eval.batch_size > 0,
          f"{where}train/eval batch sizes must be > 0")
    check(stage.train.log_every > 0 and stage.train.checkpoint_every > 0,
          f"{where}train.log_every and checkpoint_every must be > 0")
    check(0.0 <= stage.condition_dropout < 1.0, f"{where}condition_dropout must lie in [0, 1)")
    sample = stage.sample
    check(sample.temperature >= 0, f"{where}sample.temperature must be >= 0")
    check(sample.top_k >= 0, f"{where}sample.top_k must be >= 0 (0 = off)")
    check(0.0 < sample.top_p <= 1.0, f"{where}sample.top_p must lie in (0, 1]")
    if sample.guidance_scale != 1.0:
      check(prior.condition != "none", f"{where}sample.guidance_scale != 1 needs a condition")
      check(stage.condition_dropout > 0, f"{where}sample.guidance_scale != 1 needs a learned "
            f"null condition: set {where}condition_dropout > 0 (0.1 is usual)")
  check(0.0 <= config.ar.pkeep <= 1.0, "ar.pkeep must lie in [0, 1]")
  diffusion = config.diffusion
  check(diffusion.num_timesteps >= 2, "diffusion.num_timesteps must be >= 2")
  check(0 <= diffusion.sample.num_steps <= diffusion.num_timesteps,
        f"diffusion.sample.num_steps={diffusion.sample.num_steps} must lie in [0, "
        f"num_timesteps={diffusion.num_timesteps}] (0 = all)")
  check(0.0 < diffusion.sample.truncation_rate <= 1.0,
        "diffusion.sample.truncation_rate must lie in (0, 1]")


def stage_settings(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The train/eval/optim settings of one stage (the tokenizer's live at the top level)."""
  return config if stage == "tokenizer" else config[stage]


def check_batch_divides(config: ml_collections.ConfigDict, num_devices: int,
                        num_processes: int) -> None:
  """The global batch must split evenly over processes and data-parallel devices."""
  mesh_shape = parallel.resolve_mesh_shape(config.mesh.shape, num_devices)
  data_parallel = math.prod(s for s, a in zip(mesh_shape, config.mesh.axes)
                            if a in parallel.BATCH_AXES)
  for stage in config.stages:
    settings = stage_settings(config, stage)
    prefix = "" if stage == "tokenizer" else f"{stage}."
    for name in ("train", "eval"):
      batch = settings[name].batch_size
      if batch % data_parallel or batch % num_processes:
        raise ValueError(
            f"{prefix}{name}.batch_size={batch} must be divisible by the {data_parallel} "
            f"data-parallel devices of mesh {mesh_shape} and by {num_processes} processes.")
