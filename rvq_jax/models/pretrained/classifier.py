"""A small Fashion-MNIST convnet: the classifier of the priors' generation metrics.

Class-conditional priors are judged by what a classifier makes of their samples: the
fraction it assigns to the class they were conditioned on (class accuracy) and the
Fréchet distance of its penultimate features to those of real held-out images (see
`rvq_jax.metrics.classifier_metrics`). No such network can be downloaded here, so the
project trains one: `python -m rvq_jax.tools.train_classifier` writes the weight file.

Input: exactly the project's Fashion-MNIST images, [B, 32, 32, 3] RGB in [-1, 1] — the
28×28 originals centred on a black 32×32 canvas and replicated to RGB, as
`configs/fashion_mnist.py` feeds the tokenizer — so generated samples are scored as they
come out of the decoder. The network reads the mean of the three channels: for real
images that is the gray image itself, and a generated sample whose channels drift
slightly apart is scored on its luminance instead of through a first layer that never
saw R ≠ G ≠ B.

Layers: `len(channels)` blocks of [3×3 convolution, batch norm, ReLU, 2×2 max pool]
(32 → 16 → 8 → 4 for the default three blocks of 32, 64, 128 channels), the flattened map
→ `features` (dense, ReLU: the penultimate features, 128 by default) → `head` (dense: the
logits). The batch norms make two epochs on a CPU enough; outside training they use their
running statistics, so every sample is scored on its own. Weight keys (see
`rvq_jax.models.pretrained.weights`): `convs.{i}.kernel` [3, 3, in, out], `norms.{i}.scale`,
`norms.{i}.bias`, `norms.{i}.mean`, `norms.{i}.var` [out], `features.kernel` [S²·C, F],
`features.bias`, `head.kernel` [F, K], `head.bias`.

The weight file (`fashion_mnist_classifier.npz`) holds, besides the weights:
  metadata          a JSON string: the architecture, the input the network was trained
                    on (size, padding, channels, range), the class names, how it was
                    trained and its test accuracy (`read_metadata`);
  reference.mu      [F] float64 } the penultimate features' mean, covariance and count
  reference.sigma   [F, F]      } on the held-out test split (t10k): the real side of the
  reference.count   []          } classifier FD (`load_reference`).
Keeping the reference statistics in the weight file means they can never be stale for
the weights they were computed with. `pretrained.load_params` rejects the file (extra
keys): load it with `load_classifier`, which checks the weights just as strictly.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rvq_jax import files
from rvq_jax.models import pretrained

NETWORK_NAME = "fashion_mnist_classifier"
# Bumped when the file layout or the network's computation changes: old files are refused.
FORMAT_VERSION = 1
METADATA_KEY = "metadata"
REFERENCE_PREFIX = "reference."
REFERENCE_KEYS = tuple(REFERENCE_PREFIX + name for name in ("mu", "sigma", "count"))

IMAGE_SIZE = 32
CHANNELS = (32, 64, 128)
FEATURE_DIM = 128
NUM_CLASSES = 10

_UNTRAINED = "random, untrained"


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max pool of stride 2 on [B, H, W, C] with even H and W → [B, H/2, W/2, C].

  The values of `rvq_jax.models.pretrained.vgg.max_pool_2x2`, as a reshape and a max:
  its gradient is a plain comparison, where the gradient of `reduce_window`
  (select-and-scatter) makes a training step on CPU about twice as slow.
  """
  batch, height, width, channels = x.shape
  return x.reshape(batch, height // 2, 2, width // 2, 2, channels).max(axis=(2, 4))


# He-normal over the fan-in, for the ReLUs that follow.
_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class Conv3x3(nnx.Module):
  """3×3 convolution, stride 1, zero padding 1, no bias (the batch norm after it has one).

  kernel: [3, 3, in, out] (HWIO), a frozen pretrained weight; real values come from the
  weight file or from `rvq_jax.tools.train_classifier`.
  """

  def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
    self.kernel = pretrained.PretrainedWeight(
        _INIT(rngs.params(), (3, 3, in_channels, out_channels), jnp.float32))

  def __call__(self, x: jax.Array, *, precision=None) -> jax.Array:
    """[B, H, W, in] → [B, H, W, out]."""
    return jax.lax.conv_general_dilated(
        x, self.kernel[...], window_strides=(1, 1), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


class BatchNorm(nnx.Module):
  """Batch normalization over the last axis, with frozen weights and running statistics.

  scale, bias: [C] `PretrainedWeight`s; mean, var: [C] `nnx.BatchStat`s, the running
  statistics (exponential averages with `momentum`). Outside training, which is every use
  but `rvq_jax.tools.train_classifier`'s, the running statistics normalize, so a sample's
  outputs never depend on the other samples of its batch.
  """

  def __init__(self, channels: int, *, momentum: float = 0.9, eps: float = 1e-5):
    self.scale = pretrained.PretrainedWeight(jnp.ones((channels,), jnp.float32))
    self.bias = pretrained.PretrainedWeight(jnp.zeros((channels,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((channels,), jnp.float32))
    self.momentum = momentum
    self.eps = eps

  def __call__(self, x: jax.Array, *, training: bool = False) -> jax.Array:
    """[..., C] → [..., C]; `training` normalizes with the batch's statistics and updates
    the running ones."""
    if training:
      axes = tuple(range(x.ndim - 1))
      mean, var = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
      m = self.momentum
      self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
      self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(var)
    else:
      mean, var = self.mean[...], self.var[...]
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class Dense(nnx.Module):
  """y = x @ kernel + bias; kernel [in, out], bias [out]; frozen pretrained weights."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.kernel = pretrained.PretrainedWeight(
        _INIT(rngs.params(), (in_features, out_features), jnp.float32))
    self.bias = pretrained.PretrainedWeight(jnp.zeros((out_features,), jnp.float32))

  def __call__(self, x: jax.Array, *, precision=None) -> jax.Array:
    """[B, in] → [B, out]."""
    return jnp.dot(x, self.kernel[...], precision=precision) + self.bias[...]


class ConvClassifier(nnx.Module):
  """The Fashion-MNIST classifier (see the module docstring for the layers).

  Its weights are `pretrained.PretrainedWeight`s (and the batch norms' running statistics
  `nnx.BatchStat`s), so inside a model that trains they are never selected as parameters;
  `rvq_jax.tools.train_classifier`, the one place that trains them, differentiates the
  split weights explicitly.
  """

  # The name of this network's weight file (see `pretrained.resolve_weights_path`).
  pretrained_network = NETWORK_NAME

  def __init__(self, *, image_size: int = IMAGE_SIZE, channels: Sequence[int] = CHANNELS,
               feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
               trained_on: str = _UNTRAINED, rngs: nnx.Rngs):
    """Builds the network with random weights (load real ones with `load_classifier`).

    Args:
      image_size: side of the square input; divisible by 2^len(channels).
      channels: output channels of the conv blocks.
      feature_dim: width of the penultimate (feature) layer.
      num_classes: number of logits.
      precision: of the convolutions and dense layers. HIGHEST by default: a metric
        network must give the same numbers on TPU (bf16 passes) and GPU (TF32) as on CPU.
      trained_on: where the weights come from, for error messages (set by
        `load_classifier` from the file's metadata, see `describe_training`).
      rngs: for the random initialization.
    """
    channels = tuple(int(c) for c in channels)
    if not channels or image_size % 2 ** len(channels):
      raise ValueError(f"image_size={image_size} must be divisible by 2^{len(channels)} "
                       f"(one 2×2 pool per block of channels={channels}).")
    self.image_size = int(image_size)
    self.channels = channels
    self.feature_dim = int(feature_dim)
    self.num_classes = int(num_classes)
    self.precision = precision
    self.trained_on = trained_on
    convs, norms, in_channels = [], [], 1  # The channel mean (see the module docstring).
    for out_channels in channels:
      convs.append(Conv3x3(in_channels, out_channels, rngs=rngs))
      norms.append(BatchNorm(out_channels))
      in_channels = out_channels
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    side = image_size // 2 ** len(channels)
    self.features = Dense(side * side * channels[-1], feature_dim, rngs=rngs)
    self.head = Dense(feature_dim, num_classes, rngs=rngs)

  def architecture(self) -> dict[str, Any]:
    """The constructor arguments that fix the weights' shapes (stored in the file)."""
    return {"image_size": self.image_size, "channels": list(self.channels),
            "feature_dim": self.feature_dim, "num_classes": self.num_classes}

  def __call__(self, images: jax.Array, *, training: bool = False) -> dict[str, jax.Array]:
    """Logits and penultimate features of `images`.

    Args:
      images: [B, S, S, 3] RGB in [-1, 1], S = `image_size` (32: Fashion-MNIST centred
        on a 32×32 canvas, gray replicated to RGB).
      training: batch statistics in the batch norms, and updates of their running
        statistics (only the training command sets it).

    Returns:
      {'logits': [B, num_classes], 'features': [B, feature_dim] (after the ReLU)}, float32.

    Raises:
      ValueError: images of another shape (the message says what the network expects).
    """
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f"The classifier takes images [B, {self.image_size}, {self.image_size}, 3] in "
          f"[-1, 1], got shape {tuple(images.shape)} (its weights: {self.trained_on}); "
          "score images prepared the same way (for Fashion-MNIST: data.image_size=32, "
          "data.idx_pad_to=32).")
    x = jnp.mean(images.astype(jnp.float32), axis=-1, keepdims=True)
    for conv, norm in zip(self.convs, self.norms):
      x = norm(conv(x, precision=self.precision), training=training)
      x = max_pool_2x2(jax.nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    features = jax.nn.relu(self.features(x, precision=self.precision))
    return {"logits": self.head(features, precision=self.precision), "features": features}


def describe_training(metadata: Mapping[str, Any]) -> str:
  """One line on what a weight file's network was trained on, from its metadata."""
  data = metadata.get("input", {})
  accuracy = metadata.get("test_accuracy")
  shown = f"{100 * accuracy:.2f}%" if accuracy is not None else "not measured"
  return (f"trained on {data.get('dataset', '?')} ({data.get('source_size', '?')}² images "
          f"centred on a {data.get('image_size', '?')}² canvas, {data.get('color', '?')}, in "
          f"{data.get('value_range', '?')}; test accuracy {shown})")


# ---------------------------------------------------------------------- files

def save_classifier(model: ConvClassifier, path: str | os.PathLike,
                    metadata: Mapping[str, Any], *,
                    reference: tuple[np.ndarray, np.ndarray, float] | None = None) -> None:
  """Writes the weights, the metadata and the reference statistics to one `.npz`.

  Args:
    model: the network.
    path: the `.npz` file (written atomically).
    metadata: JSON-serializable facts about the weights; the architecture, the format
      version and the network name are added.
    reference: (mu [F], sigma [F, F], count) of the features of real held-out images.
  """
  arrays = pretrained.module_arrays(model)
  metadata = dict(metadata, network=NETWORK_NAME, format_version=FORMAT_VERSION,
                  architecture=model.architecture())
  arrays[METADATA_KEY] = np.asarray(json.dumps(metadata, sort_keys=True))
  if reference is not None:
    mu, sigma, count = reference
    for key, value in zip(REFERENCE_KEYS, (mu, sigma, count)):
      arrays[key] = np.asarray(value, np.float64)
  pretrained.write_npz(path, arrays)


def _read_file(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(all arrays, the parsed metadata) of a classifier file, checked for its format."""
  if not files.is_file(path):
    raise FileNotFoundError(
        f"Classifier weight file {path} does not exist. Make it (a few minutes on a CPU) "
        f"with:\n  {pretrained.converter_command(NETWORK_NAME, path)}")
  arrays = pretrained.read_npz(path)
  if METADATA_KEY not in arrays:
    raise ValueError(f"{path} has no {METADATA_KEY!r} entry: it is not a classifier file "
                     "of rvq_jax.tools.train_classifier.")
  metadata = json.loads(str(arrays.pop(METADATA_KEY)))
  if metadata.get("network") != NETWORK_NAME:
    raise ValueError(f"{path} holds the network {metadata.get('network')!r}, not "
                     f"{NETWORK_NAME!r}.")
  if metadata.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{path} has format version {metadata.get('format_version')}, this code "
                     f"reads version {FORMAT_VERSION}: retrain it with:\n  "
                     f"{pretrained.converter_command(NETWORK_NAME, path)}")
  return arrays, metadata


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of a classifier weight file (architecture, input, test accuracy, ...)."""
  return _read_file(os.fspath(path))[1]


def load_classifier(path: str | os.PathLike | None = None, *,
                    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST
                    ) -> ConvClassifier:
  """The trained classifier from its weight file, strictly loaded.

  Args:
    path: the `.npz` file; defaults to `$RVQ_JAX_WEIGHTS_DIR/fashion_mnist_classifier.npz`.
    precision: of the network's matrix products (see `ConvClassifier`).

  Raises:
    FileNotFoundError: no such file (the message has the command that trains it).
    ValueError: not a classifier file, or one of another format version.
    pretrained.WeightMismatchError: the weights' keys or shapes do not fit the
      architecture the file's metadata names.
  """
  path = pretrained.resolve_weights_path(NETWORK_NAME, path)
  arrays, metadata = _read_file(path)
  for key in REFERENCE_KEYS:
    arrays.pop(key, None)
  architecture = metadata.get("architecture", {})
  # An abstract module: no random init that the file would overwrite anyway.
  model = nnx.eval_shape(lambda: ConvClassifier(
      **architecture, precision=precision, trained_on=describe_training(metadata),
      rngs=nnx.Rngs(0)))
  return pretrained.load_arrays(model, arrays, source=path)


def load_reference(path: str | os.PathLike | None = None
                   ) -> tuple[np.ndarray, np.ndarray, float]:
  """(mu [F], sigma [F, F], count) of the real held-out features in a classifier file.

  Raises:
    ValueError: the file has no reference statistics, or they do not fit the features.
  """
  path = pretrained.resolve_weights_path(NETWORK_NAME, path)
  arrays, metadata = _read_file(path)
  missing = [key for key in REFERENCE_KEYS if key not in arrays]
  if missing:
    raise ValueError(f"{path} has no reference statistics ({', '.join(missing)} missing); "
                     "rvq_jax.tools.train_classifier writes them.")
  mu, sigma, count = (np.asarray(arrays[key], np.float64) for key in REFERENCE_KEYS)
  dim = metadata["architecture"]["feature_dim"]
  if mu.shape != (dim,) or sigma.shape != (dim, dim):
    raise ValueError(f"{path}: reference mu {mu.shape} and sigma {sigma.shape} do not fit "
                     f"the {dim} features.")
  return mu, sigma, float(count)


def random_classifier(seed: int = 0, **kwargs) -> ConvClassifier:
  """A `ConvClassifier` with random weights (tests; its metrics mean nothing)."""
  return ConvClassifier(rngs=nnx.Rngs(seed), **kwargs)


def num_weights(model: ConvClassifier) -> int:
  """How many numbers the weights hold."""
  return sum(math.prod(shape) for shape, _ in pretrained.param_shapes(model).values())
