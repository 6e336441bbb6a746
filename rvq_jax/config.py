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

# Stages main runs in order. The priors (ar, diffusion) join this list when they exist.
STAGES = ("tokenizer",)
QUANTIZER_KINDS = ("vq", "gumbel", "regvq", "fq", "regfq")


def base_config() -> ml_collections.ConfigDict:
  """Every key any stage reads, with the paper's defaults where it gives one."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = ("tokenizer",)

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
      prior_kl_weight=0.1,   # provisional: the paper gives none (see the codebook study)
      per_position_kl_weight=0.0,
      logits="projection",
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
      pcl_weight=0.0,        # Reg-VQ's probabilistic contrastive loss (needs VGG-19 weights)
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
  ))

  config.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),
      axes=parallel.DEFAULT_MESH_AXES,
      rules=parallel.DEFAULT_RULES,
  ))
  return config


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
  if kind == "fq":
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
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def check_batch_divides(config: ml_collections.ConfigDict, num_devices: int,
                        num_processes: int) -> None:
  """The global batch must split evenly over processes and data-parallel devices."""
  mesh_shape = parallel.resolve_mesh_shape(config.mesh.shape, num_devices)
  data_parallel = math.prod(s for s, a in zip(mesh_shape, config.mesh.axes)
                            if a in parallel.BATCH_AXES)
  for name in ("train", "eval"):
    batch = config[name].batch_size
    if batch % data_parallel or batch % num_processes:
      raise ValueError(
          f"{name}.batch_size={batch} must be divisible by the {data_parallel} data-parallel "
          f"devices of mesh {mesh_shape} and by {num_processes} processes.")
