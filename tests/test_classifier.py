"""The Fashion-MNIST classifier of the generation metrics: its training command (on a tiny
synthetic IDX set it must learn), its weight file and the class-accuracy / FD sums."""
import functools
import gzip
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rvq_jax.metrics import classifier_metrics
from rvq_jax.models import pretrained
from rvq_jax.models.pretrained import classifier as classifier_lib
from rvq_jax.tools import train_classifier

IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# A net small enough to train in seconds on the synthetic set.
TINY = {"channels": (8, 16), "feature_dim": 16}
# One batch size for the tests of the metric sums: each program compiles once.
BATCH = 16


def _write_idx(path, array):
  """An IDX file written from its definition (magic, dims, big-endian sizes, data), gzipped."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(str(path) + ".gz", "wb") as file:
    file.write(header + array.tobytes())


def _synthetic_images(rng, labels):
  """28×28 uint8 images over faint noise: class 0 a horizontal bar, 1 a vertical bar, 2 a
  hollow square, each moved by up to 2 pixels."""
  images = rng.integers(0, 40, (len(labels), 28, 28)).astype(np.uint8)
  for image, label in zip(images, labels):
    row, col = 12 + rng.integers(-2, 3, 2)
    if label == 0:
      image[row:row + 4, 4:24] = 230
    elif label == 1:
      image[4:24, col:col + 4] = 230
    else:
      image[row - 6:row + 10, col - 6:col + 10] = 230
      image[row - 3:row + 7, col - 3:col + 7] = 20
  return images


def _write_synthetic_idx(directory, num_train=384, num_test=96, seed=0):
  rng = np.random.default_rng(seed)
  for split, count in (("train", num_train), ("eval", num_test)):
    labels = rng.integers(0, 3, count).astype(np.uint8)
    image_stem, label_stem = IDX_STEMS[split]
    _write_idx(directory / image_stem, _synthetic_images(rng, labels))
    _write_idx(directory / label_stem, labels)


def _metadata(image_size=32):
  return {"input": {"dataset": "synthetic", "source_size": 28, "image_size": image_size,
                    "pad_to": image_size, "channels": 3, "color": "gray replicated to RGB",
                    "value_range": [-1, 1]},
          "test_accuracy": 0.5}


def _saved_random_classifier(path, seed=0, **kwargs):
  model = classifier_lib.random_classifier(seed, **kwargs)
  dim = model.feature_dim
  classifier_lib.save_classifier(model, path, _metadata(model.image_size),
                                 reference=(np.zeros(dim), np.eye(dim), 10.0))
  return model


def _images(seed, count=BATCH, size=32):
  return jax.random.uniform(jax.random.key(seed), (count, size, size, 3), minval=-1.0,
                            maxval=1.0)


def _jit_sums(model):
  """`classifier_batch_sums` of `model`, compiled (one program instead of op by op)."""
  return jax.jit(lambda images, labels, valid: classifier_metrics.classifier_batch_sums(
      model, images, labels, valid))


# ---------------------------------------------------------------------- training command

def test_training_command_learns_a_tiny_synthetic_idx_set(tmp_path):
  _write_synthetic_idx(tmp_path)
  output = str(tmp_path / "weights" / "classifier.npz")
  lines = []
  settings = train_classifier.Settings(steps=45, batch_size=32, learning_rate=3e-3,
                                       warmup_steps=5, eval_batch_size=48, log_every=15,
                                       **TINY)
  report = train_classifier.train_classifier(
      str(tmp_path), output, settings, log=lambda message, *args: lines.append(message % args))

  assert report["test_examples"] == 96
  assert report["test_accuracy"] >= 0.95, report
  # The command reports progress and the test accuracy...
  progress = [line for line in lines if line.startswith("step ")]
  assert len(progress) == 3 and all("it/s" in line and "ETA" in line and "accuracy=" in line
                                    for line in progress)
  assert any(f"test accuracy {report['test_accuracy']:.4f}" in line for line in lines)
  # ... and writes it into the JSON next to the weights and into the file's metadata.
  with open(str(tmp_path / "weights" / "classifier.json")) as file:
    assert json.load(file)["test_accuracy"] == report["test_accuracy"]
  metadata = classifier_lib.read_metadata(output)
  assert metadata["test_accuracy"] == report["test_accuracy"]
  assert metadata["input"]["image_size"] == 32 and metadata["input"]["source_size"] == 28
  assert metadata["architecture"] == {"image_size": 32, "channels": [8, 16],
                                      "feature_dim": 16, "num_classes": 10}

  # The loaded network scores the same test images as the command measured.
  model = classifier_lib.load_classifier(output)
  images, labels, _ = train_classifier.load_split(str(tmp_path), "eval", 32)
  sums = _jit_sums(model)(images.astype(np.float32) / 127.5 - 1.0, labels,
                          np.ones(len(labels), bool))
  metrics = classifier_metrics.classifier_metrics_from_sums(
      sums, classifier_lib.load_reference(output))
  assert metrics["class_accuracy"] == pytest.approx(report["test_accuracy"])
  # The test split's own features against the stored test reference: FD ≈ 0.
  assert metrics["fd_classifier"] == pytest.approx(0.0, abs=1e-3)


def test_shifts_beyond_the_black_border_are_refused(tmp_path):
  _write_synthetic_idx(tmp_path, num_train=8, num_test=4)
  settings = train_classifier.Settings(steps=1, max_shift=3, **TINY)
  with pytest.raises(ValueError, match="2-pixel border"):
    train_classifier.train_classifier(str(tmp_path), str(tmp_path / "c.npz"), settings,
                                      log=lambda *args: None)


def test_augment_translates_within_the_border():
  image = np.zeros((1, 32, 32, 1), np.float32)
  image[0, 2:30, 2:30] = 1.0
  augment = jax.jit(functools.partial(train_classifier.augment, max_shift=2, flip=False))
  shifted = augment(jax.random.key(3), jnp.asarray(np.repeat(image, 16, 0)))
  # Every shifted image keeps all 28 × 28 garment pixels.
  np.testing.assert_array_equal(np.asarray(shifted).sum(axis=(1, 2, 3)), 28 * 28)


# ---------------------------------------------------------------------- weight file

def test_save_then_load_gives_identical_logits(tmp_path):
  path = tmp_path / "classifier.npz"
  model = _saved_random_classifier(path, seed=1, **TINY)
  loaded = classifier_lib.load_classifier(path)
  images = _images(0)
  expected, actual = jax.jit(model)(images), jax.jit(loaded)(images)
  for name in ("logits", "features"):
    np.testing.assert_array_equal(np.asarray(actual[name]), np.asarray(expected[name]))
  assert actual["logits"].shape == (BATCH, 10) and actual["features"].shape == (BATCH, 16)
  # Outside training the batch norms use running statistics: rows are scored alone.
  np.testing.assert_allclose(np.asarray(jax.jit(loaded)(images[:1])["logits"]),
                             np.asarray(actual["logits"][:1]), rtol=1e-5, atol=1e-5)
  assert "synthetic" in loaded.trained_on and "50.00%" in loaded.trained_on
  mu, sigma, count = classifier_lib.load_reference(path)
  assert mu.shape == (16,) and sigma.shape == (16, 16) and count == 10


def test_strict_loader_rejects_a_wrong_shape_and_foreign_files(tmp_path):
  path = tmp_path / "classifier.npz"
  _saved_random_classifier(path, **TINY)
  arrays = pretrained.read_npz(path)
  arrays["head.kernel"] = np.zeros((16, 7), np.float32)
  bad = tmp_path / "bad.npz"
  pretrained.write_npz(bad, arrays)
  with pytest.raises(pretrained.WeightMismatchError, match=r"head\.kernel: file has \(16, 7\)"):
    classifier_lib.load_classifier(bad)

  del arrays["metadata"]
  pretrained.write_npz(bad, arrays)
  with pytest.raises(ValueError, match="not a classifier file"):
    classifier_lib.load_classifier(bad)

  missing = tmp_path / "missing.npz"
  with pytest.raises(FileNotFoundError, match="python -m rvq_jax.tools.train_classifier"):
    classifier_lib.load_classifier(missing)


def test_wrong_input_shapes_give_a_clear_error():
  model = classifier_lib.random_classifier(0, **TINY)
  for shape in ((2, 28, 28, 3), (2, 32, 32, 1), (32, 32, 3)):
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\] in \[-1, 1\]"):
      model(jnp.zeros(shape))


# ---------------------------------------------------------------------- metric sums

def test_class_accuracy_sums_equal_a_brute_force_count():
  model = classifier_lib.random_classifier(2, **TINY)
  batch_sums = _jit_sums(model)
  images = [_images(1), _images(2)]
  predicted = [np.asarray(jax.jit(model)(x)["logits"]).argmax(axis=-1) for x in images]
  # Every other label agrees with the prediction; the last 5 rows of batch 2 are padding.
  labels = [np.where(np.arange(BATCH) % 2 == 0, p, (p + 1) % 10) for p in predicted]
  valid = [np.ones(BATCH, bool), np.arange(BATCH) < BATCH - 5]
  totals = {}
  for batch in zip(images, labels, valid):
    for name, value in batch_sums(*batch).items():
      totals[name] = totals.get(name, 0.0) + np.asarray(value, np.float64)
  assert set(totals) == set(classifier_metrics.SUM_KEYS)
  assert totals["classifier_count"] == 2 * BATCH - 5
  brute_force = sum(np.sum((p == y) & v) for p, y, v in zip(predicted, labels, valid))
  assert totals["classifier_correct"] == brute_force == BATCH - 2
  metrics = classifier_metrics.classifier_metrics_from_sums(totals, reference=None)
  assert metrics == {"class_accuracy": pytest.approx(brute_force / (2 * BATCH - 5))}

  unconditional = jax.eval_shape(lambda x, v: classifier_metrics.classifier_batch_sums(
      model, x, None, v), images[0], valid[0])
  assert "classifier_correct" not in unconditional


def test_classifier_fd_of_identical_sets_is_zero_and_of_different_sets_positive():
  model = classifier_lib.random_classifier(3, **TINY)
  batch_sums = _jit_sums(model)
  labels, valid = np.zeros(BATCH, np.int32), np.ones(BATCH, bool)
  totals = jax.device_get(batch_sums(_images(4), labels, valid))
  reference = classifier_metrics.feature_statistics(totals)
  same = classifier_metrics.classifier_metrics_from_sums(totals, reference)
  assert same["fd_classifier"] == pytest.approx(0.0, abs=1e-6)
  other = jax.device_get(batch_sums(0.5 * _images(5) - 0.5, labels, valid))
  assert classifier_metrics.classifier_metrics_from_sums(other, reference)["fd_classifier"] > 0


# ---------------------------------------------------------------------- from the config

def _fashion_config(classifier="", random=False):
  from configs import fashion_mnist
  config = fashion_mnist.get_config()
  config.weights.classifier = classifier
  config.weights.random = random
  return config


def test_load_eval_classifier_from_the_config(tmp_path, monkeypatch):
  monkeypatch.delenv(pretrained.WEIGHTS_DIR_ENV_VAR, raising=False)
  assert classifier_metrics.load_eval_classifier(_fashion_config()) is None
  # A configured file that is missing: no classifier metrics either (with a warning).
  assert classifier_metrics.load_eval_classifier(
      _fashion_config(str(tmp_path / "none.npz"))) is None

  with pytest.raises(ValueError, match="weights.random"):
    classifier_metrics.load_eval_classifier(_fashion_config("random"))
  random = classifier_metrics.load_eval_classifier(_fashion_config("random", random=True))
  assert random.path == "random" and random.reference[1].shape == (128, 128)

  path = tmp_path / classifier_lib.NETWORK_NAME
  path = str(path) + ".npz"
  _saved_random_classifier(path, **TINY)
  monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV_VAR, str(tmp_path))
  found = classifier_metrics.load_eval_classifier(_fashion_config())
  assert found.path == path and found.test_accuracy == 0.5
  assert found.reference[0].shape == (16,)

  config = _fashion_config()
  config.data.image_size = 64
  config.data.idx_pad_to = 64
  # The default file does not fit 64² images: quietly none; named explicitly: an error.
  assert classifier_metrics.load_eval_classifier(config) is None
  config.weights.classifier = path
  with pytest.raises(ValueError, match="data.image_size=64"):
    classifier_metrics.load_eval_classifier(config)
