"""Fréchet Inception Distance and Inception Score from moment sums that add over batches.

Evaluation here never holds all features of a split: every batch (on every host) gives
SUMS — of the features, of their outer products, of the class probabilities — which the
training loop adds over batches in float64 (`rvq_jax.train.loop.evaluate_batches`), and
the statistics come from the totals at the end:

  per batch (jittable, on the accelerator)      at the end (host, float64)
  `feature_sums(pool3, valid)`               →  `statistics_from_sums` → (mu, sigma)
  `inception_score_sums(logits, valid)`      →  `inception_score_from_sums` → IS
  `generated_feature_sums(inception, x, v)`  =  both of the above for a batch of images

Padding rows (valid = False, the last eval batch) contribute nothing, so the totals, and
so FID and IS, do not depend on how the examples were split into batches or hosts.

FID = ‖mu₁ − mu₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) in float64, with the unbiased (N − 1)
covariance of `np.cov`, as the original TTUR code and pytorch-fid define it (the trace of
the root through a symmetric eigendecomposition; see `frechet_distance`). Inception
features come from `rvq_jax.metrics.inception.InceptionV3` (the pytorch-fid network,
images resized to 299). Images are clipped to [-1, 1] and rounded to the 8-bit grid first
(`to_uint8_grid`): published FIDs are computed on saved 8-bit images, and real images
from the data pipeline are on that grid already.

Reference statistics of a dataset split are computed once and cached in an `.npz`
(`reference_statistics`) holding `mu`, `sigma` — the key names of pytorch-fid/TTUR/ADM
statistics files, which `load_statistics` reads too — plus `count` and a `key` that
identifies the data, the split, the network and which of its features, so a stale cache
is never reused. The machinery is not tied to Inception: `feature_reference` computes
and caches the statistics of any `FeatureSpace` (a network and a features function; FD-VGG
in `rvq_jax.metrics.fd_vgg` is the other one), optionally with the features of the
split's first examples themselves (`max_rows`, for precision/recall).

For the priors' generation FID (gFID):

  sums = generated_feature_sums(inception, samples, valid)   # per batch, in the jit
  ... add the sums over batches in float64 (the loop does) ...
  gfid = fid_against_reference(totals, "ref/celebahq256_train.npz")
  inception_score = inception_score_from_sums(totals)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from rvq_jax import files
from rvq_jax.models import pretrained

# Bumped whenever the way reference statistics are computed changes: old caches go stale.
# 2: the key names the feature space (network, features, settings) and the rows kept.
_REFERENCE_FORMAT_VERSION = 2
# Data fields that change neither which examples are read nor how they look.
_DATA_FIELDS_NOT_IN_KEY = ("batch_size", "eval_batch_size", "num_workers", "prefetch_batches",
                           "probe_files")


# ---------------------------------------------------------------------- Fréchet distance

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d² = ‖mu1 − mu2‖² + tr(sigma1) + tr(sigma2) − 2 tr((sigma1 sigma2)^½).

  The trace of the square root is taken as Σ √λ of the symmetric PSD matrix
  sigma1^½ sigma2 sigma1^½, which has the same eigenvalues as sigma1 sigma2. This equals
  pytorch-fid's `scipy.linalg.sqrtm` of the (non-symmetric) product wherever that is
  accurate, needs only two symmetric eigendecompositions (several times faster at 2048
  dimensions), and stays exact for singular covariances (fewer samples than dimensions),
  where sqrtm needs pytorch-fid's eps·I retry.

  Args:
    mu1, mu2: [D] means.
    sigma1, sigma2: [D, D] covariances.

  Returns:
    The squared Fréchet distance (what is reported as FID).

  Raises:
    ValueError: mismatched shapes, or matrices that are not covariances (clearly
      non-symmetric or with clearly negative eigenvalues).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(
      np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(
      np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}.")
  root1 = _psd_square_root(sigma1, "sigma1")
  middle = root1 @ _symmetric(sigma2, "sigma2") @ root1
  eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_root = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def _symmetric(matrix: np.ndarray, name: str) -> np.ndarray:
  scale = max(np.abs(matrix).max(), np.finfo(np.float64).tiny)
  if np.abs(matrix - matrix.T).max() > 1e-6 * scale:
    raise ValueError(f"FID: {name} is not symmetric, so it is not a covariance matrix.")
  return (matrix + matrix.T) / 2


def _psd_square_root(matrix: np.ndarray, name: str) -> np.ndarray:
  values, vectors = np.linalg.eigh(_symmetric(matrix, name))
  # Singular covariances built from float32 moment sums (E[xx^T] − mu mu^T) carry
  # rounding-level negative eigenvalues, which are clipped; a large one means the input
  # is not a covariance at all.
  if values.min() < -1e-2 * max(values.max(), np.finfo(np.float64).tiny):
    raise ValueError(f"FID: {name} has a negative eigenvalue {values.min():.3g}, so it is "
                     "not a covariance matrix.")
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


# ---------------------------------------------------------------------- sums per batch

def to_uint8_grid(images: jax.Array) -> jax.Array:
  """Clips [-1, 1] images and rounds them to the 256 levels of an 8-bit image.

  What saving generated images as PNG (the usual FID protocol) would do; data images,
  decoded from 8-bit files, are unchanged by it (up to float rounding).

  Args:
    images: [..., 3] nominally in [-1, 1].

  Returns:
    [..., 3] float32 in [-1, 1] on the grid −1 + 2k/255.
  """
  levels = jnp.round((jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) * 127.5)
  return levels / 127.5 - 1.0


def feature_sums(features: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Sums over the valid rows that add over batches and hosts into FID statistics.

  Args:
    features: [B, D] (pool3 features: D = 2048).
    valid: [B] bool (or 0/1); rows with False (padding) contribute nothing.

  Returns:
    {'sum': [D] Σ f, 'outer': [D, D] Σ f fᵀ, 'count': [] number of valid rows}, float32.
  """
  features = features.astype(jnp.float32)
  weights = valid.astype(jnp.float32)
  weighted = features * weights[:, None]
  # HIGHEST: the covariance is a difference of large terms; TPU's default bf16 passes
  # (and GPU TF32) would ruin it.
  outer = jnp.einsum("bi,bj->ij", weighted, features, precision=jax.lax.Precision.HIGHEST)
  return {"sum": jnp.sum(weighted, axis=0), "outer": outer, "count": jnp.sum(weights)}


def statistics_from_sums(sums: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """(mu [D], sigma [D, D]) in float64 from totals of `feature_sums`.

  sigma is the unbiased covariance (divided by N − 1), what `np.cov(features,
  rowvar=False)` gives on the concatenated valid rows.

  Raises:
    ValueError: fewer than 2 examples.
  """
  count = float(np.asarray(sums["count"], np.float64))
  if count < 2:
    raise ValueError(f"FID statistics need at least 2 examples, got {count:g}.")
  total = np.asarray(sums["sum"], np.float64)
  outer = np.asarray(sums["outer"], np.float64)
  mu = total / count
  sigma = (outer - count * np.outer(mu, mu)) / (count - 1.0)
  # Σ f fᵀ summed in float32 pieces is symmetric only up to rounding.
  return mu, 0.5 * (sigma + sigma.T)


def inception_score_sums(logits: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Sums over the valid rows that add into the Inception Score.

  Args:
    logits: [B, K] class logits (Inception's `logits_unbiased`, K = 1008).
    valid: [B] bool (or 0/1).

  Returns:
    {'prob_sum': [K] Σ_x p(y|x), 'plogp_sum': [] Σ_x Σ_y p(y|x) log p(y|x),
     'count': [] number of valid rows}, float32.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  probs = jnp.exp(log_probs)
  weights = valid.astype(jnp.float32)
  plogp = jnp.sum(probs * log_probs, axis=-1)
  return {"prob_sum": jnp.sum(probs * weights[:, None], axis=0),
          "plogp_sum": jnp.sum(plogp * weights), "count": jnp.sum(weights)}


def inception_score_from_sums(sums: Mapping[str, Any]) -> float:
  """exp(E_x KL(p(y|x) ‖ p(y))) from totals of `inception_score_sums`.

  This is the Inception Score over all examples as ONE split (p(y) is the mean of
  p(y|x) over the whole set). The customary "IS ± std over 10 splits" of Salimans et al.
  averages exp(·) over ten tenths; the one-split value is slightly higher for the same
  images and the two are not interchangeable.

  E_x KL = E_x Σ_y p log p − Σ_y p̄ log p̄ with p̄ = E_x p(y|x): two sums suffice.
  """
  count = float(np.asarray(sums["count"], np.float64))
  if count < 1:
    raise ValueError("The Inception Score needs at least one example.")
  mean_probs = np.asarray(sums["prob_sum"], np.float64) / count
  mean_plogp = float(np.asarray(sums["plogp_sum"], np.float64)) / count
  positive = mean_probs > 0
  marginal_entropy = -np.sum(mean_probs[positive] * np.log(mean_probs[positive]))
  return float(np.exp(mean_plogp + marginal_entropy))


def generated_feature_sums(inception: nnx.Module, images: jax.Array, valid: jax.Array, *,
                           quantize: bool = True) -> dict[str, jax.Array]:
  """FID and IS sums of a batch of images, in one pass of Inception (jittable).

  Args:
    inception: an `InceptionV3` (see `rvq_jax.metrics.inception`).
    images: [B, H, W, 3] in [-1, 1] (generated samples or reconstructions).
    valid: [B] bool; padding rows are left out.
    quantize: clip and round to 8-bit levels first (`to_uint8_grid`).

  Returns:
    {'sum', 'outer', 'count'} of `feature_sums` and {'prob_sum', 'plogp_sum'} of
    `inception_score_sums`: flat, so a training loop can add them over batches as they
    are. `fid_against_reference` and `inception_score_from_sums` read the totals.
  """
  if quantize:
    images = to_uint8_grid(images)
  outputs = inception(images)
  sums = feature_sums(outputs["pool3"], valid)
  score_sums = inception_score_sums(outputs["logits_unbiased"], valid)
  sums.update(prob_sum=score_sums["prob_sum"], plogp_sum=score_sums["plogp_sum"])
  return sums


def fid_from_sums(sums_a: Mapping[str, Any], sums_b: Mapping[str, Any]) -> float:
  """FID between two sets given as totals of `feature_sums`."""
  return frechet_distance(*statistics_from_sums(sums_a), *statistics_from_sums(sums_b))


def fid_against_reference(sums: Mapping[str, Any], reference_npz_path: str) -> float:
  """FID of a set (totals of `feature_sums`) against a reference statistics file.

  The file is one `reference_statistics` wrote, or any `.npz` with `mu` and `sigma`
  (pytorch-fid, TTUR and ADM reference files), computed with the same Inception.
  """
  mu_ref, sigma_ref, _ = load_statistics(reference_npz_path)
  return frechet_distance(*statistics_from_sums(sums), mu_ref, sigma_ref)


# ---------------------------------------------------------------------- statistics files

def save_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, *, count: float,
                    key: str = "", rows: np.ndarray | None = None) -> None:
  """Writes `mu`, `sigma`, `count`, the cache `key` and optionally per-example `rows`
  (stored as `features`) to an `.npz`, atomically."""
  arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64),
            "count": np.asarray(count, np.float64), "key": np.asarray(key)}
  if rows is not None:
    arrays["features"] = np.asarray(rows, np.float32)
  pretrained.write_npz(path, arrays)


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray, str | None]:
  """(mu [D], sigma [D, D], key or None) of a statistics `.npz` (float64).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file has no `mu`/`sigma`, or their shapes do not fit.
  """
  reference = load_reference(path)
  return reference.mu, reference.sigma, reference.key


@dataclasses.dataclass(frozen=True)
class Reference:
  """Statistics of a data split in one feature space (what `feature_reference` returns).

  Attributes:
    mu: [D] float64 mean.
    sigma: [D, D] float64 unbiased covariance.
    count: number of examples they summarize (NaN for files that do not say).
    rows: [R, D] float32 features of the split's first R examples, in order (R = the
      smaller of `max_rows` and the split's size), or None when none were kept.
    key: the cache key it was computed under (None for files without one).
  """

  mu: np.ndarray
  sigma: np.ndarray
  count: float
  rows: np.ndarray | None = None
  key: str | None = None


def load_reference(path: str) -> Reference:
  """A statistics `.npz` (`save_statistics`, or pytorch-fid/TTUR/ADM's `mu`/`sigma` files).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file has no `mu`/`sigma`, or their shapes do not fit.
  """
  if not files.is_file(path):
    raise FileNotFoundError(f"Statistics file {path} does not exist; make it with "
                            "rvq_jax.metrics.fid.reference_statistics (FID) or "
                            "feature_reference (any feature space).")
  archive = files.load_npz(path)  # Local or gs:// (a bucket next to the checkpoints).
  if "mu" not in archive or "sigma" not in archive:
    raise ValueError(f"{path} holds {sorted(archive)}, not FID statistics (mu, sigma).")
  mu = np.asarray(archive["mu"], np.float64)
  sigma = np.asarray(archive["sigma"], np.float64)
  key = str(archive["key"]) if "key" in archive else None
  count = float(archive["count"]) if "count" in archive else math.nan
  rows = np.asarray(archive["features"], np.float32) if "features" in archive else None
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together.")
  if rows is not None and (rows.ndim != 2 or rows.shape[1] != mu.shape[0]):
    raise ValueError(f"{path}: features {rows.shape} do not fit mu {mu.shape}.")
  return Reference(mu=mu, sigma=sigma, count=count, rows=rows, key=key)


# ---------------------------------------------------------------------- feature spaces

@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSpace:
  """Per-example features of a frozen network: what reference statistics are taken of.

  Attributes:
    name: which features, for the cache key (e.g. 'inception_fid/pool3').
    network: the module; a fingerprint of its weights goes into the key.
    features: (network, images [B, H, W, 3] in [-1, 1]) → [B, D] features; jittable.
    settings: anything else that changes the features (e.g. Inception's input size),
      JSON-serializable, for the key.
  """

  name: str
  network: nnx.Module
  features: Callable[[nnx.Module, jax.Array], jax.Array]
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _pool3(inception: nnx.Module, images: jax.Array) -> jax.Array:
  return inception(images)["pool3"]


def inception_space(inception: nnx.Module) -> FeatureSpace:
  """FID's features: the 2048 pool3 activations of the FID Inception."""
  return FeatureSpace(name="inception_fid/pool3", network=inception, features=_pool3,
                      settings={"resize_to": getattr(inception, "resize_to", None)})


# ---------------------------------------------------------------------- reference statistics

def _host_local(tree):
  """Replicated global arrays (a multi-host mesh) → this host's copy, to run locally."""
  def local(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return leaf.addressable_data(0)
    return leaf
  return jax.tree.map(local, tree)


def weights_fingerprint(module: nnx.Module) -> str:
  """SHA-256 (first 16 hex digits) of a module's weights: names, shapes and values."""
  state = _host_local(nnx.to_pure_dict(nnx.state(module, nnx.Not(nnx.RngState))))
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  digest = hashlib.sha256()
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}:{array.shape}:{array.dtype};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def reference_key(data_config, split: str, space: FeatureSpace, *,
                  max_examples: int | None = None, quantize: bool = True,
                  max_rows: int = 0) -> str:
  """The cache key of reference statistics: data, split, example cap, features, rows.

  JSON of the resolved data config (without fields that only affect speed or batching),
  the split, `max_examples`, the quantization, the feature space (its name, settings and
  a fingerprint of its network's weights) and how many per-example rows are kept.
  """
  from rvq_jax.data import factory as data_factory  # pylint: disable=g-import-not-at-top
  resolved = data_factory.resolve_config(data_config).to_dict()
  for field in _DATA_FIELDS_NOT_IN_KEY:
    resolved.pop(field, None)
  key = {"version": _REFERENCE_FORMAT_VERSION, "data": resolved, "split": split,
         "max_examples": max_examples, "quantize": bool(quantize),
         "features": space.name, "settings": dict(space.settings),
         "weights": weights_fingerprint(space.network), "max_rows": int(max_rows)}
  return json.dumps(key, sort_keys=True, default=list)


def _reference_batches(data_config, split: str, batch_size: int) -> Iterator[dict]:
  """One ordered, unaugmented pass over `split`, in global batches of `batch_size`.

  'eval' is the data factory's eval iterator. 'train' reads the training source the
  same way (source order, centre crops, no flips, last batch padded): the factory's
  training iterator repeats forever with augmentation, which reference statistics
  must not see.
  """
  from rvq_jax.data import factory as data_factory  # pylint: disable=g-import-not-at-top
  from rvq_jax.data.iterator import BatchIterator  # pylint: disable=g-import-not-at-top
  if split == "eval":
    iterator = data_factory.create_dataset(data_config, split="eval", batch_size=batch_size)
  elif split == "train":
    config = data_factory.validate_config(data_config, split="train",
                                          process_count=jax.process_count())
    iterator = BatchIterator(
        data_factory.create_source(config, split="train"),
        data_factory.preprocess_config(config, training=False),
        global_batch_size=batch_size, process_index=jax.process_index(),
        process_count=jax.process_count(), shuffle=False, num_epochs=1,
        drop_remainder=False, num_workers=config.num_workers,
        prefetch_batches=config.prefetch_batches)
  else:
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  with iterator:
    yield from iterator


def feature_reference(data_config, split: str, space: FeatureSpace, cache_path: str | None,
                      batch_size: int, *, max_examples: int | None = None,
                      quantize: bool = True, max_rows: int = 0) -> Reference:
  """Statistics of `space`'s features over a dataset split, computed once and cached.

  A cache file whose stored key (see `reference_key`) differs — other data, image size,
  split, example cap, features, network weights or row count — is recomputed and
  overwritten, never reused. Every host reads its share of the data; the sums (and the
  kept rows) are combined over hosts; process 0 writes the file.

  Args:
    data_config: the data config (`rvq_jax.data.factory`).
    split: 'train' or 'eval' (each read once, in order, without augmentation).
    space: the network and its features (`inception_space`, `fd_vgg.feature_space`).
    cache_path: the `.npz` to read or write; None = compute, do not cache.
    batch_size: global batch size of the pass (divisible by the process count).
    max_examples: use only the first this many examples of the split (None = all).
    quantize: round to 8-bit levels first (`to_uint8_grid`), as the generated side does
      (keep the two the same).
    max_rows: also keep the features of the split's first this many examples, in order
      (`Reference.rows`), e.g. as the real set of precision/recall; 0 = none.

  Returns:
    The `Reference`: mu [D], sigma [D, D] (float64), count, rows.
  """
  key = reference_key(data_config, split, space, max_examples=max_examples,
                      quantize=quantize, max_rows=max_rows)
  if cache_path and files.is_file(cache_path):
    cached = load_reference(cache_path)
    if cached.key == key:
      logging.info("Reference statistics (%s) from %s.", space.name, cache_path)
      return cached
    logging.warning("Reference statistics in %s were computed for other data or another "
                    "network (cached key %s, needed %s); recomputing them.", cache_path,
                    cached.key, key)

  graphdef, state = nnx.split(space.network)
  state = _host_local(state)

  @jax.jit
  def batch_outputs(state, images, valid):
    if quantize:
      images = to_uint8_grid(images)
    features = space.features(nnx.merge(graphdef, state), images)
    return feature_sums(features, valid), features

  per_host = batch_size // jax.process_count()
  limit = math.inf if max_examples is None else max_examples
  rows_limit = int(min(max_rows, limit))
  totals: dict[str, np.ndarray] = {}
  # Rows by global position: each host fills the positions of its own examples, so the
  # buffers add up over hosts into the split's first examples in order.
  rows = filled = None
  for step, batch in enumerate(_reference_batches(data_config, split, batch_size)):
    if step * batch_size >= limit:
      break
    # This host's rows are global rows step·B + p·B/P + r (see the data iterator).
    positions = step * batch_size + jax.process_index() * per_host + np.arange(per_host)
    valid = np.asarray(batch["valid"], bool) & (positions < limit)
    sums, features = jax.device_get(batch_outputs(state, np.asarray(batch["image"]), valid))
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
    if rows_limit > 0:
      if rows is None:
        rows = np.zeros((rows_limit, features.shape[1]), np.float32)
        filled = np.zeros(rows_limit, bool)
      keep = valid & (positions < rows_limit)
      rows[positions[keep]] = features[keep]
      filled[positions[keep]] = True
  if not totals:
    raise ValueError(f"The {split!r} split produced no batches.")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    totals = {name: np.sum(multihost_utils.process_allgather(value), axis=0)
              for name, value in totals.items()}
    if rows is not None:
      rows = np.sum(multihost_utils.process_allgather(rows), axis=0)
      filled = np.any(multihost_utils.process_allgather(filled), axis=0)
  if rows is not None:
    # Padding is only at the end of a pass, so the filled positions are a prefix.
    rows = rows[:int(filled.sum())]
  mu, sigma = statistics_from_sums(totals)
  count = float(totals["count"])
  if cache_path and jax.process_index() == 0:
    save_statistics(cache_path, mu, sigma, count=count, key=key, rows=rows)
    logging.info("Reference statistics (%s) of %d examples written to %s.", space.name,
                 int(count), cache_path)
  return Reference(mu=mu, sigma=sigma, count=count, rows=rows, key=key)


def reference_statistics(data_config, split: str, inception: nnx.Module,
                         cache_path: str | None, batch_size: int, *,
                         max_examples: int | None = None,
                         quantize: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of Inception features of a dataset split, computed once and cached.

  `feature_reference` in `inception_space(inception)`; see there for the cache.

  Args:
    data_config: the data config (`rvq_jax.data.factory`).
    split: 'train' or 'eval' (each read once, in order, without augmentation).
    inception: an `InceptionV3` with the real weights (`load_inception`).
    cache_path: the `.npz` to read or write; None = compute, do not cache.
    batch_size: global batch size of the pass (divisible by the process count).
    max_examples: use only the first this many examples of the split (None = all).
    quantize: round to 8-bit levels first, as `generated_feature_sums` does (keep the
      two the same).

  Returns:
    mu [2048], sigma [2048, 2048], float64.
  """
  reference = feature_reference(data_config, split, inception_space(inception), cache_path,
                                batch_size, max_examples=max_examples, quantize=quantize)
  return reference.mu, reference.sigma
