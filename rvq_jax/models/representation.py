"""FQGAN's representation-learning branch: a head on one sub-code predicts a frozen
teacher's global image feature, trained with in-batch InfoNCE (`background/fqgan.md` §1.4).

  subcode [B, h, w, code_dim] ─ FeaturePredictionHead ─→ predicted [B, D]
  images  [B, H, W, 3]        ─ frozen Teacher ─ sg ───→ target    [B, D]
  loss = info_nce(predicted, target, τ)          (FQGAN: τ = 1, weight 0.5)

The head is used only in training; its gradient reaches the encoder branch of its
sub-codebook through the (straight-through) quantized sub-code.

Teachers. FQGAN uses the CLS token of CLIP ViT-L/14 (Dual) or DINOv2-S and CLIP ViT-B/16
(Triple). Those weights cannot be downloaded here, so the teacher is pluggable: any
`nnx.Module` that maps [-1, 1] images to global features (`Teacher`), with its frozen
weights as `PretrainedWeight` read from a converted `.npz` file. The one teacher shipped
(`VGGGlobalTeacher`) is a **stand-in**: global-average-pooled relu5_x features of an
ImageNet VGG16/VGG19, whose weights this project already converts for LPIPS and PCL.
It is a weaker, less semantic target than CLIP/DINOv2; results with it are not FQGAN's.

Logical axis names of the head's parameters: those of `factorized_adapter` ('embed',
'heads', 'kv', 'mlp', 'norm') plus 'code' for the sub-code input, 'position' for the
position embedding, and an unnamed (replicated) axis for the teacher-feature output of
the optional final projection.
"""
from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models import partitioning
from rvq_jax.models import pretrained
from rvq_jax.models import vgg
from rvq_jax.models.factorized_adapter import TransformerBlock
from rvq_jax.models.factorized_adapter import layer_norm
from rvq_jax.models.vqgan import Dtype
from rvq_jax.ops.divergences import AxisName
from rvq_jax.ops.info_nce import info_nce
from rvq_jax.ops.info_nce import positive_cosine

# FQGAN feeds its teachers 224×224 images (the CLIP/DINOv2 training resolution), resized
# with torch's `F.interpolate` default, nearest.
DEFAULT_TEACHER_RESOLUTION = 224
DEFAULT_RESIZE_METHOD = "nearest"


# ------------------------------------------------------------------------------ head


class FeaturePredictionHead(nnx.Module):
  """FQGAN's FeatPredHead: quantized sub-code map [B, h, w, code_dim] → global feature.

    Linear(code_dim → width) → ReLU → Linear(width → width)      per token
    prepend a learned CLS token, add a learned position embedding [h·w + 1, width]
    `num_blocks` pre-LN TransformerBlocks (`num_heads` heads, MLP × `mlp_ratio`)
    LayerNorm (ln_post) → token 0 → [B, width]
    optional Linear(width → target_dim), when the teacher's feature width differs

  FQGAN: width = teacher width (1024 for CLIP-L, 384 DINOv2-S, 768 CLIP-B), 3 blocks,
  8 heads, MLP × 4, no ln_pre, no final projection (39.1M parameters at width 1024,
  grid 16, code_dim 8; FQGAN reports roughly 39M). The position embedding is for a
  fixed `grid_size` × `grid_size` token grid, so inputs must have exactly that grid.

  Parameters: `input_proj_1` [code_dim, width] ('code', 'embed'), `input_proj_2`
  [width, width] ('embed', None), `class_token` [width] ('embed',),
  `pos_embed` [h·w + 1, width] ('position', 'embed'), `blocks[i]`, `ln_post`, and
  `target_proj` [width, target_dim] ('embed', None) when `target_dim` is set.
  """

  def __init__(self, code_dim: int, width: int, *, num_blocks: int = 3, num_heads: int = 8,
               mlp_ratio: int = 4, grid_size: int, target_dim: int | None = None,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    """Builds the head with random weights.

    Args:
      code_dim: width of the sub-code vectors (FQGAN: 8).
      width: transformer width D.
      num_blocks: TransformerBlocks (FQGAN: 3).
      num_heads: attention heads; must divide `width`.
      mlp_ratio: hidden width of each block's MLP, as a multiple of `width`.
      grid_size: h = w of the sub-code map (FQGAN f16 at 256: 16).
      target_dim: if set and ≠ `width`, a final Linear maps to this width (the teacher's
        feature width); None keeps the output at `width`.
      dtype: computation dtype (e.g. bfloat16); LayerNorm statistics and softmaxes stay
        float32 (see `factorized_adapter`).
      param_dtype: storage dtype of the parameters.
      rngs: for the initialization.
    """
    for name, value in (("code_dim", code_dim), ("width", width),
                        ("num_blocks", num_blocks), ("num_heads", num_heads),
                        ("mlp_ratio", mlp_ratio), ("grid_size", grid_size)):
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if target_dim is not None and (not isinstance(target_dim, int) or target_dim < 1):
      raise ValueError(f"target_dim must be a positive int or None, got {target_dim!r}.")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.code_dim = code_dim
    self.width = width
    self.grid_size = grid_size
    self.dtype = dtype
    # The per-token MLP lifting the low-dimensional code into the transformer width.
    self.input_proj_1 = nnx.Linear(
        code_dim, width, kernel_metadata=partitioning.logical("code", "embed"),
        bias_metadata=partitioning.logical("embed"), **kw)
    # Both axes are model width; only the input one is named so that a rule sharding
    # 'embed' shards this kernel once rather than asking for the same mesh axis twice.
    self.input_proj_2 = nnx.Linear(
        width, width, kernel_metadata=partitioning.logical("embed", None),
        bias_metadata=partitioning.logical(None), **kw)
    # OpenCLIP's initialization (scale width^-1/2), which FQGAN's head copies.
    scale = width ** -0.5
    self.class_token = partitioning.param(
        scale * jax.random.normal(rngs.params(), (width,), param_dtype), "embed")
    self.pos_embed = partitioning.param(
        scale * jax.random.normal(rngs.params(), (grid_size * grid_size + 1, width),
                                  param_dtype),
        "position", "embed")
    self.blocks = nnx.List([TransformerBlock(width, num_heads, mlp_ratio=mlp_ratio, **kw)
                            for _ in range(num_blocks)])
    self.ln_post = layer_norm(width, **kw)
    self.output_dim = width if target_dim is None else target_dim
    needs_projection = target_dim is not None and target_dim != width
    self.target_proj = nnx.Linear(
        width, target_dim, kernel_metadata=partitioning.logical("embed", None),
        bias_metadata=partitioning.logical(None), **kw) if needs_projection else None

  def __call__(self, subcode: jax.Array) -> jax.Array:
    """subcode: [B, h, w, code_dim], h = w = grid_size → [B, output_dim] (compute dtype)."""
    batch, height, width, channels = subcode.shape
    if (height, width, channels) != (self.grid_size, self.grid_size, self.code_dim):
      raise ValueError(
          f"FeaturePredictionHead expects sub-codes [B, {self.grid_size}, {self.grid_size}, "
          f"{self.code_dim}] (its position embedding is for that grid), got "
          f"{tuple(subcode.shape)}.")
    tokens = subcode.reshape(batch, height * width, channels).astype(self.dtype)
    tokens = self.input_proj_2(jax.nn.relu(self.input_proj_1(tokens)))  # [B, h·w, width]
    cls = jnp.broadcast_to(self.class_token[...].astype(self.dtype), (batch, 1, self.width))
    tokens = jnp.concatenate([cls, tokens], axis=1)  # [B, h·w + 1, width]
    tokens = tokens + self.pos_embed[...].astype(self.dtype)
    for block in self.blocks:
      tokens = block(tokens)
    features = self.ln_post(tokens[:, 0])  # only the CLS token is read: skip the others
    if self.target_proj is not None:
      features = self.target_proj(features)
    return features


# --------------------------------------------------------------------------- teachers


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
  """A teacher of `kind` with *random* weights (tests, or `loss.random_pretrained`).

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


# ------------------------------------------------------------------------------- loss


def representation_loss(
    head: FeaturePredictionHead,
    teacher: Teacher,
    images: jax.Array,
    subcode: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    axis_name: AxisName = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """FQGAN's semantic alignment loss for one sub-codebook (unweighted).

  Args:
    head: predicts the teacher feature from the sub-code.
    teacher: frozen; its output is a constant target (stop-gradient).
    images: [B, H, W, 3] in [-1, 1], the tokenizer's input images.
    subcode: [B, h, w, code_dim], the quantized (straight-through) sub-code of the
      branch being aligned.
    temperature: InfoNCE temperature τ (FQGAN: 1).
    axis_name: mapped batch axis inside `shard_map` (negatives from all devices); None
      under `jax.jit`, where the batch is global already.

  Returns:
    (loss, metrics): loss a float32 scalar (multiply by `loss.representation_weight`);
    metrics {'representation_nce': loss, 'representation_cosine': mean cosine of the
    predicted and target features of the same image}.
  """
  if images.shape[0] != subcode.shape[0]:
    raise ValueError(f"images and subcode have different batch sizes: "
                     f"{tuple(images.shape)} and {tuple(subcode.shape)}.")
  predicted = head(subcode)
  target = jax.lax.stop_gradient(teacher(images))
  if predicted.shape != target.shape:
    raise ValueError(
        f"head predicts features {tuple(predicted.shape)} but the teacher gives "
        f"{tuple(target.shape)}: build the head with target_dim={target.shape[-1]}.")
  loss = info_nce(predicted, target, temperature=temperature, axis_name=axis_name)
  metrics = {
      "representation_nce": loss,
      "representation_cosine": positive_cosine(predicted, target, axis_name=axis_name),
  }
  return loss, metrics
