"""Inception-v3 of FID (the TF 2015-12-05 graph as ported by pytorch-fid), NHWC, frozen.

This is the network every published FID number is computed with: the TensorFlow
Inception graph `inception-2015-12-05` that the original FID code (TTUR) loads, in the
form pytorch-fid ships it (`pt_inception-2015-12-05-6726825d.pth`). It is torchvision's
Inception-v3 layout with pytorch-fid's changes:

  * Mixed_5b/5c/5d (`FIDInceptionA`), Mixed_6b..6e (`FIDInceptionC`) and Mixed_7b
    (`FIDInceptionE_1`) average-pool their pool branch over the valid pixels only
    (PyTorch's `count_include_pad=False`, as TensorFlow's SAME average pool does);
  * Mixed_7c (`FIDInceptionE_2`) max-pools its pool branch instead (the TF graph does);
  * the classifier has 1008 classes (not 1000) and there is no auxiliary head.

Every convolution is `BasicConv`: convolution without bias, batch norm (eps 1e-3, using
the stored running statistics: the network is always in inference mode), ReLU.

Input pipeline, as pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`:
images are resized to 299×299 with bilinear interpolation (half-pixel centres, no
antialiasing: `F.interpolate(..., mode='bilinear', align_corners=False)`) and scaled to
[-1, 1]. Images here already are in [-1, 1], and the resize is linear, so resizing them
directly equals pytorch-fid's resize of the [0, 1] image followed by `2x − 1`.

Outputs:
  pool3:           [B, 2048] the global average pool after Mixed_7c: the FID features.
  logits:          [B, 1008] `fc(pool3)` with its bias.
  logits_unbiased: [B, 1008] `pool3 @ fc.kernel` without the bias: what the original
                   Inception Score code (improved-GAN, `softmax/logits/MatMul`) and
                   torch-fidelity use, so IS is computed from these.

Key scheme (see `rvq_jax.models.pretrained.weights`): the torch state-dict key with
`conv.weight` → `conv.kernel` (OIHW → HWIO), `bn.weight` → `bn.scale`, `bn.bias`,
`bn.running_mean` → `bn.mean`, `bn.running_var` → `bn.var`, `fc.weight` → `fc.kernel`
(transposed to [2048, 1008]), `fc.bias`; e.g. `Mixed_6b.branch7x7_2.conv.kernel`
[1, 7, 128, 128]. The weight file is made once by
`python -m rvq_jax.tools.convert_weights --network inception_fid ...`.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rvq_jax.models import pretrained

NETWORK_NAME = "inception_fid"
# pytorch-fid's weight file (a release asset of mseitzer/pytorch-fid, `fid_weights`).
TORCH_CHECKPOINT = "pt_inception-2015-12-05-6726825d.pth"

INPUT_SIZE = 299
# Smallest input the layers accept (Mixed_7a must still see a 3×3 map).
MIN_INPUT_SIZE = 75
NUM_CLASSES = 1008
FEATURE_DIM = 2048
BATCH_NORM_EPS = 1e-3


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """[B, H, W, C] → [B, size, size, C], PyTorch's bilinear with align_corners=False.

  Without antialiasing, as `F.interpolate` (which pytorch-fid calls) does by default, so
  a downsized image matches pytorch-fid's too, not only an upsized one.
  """
  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(
      images, (images.shape[0], size, size, images.shape[3]), method="linear",
      antialias=False)


def max_pool(x: jax.Array, *, stride: int, padding: int = 0) -> jax.Array:
  """3×3 max pool on [B, H, W, C]; padded positions never win (PyTorch's padding)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pad)


def avg_pool_valid_only(x: jax.Array) -> jax.Array:
  """3×3 average pool, stride 1, padding 1, averaging only pixels inside the image.

  PyTorch's `avg_pool2d(..., count_include_pad=False)`, TF's SAME average pool: border
  outputs divide by 4 or 6, not 9.
  """
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  pad = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
  return total / count


class Conv(nnx.Module):
  """Convolution without bias; kernel [kh, kw, in, out] (HWIO), frozen."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int], *,
               rngs: nnx.Rngs):
    # Random weights are for tests only; He-normal keeps activations finite through the
    # ~95 layers. Real values come from the converted checkpoint.
    init = jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")
    self.kernel = pretrained.PretrainedWeight(
        init(rngs.params(), kernel_size + (in_channels, out_channels), jnp.float32))


class BatchNorm(nnx.Module):
  """Inference-mode batch norm: scale · (x − mean) / sqrt(var + 1e-3) + bias; all [C]."""

  def __init__(self, channels: int):
    self.scale = pretrained.PretrainedWeight(jnp.ones((channels,), jnp.float32))
    self.bias = pretrained.PretrainedWeight(jnp.zeros((channels,), jnp.float32))
    self.mean = pretrained.PretrainedWeight(jnp.zeros((channels,), jnp.float32))
    self.var = pretrained.PretrainedWeight(jnp.ones((channels,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    multiplier = self.scale[...] * jax.lax.rsqrt(self.var[...] + BATCH_NORM_EPS)
    return x * multiplier + (self.bias[...] - self.mean[...] * multiplier)


class BasicConv(nnx.Module):
  """torchvision's `BasicConv2d`: conv (no bias) → batch norm → ReLU, on NHWC."""

  def __init__(self, in_channels: int, out_channels: int,
               kernel_size: int | Sequence[int], *, stride: int = 1,
               padding: int | Sequence[int] = 0, rngs: nnx.Rngs):
    self.conv = Conv(in_channels, out_channels, _pair(kernel_size), rngs=rngs)
    self.bn = BatchNorm(out_channels)
    self.stride = stride
    self.padding = _pair(padding)

  def __call__(self, x: jax.Array, precision: jax.lax.PrecisionLike = None) -> jax.Array:
    """[B, H, W, in] → [B, H', W', out] (H' = (H + 2·pad − k) // stride + 1)."""
    pad_h, pad_w = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.conv.kernel[...], window_strides=(self.stride, self.stride),
        padding=((pad_h, pad_h), (pad_w, pad_w)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
    return jax.nn.relu(self.bn(y))


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d (pytorch-fid's `FIDInceptionA`): 64 + 64 + 96 + pool_features out."""

  def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv(in_channels, pool_features, 1, rngs=rngs)

  def __call__(self, x, precision=None):
    p = precision
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x, p), p)
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
    branch_pool = self.branch_pool(avg_pool_valid_only(x), p)
    return jnp.concatenate([self.branch1x1(x, p), branch5x5, branch3x3dbl, branch_pool], -1)


class InceptionB(nnx.Module):
  """Mixed_6a (torchvision's `InceptionB`): halves the size; 384 + 96 + in out."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x, precision=None):
    p = precision
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p), p)
    return jnp.concatenate([self.branch3x3(x, p), branch3x3dbl, max_pool(x, stride=2)], -1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e (pytorch-fid's `FIDInceptionC`): factorized 7×7; 768 out."""

  def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x, precision=None):
    p = precision
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x, p), p), p)
    branch7x7dbl = self.branch7x7dbl_1(x, p)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      branch7x7dbl = layer(branch7x7dbl, p)
    branch_pool = self.branch_pool(avg_pool_valid_only(x), p)
    return jnp.concatenate([self.branch1x1(x, p), branch7x7, branch7x7dbl, branch_pool], -1)


class InceptionD(nnx.Module):
  """Mixed_7a (torchvision's `InceptionD`): halves the size; 320 + 192 + in out."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x, precision=None):
    p = precision
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x, p), p)
    branch7x7x3 = self.branch7x7x3_1(x, p)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      branch7x7x3 = layer(branch7x7x3, p)
    return jnp.concatenate([branch3x3, branch7x7x3, max_pool(x, stride=2)], -1)


class InceptionE(nnx.Module):
  """Mixed_7b (`FIDInceptionE_1`, valid-only average pool) and Mixed_7c
  (`FIDInceptionE_2`, max pool): 320 + 768 + 768 + 192 = 2048 out."""

  def __init__(self, in_channels: int, *, pool: str, rngs: nnx.Rngs):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}.")
    self.pool = pool
    self.branch1x1 = BasicConv(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x, precision=None):
    p = precision
    branch3x3 = self.branch3x3_1(x, p)
    branch3x3 = jnp.concatenate(
        [self.branch3x3_2a(branch3x3, p), self.branch3x3_2b(branch3x3, p)], -1)
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x, p), p)
    branch3x3dbl = jnp.concatenate(
        [self.branch3x3dbl_3a(branch3x3dbl, p), self.branch3x3dbl_3b(branch3x3dbl, p)], -1)
    pooled = max_pool(x, stride=1, padding=1) if self.pool == "max" else avg_pool_valid_only(x)
    branch_pool = self.branch_pool(pooled, p)
    return jnp.concatenate([self.branch1x1(x, p), branch3x3, branch3x3dbl, branch_pool], -1)


class Linear(nnx.Module):
  """fc: kernel [2048, 1008] (the transpose of torch's weight), bias [1008]; frozen."""

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.lecun_normal()
    self.kernel = pretrained.PretrainedWeight(
        init(rngs.params(), (in_features, out_features), jnp.float32))
    self.bias = pretrained.PretrainedWeight(jnp.zeros((out_features,), jnp.float32))


class InceptionV3(nnx.Module):
  """pytorch-fid's FID Inception-v3 (`fid_inception_v3()`), NHWC, inference only.

  Attributes are named as the torch modules (`Conv2d_1a_3x3`, `Mixed_5b`, ..., `fc`), so
  the weight keys are the torch state-dict keys (see the module docstring).
  """

  # The converter's name for this network's weight file (see `pretrained`).
  pretrained_network = NETWORK_NAME

  def __init__(self, *, resize_to: int | None = INPUT_SIZE,
               precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
               rngs: nnx.Rngs):
    """Builds the network with random weights (load real ones with `load_inception`).

    Args:
      resize_to: side the input is resized to first: 299 for FID (the published
        numbers); tests pass a small size (>= 75) to run fast; None = no resize.
      precision: of the convolutions and fc. HIGHEST by default: on TPU (bf16 passes)
        and GPU (TF32) the default precision would shift FID noticeably.
      rngs: for the random initialization (tests only).
    """
    if resize_to is not None and resize_to < MIN_INPUT_SIZE:
      raise ValueError(f"resize_to must be >= {MIN_INPUT_SIZE}, got {resize_to}.")
    self.resize_to = resize_to
    self.precision = precision
    self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
    self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)
    self.fc = Linear(FEATURE_DIM, NUM_CLASSES, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """FID features and class logits of `images`.

    Args:
      images: [B, H, W, 3] RGB in [-1, 1] (clip and quantize first if they may not be
        real images; see `rvq_jax.metrics.fid.to_uint8_grid`).

    Returns:
      {'pool3': [B, 2048], 'logits': [B, 1008], 'logits_unbiased': [B, 1008]}, float32.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images.shape)}.")
    x = images.astype(jnp.float32)
    if self.resize_to is not None:
      x = resize_bilinear(x, self.resize_to)
    if min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"Inception needs inputs of at least {MIN_INPUT_SIZE}×"
                       f"{MIN_INPUT_SIZE} pixels, got {x.shape[1]}×{x.shape[2]}.")
    p = self.precision
    x = self.Conv2d_1a_3x3(x, p)
    x = self.Conv2d_2a_3x3(x, p)
    x = self.Conv2d_2b_3x3(x, p)
    x = max_pool(x, stride=2)
    x = self.Conv2d_3b_1x1(x, p)
    x = self.Conv2d_4a_3x3(x, p)
    x = max_pool(x, stride=2)
    for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                  self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                  self.Mixed_7c):
      x = block(x, p)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits_unbiased = jnp.dot(pool3, self.fc.kernel[...], precision=p)
    return {"pool3": pool3, "logits": logits_unbiased + self.fc.bias[...],
            "logits_unbiased": logits_unbiased}


def load_inception(path: str | None = None, **kwargs) -> InceptionV3:
  """The FID Inception-v3 with pytorch-fid's weights, strictly loaded.

  Args:
    path: the `.npz` file; defaults to `$RVQ_JAX_WEIGHTS_DIR/inception_fid.npz`.
    **kwargs: constructor arguments of `InceptionV3` (except `rngs`).

  Raises:
    FileNotFoundError: no such file (the message has the converter command).
    pretrained.WeightMismatchError: the file's keys or shapes do not match.
  """
  path = pretrained.resolve_weights_path(NETWORK_NAME, path)
  # An abstract module: no random init that the file would overwrite anyway.
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), **kwargs))
  return pretrained.load_params(model, path)


def random_inception(seed: int = 0, **kwargs) -> InceptionV3:
  """An `InceptionV3` with random weights, for tests and smoke runs (its FID means nothing).

  Filled from NumPy — He-normal kernels, batch-norm parameters and statistics scattered
  around the identity — which on CPU is far faster than ~500 separate initializers.

  Args:
    seed: of the NumPy generator.
    **kwargs: constructor arguments of `InceptionV3` (except `rngs`).
  """
  model = nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), **kwargs))
  rng = np.random.default_rng(seed)
  state = nnx.state(model)
  for path, variable in nnx.to_flat_state(state):
    shape = tuple(variable.get_value().shape)
    kind = path[-1]
    if kind == "kernel":
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif kind == "var":
      value = rng.uniform(0.5, 1.5, shape)
    elif kind == "scale":
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:  # bias, mean
      value = 0.1 * rng.standard_normal(shape)
    variable.set_value(jnp.asarray(value, jnp.float32))
  nnx.update(model, state)
  return model
