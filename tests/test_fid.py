"""FID / Inception Score: the math against independent computations, the sums against the
statistics of the whole set, the FID Inception and its converter on random weights.

No pretrained file exists (or is downloaded) here. The network is checked against an
independent PyTorch implementation of pytorch-fid's FID Inception (written out below from
torchvision's `Inception3` and pytorch-fid's `FIDInception*` blocks) on the same random
state dict, at a small input size (75, the smallest the layers take) to stay fast.
"""
import functools
import logging as std_logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from flax import nnx

from rvq_jax import config as config_lib
from rvq_jax.metrics import fid as fid_lib
from rvq_jax.metrics import inception as inception_lib
from rvq_jax.models import pretrained
from rvq_jax.tools import convert_weights
from rvq_jax.train import tokenizer_stage

SMALL = 75  # the smallest input Inception accepts: shape checks at 1/16 of the cost


@pytest.fixture(scope="module")
def small_inception():
  return inception_lib.random_inception(0, resize_to=SMALL)


@pytest.fixture(scope="module")
def inception_apply():
  return nnx.jit(lambda model, images: model(images))


def _images(seed, batch=2, size=32):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------- Fréchet distance

def _reference_frechet(mu1, sigma1, mu2, sigma2):
  """pytorch-fid's route: scipy.linalg.sqrtm of the non-symmetric product Σ1Σ2 (the
  implementation takes eigenvalues of Σ1^½ Σ2 Σ1^½ instead)."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
               - 2 * np.trace(covmean))


def _random_gaussian_stats(rng, dim, samples):
  mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
  features = rng.standard_normal((samples, dim)) @ mixing + rng.standard_normal(dim)
  return features.mean(0), np.cov(features, rowvar=False)


def test_frechet_distance_matches_an_independent_computation():
  rng = np.random.default_rng(0)
  for dim in (8, 64):
    mu1, sigma1 = _random_gaussian_stats(rng, dim, 500)
    mu2, sigma2 = _random_gaussian_stats(rng, dim, 500)
    np.testing.assert_allclose(fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2),
                               _reference_frechet(mu1, sigma1, mu2, sigma2), rtol=1e-9)


def test_frechet_distance_closed_form_for_diagonal_covariances():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
  var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
  np.testing.assert_allclose(
      fid_lib.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)), expected, rtol=1e-12)
  # 1-D: (m1 − m2)² + (s1 − s2)².
  assert fid_lib.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(10.0)


def test_frechet_distance_of_identical_sets_is_zero():
  rng = np.random.default_rng(2)
  mu, sigma = _random_gaussian_stats(rng, 128, 1000)
  assert abs(fid_lib.frechet_distance(mu, sigma, mu, sigma)) <= 1e-6
  # Fewer samples than dimensions: singular covariances (sqrtm would need an eps retry).
  features = rng.standard_normal((20, 64))
  mu, sigma = features.mean(0), np.cov(features, rowvar=False)
  assert abs(fid_lib.frechet_distance(mu, sigma, mu, sigma)) < 1e-3


def test_frechet_distance_rejects_mismatched_shapes_and_non_covariances():
  with pytest.raises(ValueError, match="Mismatched"):
    fid_lib.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match="not symmetric"):
    fid_lib.frechet_distance(np.zeros(2), [[1.0, 0.5], [0.0, 1.0]], np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="negative eigenvalue"):
    fid_lib.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


@pytest.mark.slow  # SciPy's sqrtm of a 2048 × 2048 product: minutes on a 2-core CPU.
def test_frechet_distance_at_inception_size_matches_sqrtm():
  """2048 dimensions, the real size: equal to pytorch-fid's sqrtm route."""
  rng = np.random.default_rng(3)
  mu1, sigma1 = _random_gaussian_stats(rng, 2048, 3000)
  mu2, sigma2 = _random_gaussian_stats(rng, 2048, 3000)
  np.testing.assert_allclose(fid_lib.frechet_distance(mu1, sigma1, mu2, sigma2),
                             _reference_frechet(mu1, sigma1, mu2, sigma2), rtol=1e-7)


# ---------------------------------------------------------------------- sums

def _batched(array, valid, batch):
  """Splits rows into batches of `batch`, padding the last with garbage, invalid rows."""
  pad = -len(array) % batch
  array = np.concatenate([array, np.full((pad,) + array.shape[1:], 7.0, array.dtype)])
  valid = np.concatenate([valid, np.zeros(pad, bool)])
  return [(array[i:i + batch], valid[i:i + batch]) for i in range(0, len(array), batch)]


def _total(batches, fn):
  jitted = jax.jit(fn)
  totals = {}
  for rows, valid in batches:
    for name, value in jax.device_get(jitted(rows, valid)).items():
      totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
  return totals


def test_feature_sums_over_batches_equal_the_statistics_of_the_whole_set():
  rng = np.random.default_rng(3)
  features = (rng.standard_normal((37, 16)) * rng.uniform(0.5, 2, 16) + 1.0).astype(np.float32)
  valid = rng.uniform(size=37) > 0.2
  mu_ref = features[valid].astype(np.float64).mean(0)
  sigma_ref = np.cov(features[valid].astype(np.float64), rowvar=False)
  results = []
  for batch in (8, 37, 5):
    totals = _total(_batched(features, valid, batch), fid_lib.feature_sums)
    assert totals["count"] == valid.sum()
    mu, sigma = fid_lib.statistics_from_sums(totals)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-4, atol=1e-5)
    results.append(totals)
  assert abs(fid_lib.fid_from_sums(results[0], results[2])) < 1e-4


def test_statistics_need_two_examples():
  sums = {"sum": np.ones(3), "outer": np.eye(3), "count": 1.0}
  with pytest.raises(ValueError, match="at least 2"):
    fid_lib.statistics_from_sums(sums)


def _inception_score(logits, valid, batch):
  totals = _total(_batched(logits, valid, batch), fid_lib.inception_score_sums)
  return fid_lib.inception_score_from_sums(totals)


def test_inception_score_extremes_and_batch_split():
  # Identical predictions (here uniform): p(y|x) = p(y), KL = 0, IS = 1.
  uniform = np.zeros((12, 1008), np.float32)
  assert _inception_score(uniform, np.ones(12, bool), 5) == pytest.approx(1.0, abs=1e-6)
  # K confident classes, each predicted for N/K images: IS = K.
  k = 10
  confident = np.full((4 * k, 1008), -50.0, np.float32)
  confident[np.arange(4 * k), np.arange(4 * k) % k] = 50.0
  assert _inception_score(confident, np.ones(4 * k, bool), 7) == pytest.approx(k, rel=1e-5)
  # The independent definition on random predictions, split however, padding ignored.
  rng = np.random.default_rng(4)
  logits = (3 * rng.standard_normal((30, 1008))).astype(np.float32)
  valid = rng.uniform(size=30) > 0.3
  probs = scipy.special.softmax(logits[valid].astype(np.float64), axis=1)
  marginal = probs.mean(0)
  expected = np.exp(np.mean(np.sum(probs * (np.log(probs) - np.log(marginal)), axis=1)))
  for batch in (4, 30):
    assert _inception_score(logits, valid, batch) == pytest.approx(expected, rel=1e-5)


def test_to_uint8_grid_clips_and_rounds():
  values = jnp.asarray([-3.0, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0])
  levels = (np.asarray(fid_lib.to_uint8_grid(values)) + 1) * 127.5
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  np.testing.assert_allclose(levels[[0, 1, 5, 6]], [0, 0, 255, 255], atol=1e-4)


# ---------------------------------------------------------------------- the network

def test_inception_shapes_determinism_and_logits(small_inception, inception_apply):
  images = _images(0, batch=3, size=16)
  first = inception_apply(small_inception, images)
  second = inception_apply(small_inception, images)
  assert first["pool3"].shape == (3, 2048)
  assert first["logits"].shape == first["logits_unbiased"].shape == (3, 1008)
  for name in first:
    assert first[name].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(first[name]), np.asarray(second[name]))
    assert np.all(np.isfinite(np.asarray(first[name])))
  np.testing.assert_allclose(
      np.asarray(first["logits"]),
      np.asarray(first["logits_unbiased"]) + np.asarray(small_inception.fc.bias[...]),
      rtol=1e-6, atol=1e-5)
  # pool3 is an average of ReLUs.
  assert np.all(np.asarray(first["pool3"]) >= 0)
  # Different images, different features.
  assert not np.allclose(np.asarray(first["pool3"][0]), np.asarray(first["pool3"][1]))


def test_inception_rejects_too_small_inputs():
  with pytest.raises(ValueError, match=">= 75"):
    inception_lib.InceptionV3(resize_to=32, rngs=nnx.Rngs(0))


def test_generated_feature_sums_have_the_loop_layout(small_inception):
  graphdef, state = nnx.split(small_inception)
  sums = jax.jit(lambda state, images, valid: fid_lib.generated_feature_sums(
      nnx.merge(graphdef, state), images, valid))(
          state, _images(1, batch=2, size=16), np.array([True, False]))
  assert {name: tuple(value.shape) for name, value in sums.items()} == {
      "sum": (2048,), "outer": (2048, 2048), "count": (), "prob_sum": (1008,),
      "plogp_sum": ()}
  assert float(sums["count"]) == 1.0
  assert float(jnp.sum(sums["prob_sum"])) == pytest.approx(1.0, rel=1e-5)


# ---------------------------------------------------------------------- strict loading

@pytest.fixture(scope="module")
def weight_arrays(small_inception):
  return pretrained.module_arrays(small_inception)


def test_load_inception_round_trip_and_strictness(tmp_path, weight_arrays, small_inception,
                                                  inception_apply):
  path = str(tmp_path / "inception_fid.npz")
  pretrained.write_npz(path, weight_arrays)
  loaded = inception_lib.load_inception(path, resize_to=SMALL)
  images = _images(2, batch=1, size=16)
  np.testing.assert_array_equal(np.asarray(inception_apply(loaded, images)["pool3"]),
                                np.asarray(inception_apply(small_inception, images)["pool3"]))

  missing = dict(weight_arrays)
  del missing["Mixed_6b.branch7x7_2.bn.var"]
  pretrained.write_npz(path, missing)
  with pytest.raises(pretrained.WeightMismatchError, match=r"missing keys.*Mixed_6b\.branch7x7_2"):
    inception_lib.load_inception(path)

  wrong = dict(weight_arrays)
  # A 7×1 kernel where a 1×7 one belongs: the kind of mistake a converter makes.
  wrong["Mixed_6b.branch7x7_2.conv.kernel"] = np.zeros((7, 1, 128, 128), np.float32)
  pretrained.write_npz(path, wrong)
  with pytest.raises(pretrained.WeightMismatchError, match="wrong shapes"):
    inception_lib.load_inception(path)


def test_load_inception_names_the_missing_file_and_the_command(tmp_path):
  path = str(tmp_path / "nowhere" / "inception_fid.npz")
  with pytest.raises(FileNotFoundError) as error:
    inception_lib.load_inception(path)
  message = str(error.value)
  assert path in message
  assert "--network inception_fid" in message and inception_lib.TORCH_CHECKPOINT in message


# ---------------------------------------------------------------------- converter + torch

def _conv(name, cin, cout, kernel, stride=1, padding=0):
  kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
  padding = (padding, padding) if isinstance(padding, int) else padding
  return name, cin, cout, kernel, stride, padding


def _fid_inception_convs():
  """Every BasicConv2d of pytorch-fid's network: (name, in, out, (kh, kw), stride, (ph, pw)).

  Written from torchvision's Inception3 / InceptionA-E (independent of the module).
  """
  convs = [_conv("Conv2d_1a_3x3", 3, 32, 3, 2), _conv("Conv2d_2a_3x3", 32, 32, 3),
           _conv("Conv2d_2b_3x3", 32, 64, 3, padding=1), _conv("Conv2d_3b_1x1", 64, 80, 1),
           _conv("Conv2d_4a_3x3", 80, 192, 3)]
  for name, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    convs += [_conv(f"{name}.branch1x1", cin, 64, 1), _conv(f"{name}.branch5x5_1", cin, 48, 1),
              _conv(f"{name}.branch5x5_2", 48, 64, 5, padding=2),
              _conv(f"{name}.branch3x3dbl_1", cin, 64, 1),
              _conv(f"{name}.branch3x3dbl_2", 64, 96, 3, padding=1),
              _conv(f"{name}.branch3x3dbl_3", 96, 96, 3, padding=1),
              _conv(f"{name}.branch_pool", cin, pool, 1)]
  convs += [_conv("Mixed_6a.branch3x3", 288, 384, 3, 2),
            _conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1),
            _conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3, padding=1),
            _conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 2)]
  for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    convs += [_conv(f"{name}.branch1x1", 768, 192, 1), _conv(f"{name}.branch7x7_1", 768, c7, 1),
              _conv(f"{name}.branch7x7_2", c7, c7, row[0], padding=row[1]),
              _conv(f"{name}.branch7x7_3", c7, 192, col[0], padding=col[1]),
              _conv(f"{name}.branch7x7dbl_1", 768, c7, 1),
              _conv(f"{name}.branch7x7dbl_2", c7, c7, col[0], padding=col[1]),
              _conv(f"{name}.branch7x7dbl_3", c7, c7, row[0], padding=row[1]),
              _conv(f"{name}.branch7x7dbl_4", c7, c7, col[0], padding=col[1]),
              _conv(f"{name}.branch7x7dbl_5", c7, 192, row[0], padding=row[1]),
              _conv(f"{name}.branch_pool", 768, 192, 1)]
  convs += [_conv("Mixed_7a.branch3x3_1", 768, 192, 1),
            _conv("Mixed_7a.branch3x3_2", 192, 320, 3, 2),
            _conv("Mixed_7a.branch7x7x3_1", 768, 192, 1),
            _conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3)),
            _conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0)),
            _conv("Mixed_7a.branch7x7x3_4", 192, 192, 3, 2)]
  for name, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    convs += [_conv(f"{name}.branch1x1", cin, 320, 1), _conv(f"{name}.branch3x3_1", cin, 384, 1),
              _conv(f"{name}.branch3x3_2a", 384, 384, (1, 3), padding=(0, 1)),
              _conv(f"{name}.branch3x3_2b", 384, 384, (3, 1), padding=(1, 0)),
              _conv(f"{name}.branch3x3dbl_1", cin, 448, 1),
              _conv(f"{name}.branch3x3dbl_2", 448, 384, 3, padding=1),
              _conv(f"{name}.branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1)),
              _conv(f"{name}.branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0)),
              _conv(f"{name}.branch_pool", cin, 192, 1)]
  return convs


def _random_torch_state_dict(torch, seed=0):
  """pytorch-fid's state-dict keys and shapes, random values (BN stats away from identity)."""
  generator = torch.Generator().manual_seed(seed)
  randn = functools.partial(torch.randn, generator=generator)
  state = {}
  for name, cin, cout, (kh, kw), _, _ in _fid_inception_convs():
    state[f"{name}.conv.weight"] = randn(cout, cin, kh, kw) * (2.0 / (cin * kh * kw)) ** 0.5
    state[f"{name}.bn.weight"] = 1 + 0.1 * randn(cout)
    state[f"{name}.bn.bias"] = 0.1 * randn(cout)
    state[f"{name}.bn.running_mean"] = 0.1 * randn(cout)
    state[f"{name}.bn.running_var"] = 0.5 + torch.rand(cout, generator=generator)
    state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
  state["fc.weight"] = randn(1008, 2048) / 2048**0.5
  state["fc.bias"] = 0.1 * randn(1008)
  return state


def _torch_fid_inception(torch, state, images01, size):
  """pytorch-fid's forward (resize, 2x − 1, FID blocks, pool3, fc) in plain torch ops."""
  F = torch.nn.functional
  convs = {name: (stride, padding) for name, _, _, _, stride, padding in _fid_inception_convs()}

  def conv(name, x):
    stride, padding = convs[name]
    x = F.conv2d(x, state[f"{name}.conv.weight"], stride=stride, padding=padding)
    x = F.batch_norm(x, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"],
                     state[f"{name}.bn.weight"], state[f"{name}.bn.bias"], training=False,
                     eps=0.001)
    return F.relu(x)

  def chain(x, *names):
    for name in names:
      x = conv(name, x)
    return x

  def avg(x):  # the FID patch: padded zeros are not averaged
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

  x = F.interpolate(images01, size=(size, size), mode="bilinear", align_corners=False)
  x = 2 * x - 1
  x = chain(x, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3")
  x = F.max_pool2d(x, 3, stride=2)
  x = chain(x, "Conv2d_3b_1x1", "Conv2d_4a_3x3")
  x = F.max_pool2d(x, 3, stride=2)
  for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = torch.cat([conv(f"{m}.branch1x1", x), chain(x, f"{m}.branch5x5_1", f"{m}.branch5x5_2"),
                   chain(x, f"{m}.branch3x3dbl_1", f"{m}.branch3x3dbl_2", f"{m}.branch3x3dbl_3"),
                   conv(f"{m}.branch_pool", avg(x))], 1)
  m = "Mixed_6a"
  x = torch.cat([conv(f"{m}.branch3x3", x),
                 chain(x, f"{m}.branch3x3dbl_1", f"{m}.branch3x3dbl_2", f"{m}.branch3x3dbl_3"),
                 F.max_pool2d(x, 3, stride=2)], 1)
  for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = torch.cat([conv(f"{m}.branch1x1", x),
                   chain(x, *[f"{m}.branch7x7_{i}" for i in (1, 2, 3)]),
                   chain(x, *[f"{m}.branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)]),
                   conv(f"{m}.branch_pool", avg(x))], 1)
  m = "Mixed_7a"
  x = torch.cat([chain(x, f"{m}.branch3x3_1", f"{m}.branch3x3_2"),
                 chain(x, *[f"{m}.branch7x7x3_{i}" for i in (1, 2, 3, 4)]),
                 F.max_pool2d(x, 3, stride=2)], 1)
  for m, pool in (("Mixed_7b", avg),  # FIDInceptionE_1
                  ("Mixed_7c", lambda y: F.max_pool2d(y, 3, stride=1, padding=1))):  # E_2
    b3 = conv(f"{m}.branch3x3_1", x)
    b3 = torch.cat([conv(f"{m}.branch3x3_2a", b3), conv(f"{m}.branch3x3_2b", b3)], 1)
    bd = chain(x, f"{m}.branch3x3dbl_1", f"{m}.branch3x3dbl_2")
    bd = torch.cat([conv(f"{m}.branch3x3dbl_3a", bd), conv(f"{m}.branch3x3dbl_3b", bd)], 1)
    x = torch.cat([conv(f"{m}.branch1x1", x), b3, bd, conv(f"{m}.branch_pool", pool(x))], 1)
  pool3 = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
  return pool3, F.linear(pool3, state["fc.weight"], state["fc.bias"])


def test_converter_round_trips_pytorch_fid_weights_and_matches_torch(tmp_path, inception_apply):
  torch = pytest.importorskip("torch")
  state = _random_torch_state_dict(torch)
  checkpoint = str(tmp_path / inception_lib.TORCH_CHECKPOINT)
  torch.save(state, checkpoint)
  output = str(tmp_path / "inception_fid.npz")
  assert convert_weights.main(["--network", "inception_fid", "--torch-checkpoint", checkpoint,
                               "--output", output]) == 0
  arrays = pretrained.read_npz(output)
  assert len(arrays) == 472  # 94 convolutions × (kernel + 4 batch-norm arrays) + fc
  np.testing.assert_array_equal(arrays["Mixed_6b.branch7x7_2.conv.kernel"],
                                state["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(
                                    2, 3, 1, 0))
  np.testing.assert_array_equal(arrays["Mixed_7c.branch_pool.bn.var"],
                                state["Mixed_7c.branch_pool.bn.running_var"].numpy())
  np.testing.assert_array_equal(arrays["fc.kernel"], state["fc.weight"].numpy().T)

  model = inception_lib.load_inception(output, resize_to=SMALL)
  images = _images(5, batch=2, size=32)
  flax_out = jax.device_get(inception_apply(model, images))
  with torch.no_grad():
    images01 = torch.from_numpy((images.transpose(0, 3, 1, 2) + 1) / 2)
    pool3, logits = _torch_fid_inception(torch, state, images01, SMALL)
  for name, expected in (("pool3", pool3.numpy()), ("logits", logits.numpy())):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(flax_out[name], expected, rtol=1e-3, atol=1e-4 * scale,
                               err_msg=name)


def test_converter_rejects_foreign_keys():
  torch = pytest.importorskip("torch")
  state = {k: v.numpy() for k, v in _random_torch_state_dict(torch).items()}
  state["AuxLogits.fc.weight"] = np.zeros((1008, 768), np.float32)
  with pytest.raises(ValueError, match="AuxLogits"):
    convert_weights.convert_state_dicts("inception_fid", state)
  del state["AuxLogits.fc.weight"]
  del state["Mixed_5b.branch1x1.bn.running_var"]
  with pytest.raises(pretrained.WeightMismatchError, match="Mixed_5b.branch1x1.bn.var"):
    convert_weights.convert_state_dicts("inception_fid", state)


def test_resize_matches_torch_bilinear():
  torch = pytest.importorskip("torch")
  for size in (32, 400):  # up (256 → 299 in practice) and down (512 → 299)
    images = _images(6, batch=1, size=size)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(images.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
        align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(inception_lib.resize_bilinear(images, 299)),
                               expected, atol=1e-5)


# ---------------------------------------------------------------------- reference statistics

def _data_config(**overrides):
  config = dict(source="embedded", image_size=16, num_workers=1,
                embedded_eval_crops_per_photo=3, embedded_train_crops_per_photo=1)
  config.update(overrides)
  return config


def test_reference_statistics_are_cached_and_keyed(tmp_path, small_inception,
                                                  reference_passes):
  passes = reference_passes
  cache = str(tmp_path / "reference.npz")
  # 2 photos × 3 crops = 6 examples in batches of 4: the last batch is half padding.
  mu, sigma = fid_lib.reference_statistics(_data_config(), "eval", small_inception, cache, 4)
  assert len(passes) == 1 and mu.shape == (2048,) and sigma.shape == (2048, 2048)
  with np.load(cache) as archive:
    assert float(archive["count"]) == 6

  again = fid_lib.reference_statistics(_data_config(), "eval", small_inception, cache, 2)
  assert len(passes) == 1  # from the cache (batch size is not part of the key)
  np.testing.assert_array_equal(again[0], mu)

  # The same number of examples one at a time: the sums do not depend on the batching.
  direct = fid_lib.reference_statistics(_data_config(), "eval", small_inception, None, 2)
  np.testing.assert_allclose(direct[0], mu, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(direct[1], sigma, rtol=1e-4, atol=1e-6 * np.abs(sigma).max())

  # Another image size: the cached file is stale, recomputed and rewritten.
  other = fid_lib.reference_statistics(_data_config(image_size=24), "eval", small_inception,
                                       cache, 4, max_examples=5)
  assert len(passes) == 3 and not np.allclose(other[0], mu)
  mu_file, _, key = fid_lib.load_statistics(cache)
  np.testing.assert_array_equal(mu_file, other[0])
  assert '"image_size": 24' in key and '"max_examples": 5' in key
  with np.load(cache) as archive:
    assert float(archive["count"]) == 5


def test_fid_against_reference_file(tmp_path):
  # Small dimensions: scipy's sqrtm of a 2048×2048 matrix takes a minute on a busy CPU.
  rng = np.random.default_rng(8)
  features = rng.standard_normal((50, 8))
  path = str(tmp_path / "stats.npz")
  mu_ref, sigma_ref = _random_gaussian_stats(rng, 8, 300)
  fid_lib.save_statistics(path, mu_ref, sigma_ref, count=300, key="k")
  sums = {"sum": features.sum(0), "outer": features.T @ features, "count": 50.0}
  expected = fid_lib.frechet_distance(features.mean(0), np.cov(features, rowvar=False),
                                      mu_ref, sigma_ref)
  assert fid_lib.fid_against_reference(sums, path) == pytest.approx(expected, rel=1e-10)
  # pytorch-fid / ADM statistics files hold only mu and sigma.
  np.savez(str(tmp_path / "plain.npz"), mu=mu_ref, sigma=sigma_ref)
  assert fid_lib.load_statistics(str(tmp_path / "plain.npz"))[2] is None
  np.savez(str(tmp_path / "other.npz"), features=features)
  with pytest.raises(ValueError, match="not FID statistics"):
    fid_lib.load_statistics(str(tmp_path / "other.npz"))


# ---------------------------------------------------------------------- tokenizer evaluation

def _tokenizer_config(inception_weights):
  config = config_lib.base_config()
  config.data.update(image_size=16, num_workers=1, embedded_train_crops_per_photo=2,
                     embedded_eval_crops_per_photo=2)
  config.tokenizer.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                                z_channels=32, adapter_depth=1, adapter_heads=2)
  config.tokenizer.quantizer.update(num_codes=16, code_dim=8)
  config_lib.set_quantizer(config, "vq")
  config.tokenizer.loss.update(perceptual_weight=0.0, pcl_weight=0.0)
  config.weights.update(random=True, inception=inception_weights)
  config.tokenizer.eval.update(batch_size=4, num_batches=1)
  config.mesh.shape = (1, 1, 1)
  return config


def test_tokenizer_eval_without_inception_weights_logs_once(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV_VAR, str(tmp_path))
  with caplog.at_level(std_logging.INFO):
    frozen = tokenizer_stage.FrozenNetworks(_tokenizer_config(""))
  assert frozen.inception is None
  messages = [r.getMessage() for r in caplog.records if "FID Inception" in r.getMessage()]
  assert len(messages) == 1
  assert str(tmp_path / "inception_fid.npz") in messages[0]
  assert "--network inception_fid" in messages[0]
  with pytest.raises(ValueError, match="random"):
    config = _tokenizer_config("random")
    config.weights.random = False
    tokenizer_stage.FrozenNetworks(config)


class _EvalContainer(nnx.Module):
  """What `TokenizerStage.eval_step` reads of the train container (building the whole
  container, with discriminator and optimizers, would double this test's time)."""

  def __init__(self, config):
    self.model = tokenizer_stage.build_tokenizer(config, rngs=nnx.Rngs(0))
    self.ema_model = nnx.data(None)


def test_tokenizer_eval_reports_rfid_and_inception_score(monkeypatch, inception_apply):
  monkeypatch.setattr(tokenizer_stage.inception_lib, "random_inception",
                      functools.partial(inception_lib.random_inception, resize_to=SMALL))
  # The distance itself is tested above in small dimensions; sqrtm of a 2048×2048 matrix
  # takes a minute on a busy CPU, so here the statistics it is given are checked instead.
  calls = []

  def recording_distance(mu1, sigma1, mu2, sigma2):
    calls.append((mu1, sigma1, mu2, sigma2))
    return float(np.sum((mu1 - mu2) ** 2))

  monkeypatch.setattr(fid_lib, "frechet_distance", recording_distance)
  stage = tokenizer_stage.TokenizerStage(_tokenizer_config("random"))
  assert stage.frozen.inception is not None
  container = _EvalContainer(stage.config)
  model_graphdef, model_state = nnx.split(container)
  eval_step = jax.jit(lambda s, c, b: stage.eval_step(nnx.merge(model_graphdef, s), c, b))
  batch = {"image": _images(7, batch=4, size=16), "valid": np.array([True, True, True, False])}
  totals = {name: np.asarray(value, np.float64)
            for name, value in jax.device_get(eval_step(model_state, stage.constants(),
                                                        batch)).items()}
  assert totals["fid_real/outer"].shape == (2048, 2048)
  assert float(totals["fid_reconstruction/count"]) == 3
  metrics = stage.finalize_eval(totals)
  assert not any("/" in name for name in metrics)
  assert 1.0 - 1e-6 <= metrics["inception_score"] <= 3.0 + 1e-6  # at most the sample count
  assert {"psnr", "l1", "usage"} <= set(metrics)
  # rFID compares the reconstructions' statistics with those of the 3 valid real images.
  (mu1, sigma1, mu2, sigma2), = calls
  assert metrics["rfid"] == pytest.approx(float(np.sum((mu1 - mu2) ** 2)))
  real = inception_apply(stage.frozen.inception,
                         fid_lib.to_uint8_grid(jnp.asarray(batch["image"][:3])))
  real = np.asarray(real["pool3"], np.float64)
  np.testing.assert_allclose(mu1, real.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sigma1, np.cov(real, rowvar=False), rtol=1e-3,
                             atol=1e-4 * np.abs(sigma1).max())
  assert sigma2.shape == (2048, 2048) and not np.allclose(mu2, mu1)
