"""Class accuracy and classifier FD of generated samples, from sums that add over batches.

A class-conditional prior should draw samples of the class it is asked for, and they
should look like real ones. Both are measured with a classifier trained on the data set
(`rvq_jax.models.pretrained.classifier`; for Fashion-MNIST made by
`python -m rvq_jax.tools.train_classifier`):

  class_accuracy  the fraction of samples the classifier assigns to their condition
                  (argmax of its logits == the label they were generated for); compare
                  with the classifier's accuracy on real test images (its metadata);
  fd_classifier   the Fréchet distance of the classifier's penultimate features of the
                  samples to those of the real held-out images (test split), in float64.

As for FID (`rvq_jax.metrics.fid`), every batch gives SUMS that the evaluation loop adds
over batches and hosts in float64, and the numbers come from the totals:

  per batch (jittable, on the accelerator)             at the end (host, float64)
  `classifier_batch_sums(classifier, x, labels, valid)` → `classifier_metrics_from_sums(
                                                            totals, reference)`

The sums' keys all start with `classifier_`, so they can share one dict with
`fid.generated_feature_sums`'s. The reference (mu, sigma) of the real test features is
stored in the classifier's weight file (`load_eval_classifier` reads both). Images are
clipped and rounded to 8-bit levels first, as for FID: the reference images are 8-bit.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from rvq_jax import files
from rvq_jax.metrics import fid
from rvq_jax.models import pretrained
from rvq_jax.models.pretrained import classifier as classifier_lib

# Keys of `classifier_batch_sums` (`classifier_correct` only when labels are given).
SUM_KEYS = ("classifier_correct", "classifier_count", "classifier_sum", "classifier_outer")


class EvalClassifier(NamedTuple):
  """What evaluation needs: the network and the real side of the classifier FD.

  Attributes:
    network: the classifier (frozen weights).
    reference: (mu [F], sigma [F, F]) of real held-out images' features, float64.
    test_accuracy: the network's accuracy on the real test split (None for 'random').
    path: the weight file ('random' for random weights).
  """

  network: classifier_lib.ConvClassifier
  reference: tuple[np.ndarray, np.ndarray]
  test_accuracy: float | None
  path: str


def classifier_batch_sums(classifier: classifier_lib.ConvClassifier, images: jax.Array,
                          labels: jax.Array | None, valid: jax.Array, *,
                          quantize: bool = True) -> dict[str, jax.Array]:
  """Sums over the valid rows of one batch that add into the classifier metrics.

  Args:
    classifier: a `ConvClassifier` (`load_eval_classifier(config).network`).
    images: [B, S, S, 3] in [-1, 1] (generated samples; S = the classifier's image_size).
    labels: [B] int, the class each sample was generated for; None (an unconditional
      prior) gives no class accuracy.
    valid: [B] bool (or 0/1); rows with False (padding) contribute nothing.
    quantize: clip and round to 8-bit levels first (`fid.to_uint8_grid`), as the real
      reference images are.

  Returns:
    float32 {'classifier_correct': [] rows with argmax(logits) == label (with labels),
    'classifier_count': [] valid rows, 'classifier_sum': [F] Σ f,
    'classifier_outer': [F, F] Σ f fᵀ} over the valid rows (f: penultimate features).
  """
  if quantize:
    images = fid.to_uint8_grid(images)
  outputs = classifier(images)
  feature_sums = fid.feature_sums(outputs["features"], valid)
  sums = {"classifier_count": feature_sums["count"], "classifier_sum": feature_sums["sum"],
          "classifier_outer": feature_sums["outer"]}
  if labels is not None:
    if labels.shape != valid.shape:
      raise ValueError(f"labels {tuple(labels.shape)} and valid {tuple(valid.shape)} must "
                       "both be [B].")
    predicted = jnp.argmax(outputs["logits"], axis=-1)
    correct = (predicted == labels.astype(predicted.dtype)) & valid.astype(bool)
    sums["classifier_correct"] = jnp.sum(correct.astype(jnp.float32))
  return sums


def feature_statistics(totals: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(mu [F], sigma [F, F]) in float64 of the features in totals of `classifier_batch_sums`."""
  return fid.statistics_from_sums({"sum": totals["classifier_sum"],
                                   "outer": totals["classifier_outer"],
                                   "count": totals["classifier_count"]})


def classifier_metrics_from_sums(totals: Mapping[str, Any],
                                 reference: tuple[np.ndarray, ...] | None
                                 ) -> dict[str, float]:
  """The classifier metrics of a set from the totals of `classifier_batch_sums`.

  Args:
    totals: the per-batch sums added over all batches (and hosts).
    reference: (mu, sigma[, ...]) of the real held-out features (`EvalClassifier.reference`
      or `classifier.load_reference(path)`); None = no FD.

  Returns:
    {'class_accuracy': in [0, 1]} when the sums had labels, and {'fd_classifier': ≥ 0}
    when a reference is given and the set has at least 2 rows.

  Raises:
    ValueError: no valid row at all.
  """
  count = float(np.asarray(totals["classifier_count"], np.float64))
  if count < 1:
    raise ValueError("Classifier metrics need at least one valid example.")
  metrics = {}
  if "classifier_correct" in totals:
    metrics["class_accuracy"] = float(np.asarray(totals["classifier_correct"],
                                                 np.float64)) / count
  if reference is not None and count >= 2:
    mu_ref, sigma_ref = reference[0], reference[1]
    metrics["fd_classifier"] = fid.frechet_distance(*feature_statistics(totals),
                                                    np.asarray(mu_ref, np.float64),
                                                    np.asarray(sigma_ref, np.float64))
  return metrics


# ---------------------------------------------------------------------- from the config

def _check_fits(config, metadata: Mapping[str, Any]) -> str | None:
  """Why the classifier cannot score this config's images, or None if it can."""
  trained = metadata.get("input", {})
  data = config.data
  problems = []
  if data.source != "idx":
    problems.append(f"data.source={data.source!r} (the classifier knows IDX data only)")
  if data.image_size != trained.get("image_size"):
    problems.append(f"data.image_size={data.image_size} (trained on "
                    f"{trained.get('image_size')})")
  if data.source == "idx" and data.idx_pad_to != trained.get("pad_to"):
    problems.append(f"data.idx_pad_to={data.idx_pad_to} (trained on {trained.get('pad_to')})")
  num_classes = metadata.get("architecture", {}).get("num_classes")
  if config.prior.condition == "class" and config.prior.num_classes != num_classes:
    problems.append(f"prior.num_classes={config.prior.num_classes} (the classifier has "
                    f"{num_classes})")
  return "; ".join(problems) or None


def load_eval_classifier(config) -> EvalClassifier | None:
  """The classifier for the priors' evaluation, or None (one log line) without one.

  `config.weights.classifier`:
    ''        `$RVQ_JAX_WEIGHTS_DIR/fashion_mnist_classifier.npz` if it exists and fits
              the config's data (IDX images of its size and padding, its number of
              classes); otherwise None, logged at INFO;
    a path    that file; missing → None with a warning; a file that does not fit the
              data → ValueError (an explicit choice that cannot work);
    'random'  random weights and a standard-normal reference (mu = 0, sigma = I): their
              numbers mean nothing; only with `weights.random` (tests).

  Args:
    config: the run's config (reads `weights`, `data` and `prior`).

  Raises:
    ValueError: 'random' without `weights.random`, or a configured file that does not
      fit the data.
  """
  configured = config.weights.classifier
  if configured == "random":
    if not config.weights.random:
      raise ValueError("weights.classifier='random' gives meaningless class accuracies and "
                       "FDs; it is meant for tests, together with weights.random=True.")
    network = classifier_lib.random_classifier(
        5, image_size=config.data.image_size,
        num_classes=config.prior.num_classes or classifier_lib.NUM_CLASSES)
    dim = network.feature_dim
    return EvalClassifier(network, (np.zeros(dim), np.eye(dim)), None, "random")
  try:
    path = pretrained.resolve_weights_path(classifier_lib.NETWORK_NAME, configured or None)
  except FileNotFoundError:
    path = None
  if path is None or not files.is_file(path):
    log = logging.warning if configured else logging.info
    log("No classifier weights at %s (config weights.classifier): evaluation reports no "
        "class accuracy or classifier FD. Make the file with:\n  %s",
        path or f"${pretrained.WEIGHTS_DIR_ENV_VAR}/{classifier_lib.NETWORK_NAME}.npz "
        f"(${pretrained.WEIGHTS_DIR_ENV_VAR} is not set)",
        pretrained.converter_command(classifier_lib.NETWORK_NAME,
                                     path or f"{classifier_lib.NETWORK_NAME}.npz"))
    return None
  metadata = classifier_lib.read_metadata(path)
  problem = _check_fits(config, metadata)
  if problem:
    if configured:
      raise ValueError(f"weights.classifier={path} was trained on "
                       f"{classifier_lib.describe_training(metadata)}; it cannot score "
                       f"this config's images: {problem}.")
    logging.info("The classifier %s does not fit this config's data (%s): evaluation "
                 "reports no class accuracy or classifier FD.", path, problem)
    return None
  mu, sigma, _ = classifier_lib.load_reference(path)
  logging.info("Classifier for class accuracy and FD: %s (%s).", path,
               classifier_lib.describe_training(metadata))
  return EvalClassifier(classifier_lib.load_classifier(path), (mu, sigma),
                        metadata.get("test_accuracy"), path)
