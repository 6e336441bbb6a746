"""Frozen feature teachers for FQGAN's representation alignment.

FQGAN uses the CLS token of CLIP ViT-L/14 (Dual) or DINOv2-S and CLIP ViT-B/16 (Triple).
Those weights cannot be downloaded here, so the teacher is pluggable: any `nnx.Module`
that maps [-1, 1] images to global features (`Teacher`), with its frozen weights as
`PretrainedWeight` read from a converted `.npz` file. The one teacher shipped
(`VGGGlobalTeacher`) is a **stand-in**: global-average-pooled relu5_x features of an
ImageNet VGG16/VGG19, whose weights this project already converts for LPIPS and PCL.
It is a weaker, less semantic target than CLIP/DINOv2; results with it are not FQGAN's.
"""
from __future__ import annotations

import os
from typing import Protocol
from typing import runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models import pretrained
from rvq_jax.models.layers.dtypes import Dtype
from rvq_jax.models.pretrained import vgg

# FQGAN feeds its teachers 224×224 images (the CLIP/DINOv2 training resolution), resized
# with torch's `F.interpolate` default, nearest.
DEFAULT_TEACHER_RESOLUTION = 224
DEFAULT_RESIZE_METHOD = "nearest"


@runtime_checkable
class Teacher(Protocol):
  """A frozen feature network: images [B, H, W, 3] in [-1, 1] → global features [B, C].

  Contract:
    * `feature_dim` is C.
    * The teacher does its own preprocessing (resize to its resolution, its own input
      normalization), so callers pass the tokenizer's images as they are.
    * Its weights are `pretrained.PretrainedWeight` (never `nnx.Param`): optimizers and
      `nnx.grad` skip them, and `representation_loss` stops gradients at its output.
    * Its weight file (for `load_teacher`) holds the weights of `teacher.backbone` in the
      converter's key scheme (`rvq_jax.models.pretrained`); everything outside the
      backbone (resizing, pooling) is weight-free.

  A CLIP or DINOv2 teacher is a module with a `backbone` (the ViT, returning its CLS
  token), a converter entry for its checkpoint, and an entry in `TEACHER_BACKBONES`.
  """

  feature_dim: int

  def __call__(self, images: jax.Array) -> jax.Array:
    ...


def resize_images(images: jax.Array, resolution: int | None, *,
                  method: str = DEFAULT_RESIZE_METHOD) -> jax.Array:
  """Resizes a batch of images to `resolution` × `resolution` with `jax.image.resize`.

  Args:
    images: [B, H, W, C].
    resolution: target side; None (or equal to H and W) returns `images` unchanged.
    method: a `jax.image.resize` method; FQGAN uses 'nearest'. No antialiasing, as
      torch's `F.interpolate` by default. Note: JAX's 'nearest' samples at pixel centres
      (source index ⌊(i + ½)·H/R⌋), torch's legacy 'nearest' at ⌊i·H/R⌋, so the two pick
      slightly different pixels for the same sizes (torch's 'nearest-exact' = JAX's).

  Returns:
    [B, resolution, resolution, C], same dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {tuple(images.shape)}.")
  if resolution is None or images.shape[1:3] == (resolution, resolution):
    return images
  batch, _, _, channels = images.shape
  return jax.image.resize(images, (batch, resolution, resolution, channels), method=method,
                          antialias=False)


class VGGGlobalTeacher(nnx.Module):
  """Stand-in teacher: global-average-pooled relu5_x activations of an ImageNet VGG.

  images [B, H, W, 3] in [-1, 1] → resize to `resolution` → VGG (ImageNet-normalized
  input) → `layer` activations [B, R/16, R/16, 512] → mean over space → [B, 512] float32.

  Use it when no CLIP/DINOv2 weights are available: the frozen, pretrained VGG16/VGG19
  weights are those the project already converts for LPIPS and PCL. Its features are
  ImageNet-classification features, not CLIP/DINOv2 representations, so a tokenizer
  trained against it reproduces FQGAN's mechanism but not its semantic target.
  """

  def __init__(self, backbone: vgg.VGG, *, layer: str | None = None,
               resolution: int | None = DEFAULT_TEACHER_RESOLUTION,
               resize_method: str = DEFAULT_RESIZE_METHOD):
    """Wraps a VGG (random or loaded; its weights are `PretrainedWeight`).

    Args:
      backbone: a `vgg.VGG16` or `vgg.VGG19` with ImageNet input normalization on.
      layer: the activation to pool; default the last ReLU of block 5 (relu5_3 for
        VGG16, relu5_4 for VGG19).
      resolution: images are resized to this side first (≥ 16 for a block-5 layer, as
        VGG checks); None keeps the input size.
      resize_method: `jax.image.resize` method.
    """
    if not isinstance(backbone, vgg.VGG):
      raise TypeError(f"backbone must be a vgg.VGG16/VGG19, got {type(backbone).__name__}.")
    if not backbone.normalize_input:
      raise ValueError("VGGGlobalTeacher needs a backbone with normalize_input=True "
                       "(it receives [-1, 1] images).")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
      raise ValueError(f"resolution must be a positive int or None, got {resolution!r}.")
    layer = layer or f"relu5_{backbone.block_convs[-1]}"
    relu_layers = [name for name in vgg.torchvision_layer_indices(backbone.block_convs)
                   if name.startswith("relu")]
    if layer not in relu_layers:
      raise ValueError(f"{type(backbone).__name__} has no layer {layer!r}; choose among "
                       f"{relu_layers}.")
    self.backbone = backbone
    self.layer = layer
    self.feature_dim = vgg.VGG_BLOCK_CHANNELS[int(layer[len("relu")]) - 1]
    self.resolution = resolution
    self.resize_method = resize_method

  def __call__(self, images: jax.Array) -> jax.Array:
    """images: [B, H, W, 3] in [-1, 1] → [B, feature_dim] float32."""
    images = resize_images(images, self.resolution, method=self.resize_method)
    activations = self.backbone(images, layers=(self.layer,))[self.layer]
    # Pool in float32: bfloat16 sums over 14×14 positions would lose the low bits.
    return jnp.mean(activations.astype(jnp.float32), axis=(1, 2))


# Teacher kinds `load_teacher` knows: kind → backbone class (whose `pretrained_network`
# names the converter's weight file).
TEACHER_BACKBONES: dict[str, type[vgg.VGG]] = {"vgg16": vgg.VGG16, "vgg19": vgg.VGG19}


def _check_kind(kind: str) -> type[vgg.VGG]:
  if kind not in TEACHER_BACKBONES:
    raise ValueError(
        f"Unknown teacher {kind!r}; available: {sorted(TEACHER_BACKBONES)}. (CLIP and "
        f"DINOv2 teachers need a Flax module and a weight converter, which this project "
        f"does not have yet.)")
  return TEACHER_BACKBONES[kind]


def build_teacher(kind: str, *, resolution: int | None = DEFAULT_TEACHER_RESOLUTION,
                  resize_method: str = DEFAULT_RESIZE_METHOD, dtype: Dtype = jnp.float32,
                  rngs: nnx.Rngs) -> VGGGlobalTeacher:
  """A teacher of `kind` with *random* weights (tests, or `weights.random`).

  Args:
    kind: one of `TEACHER_BACKBONES` ('vgg16', 'vgg19').
    resolution, resize_method: see `VGGGlobalTeacher`.
    dtype: computation dtype of the backbone (weights stay float32).
    rngs: for the random weights.
  """
  backbone_class = _check_kind(kind)
  backbone = backbone_class(dtype=dtype, rngs=rngs)
  return VGGGlobalTeacher(backbone, resolution=resolution, resize_method=resize_method)


def load_teacher(kind: str, path: str | os.PathLike | None = None, *,
                 resolution: int | None = DEFAULT_TEACHER_RESOLUTION,
                 resize_method: str = DEFAULT_RESIZE_METHOD,
                 dtype: Dtype = jnp.float32) -> VGGGlobalTeacher:
  """A teacher of `kind` with its pretrained weights, strictly loaded.

  The file is the converter's output for the backbone (`vgg16.npz` / `vgg19.npz`, the
  same files LPIPS's and PCL's VGGs use), loaded with `pretrained.load_params`: every
  key and shape must match, else nothing is loaded.

  Args:
    kind: one of `TEACHER_BACKBONES` ('vgg16', 'vgg19').
    path: the `.npz` file; None or '' means `$RVQ_JAX_WEIGHTS_DIR/<kind>.npz`.
    resolution, resize_method: see `VGGGlobalTeacher`.
    dtype: computation dtype of the backbone (weights stay float32).

  Raises:
    ValueError: unknown `kind`.
    FileNotFoundError: the file does not exist; the message names it and the converter
      command that makes it.
    pretrained.WeightMismatchError: the file does not match the backbone.
  """
  backbone_class = _check_kind(kind)
  path = pretrained.resolve_weights_path(backbone_class.pretrained_network, path or None)
  # An abstract teacher: no random initialization that the file would overwrite anyway.
  teacher = nnx.eval_shape(lambda: build_teacher(
      kind, resolution=resolution, resize_method=resize_method, dtype=dtype,
      rngs=nnx.Rngs(0)))
  # The file fills the backbone; a teacher with weights elsewhere would be left half
  # random, which strict loading exists to prevent.
  outside = [name for name in pretrained.param_shapes(teacher)
             if not name.startswith("backbone.")]
  if outside:
    raise AssertionError(f"teacher weights outside its backbone: {outside}")
  pretrained.load_params(teacher.backbone, path)
  return teacher
