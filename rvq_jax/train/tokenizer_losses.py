"""The tokenizer's reconstruction-side losses (everything but the GAN weight's balance).

Pure functions of arrays and frozen networks; the step function composes them.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax import ops
from rvq_jax.ops.divergences import AxisName
from rvq_jax.ops.info_nce import info_nce
from rvq_jax.ops.info_nce import positive_cosine


def upsample_tokens(token_map: jax.Array, height: int, width: int) -> jax.Array:
  """[B, h, w] token-grid values → [B, H, W] by nearest (block) resizing."""
  batch, h, w = token_map.shape
  if height % h or width % w:
    # Feature maps whose size is not a multiple of the token grid: nearest resize.
    return jax.image.resize(token_map.astype(jnp.float32), (batch, height, width),
                            "nearest").astype(token_map.dtype)
  return jnp.repeat(jnp.repeat(token_map, height // h, axis=1), width // w, axis=2)


def masked_l1(images: jax.Array, reconstructions: jax.Array, region: jax.Array) -> jax.Array:
  """Mean |x − x̂| over the pixels of `region` tokens (Reg-VQ: the deterministic region).

  Args:
    images, reconstructions: [B, H, W, C].
    region: [B, h, w] bool token mask, upsampled to pixels by the grid's factor.

  Returns:
    float32 scalar (0 if the region is empty).
  """
  pixels = upsample_tokens(region, images.shape[1], images.shape[2]).astype(jnp.float32)
  error = jnp.abs(images.astype(jnp.float32) - reconstructions.astype(jnp.float32))
  total = jnp.sum(error * pixels[..., None])
  count = jnp.sum(pixels) * images.shape[-1]
  return total / jnp.maximum(count, 1.0)


def sample_locations(key: jax.Array, batch: int, height: int, width: int,
                     num_locations: int) -> jax.Array:
  """[B, S] flat indices of S distinct locations per image (all of them if S ≥ H·W)."""
  total = height * width
  if num_locations >= total:
    return jnp.broadcast_to(jnp.arange(total), (batch, total))
  noise = jax.random.uniform(key, (batch, total))
  return jnp.argsort(noise, axis=-1)[:, :num_locations]


def pcl_over_layers(key: jax.Array, features_x: Mapping[str, jax.Array],
                    features_y: Mapping[str, jax.Array], token_weights: jax.Array,
                    token_active: jax.Array, *, num_locations: int, tau: float,
                    eps: float, reduction: str = "mean") -> jax.Array:
  """Reg-VQ's PCL over the layers of a VGG (VGG16 by default, VGG-19 in the paper).

  `reduction='mean'` (the default, a decision of this project) averages over the active
  anchors and over the layers, so the term is one anchor's InfoNCE-style loss — a few
  units — and `pcl_weight` lives on the scale of the L1. `'sum'` is the paper's formula
  taken literally: summed over anchors and layers, O(10²–10³) with 256 locations.

  The token-grid weights and the active mask (tokens whose sample differs from the
  argmax) are carried to each feature map by nearest resizing; at the S sampled
  locations the weights are renormalized to sum to 1 per image, keeping the formula's
  premise Σ w' = 1 on the locations actually compared.

  Args:
    key: PRNG key for the sampled locations.
    features_x, features_y: layer → [B, H_l, W_l, C_l] features of input / reconstruction.
    token_weights: [B, h, w] normalized perturbation weights.
    token_active: [B, h, w] bool.

  Returns:
    float32 scalar.
  """
  total = jnp.zeros((), jnp.float32)
  for layer_key, name in zip(jax.random.split(key, len(features_x)), sorted(features_x)):
    fx, fy = features_x[name], features_y[name]
    batch, height, width, channels = fx.shape
    locations = sample_locations(layer_key, batch, height, width, num_locations)
    # The S sampled feature vectors in float32 (bfloat16 VGG features: the loss's
    # normalizations and log-sum-exps stay float32).
    gather = lambda f: jnp.take_along_axis(f.reshape(batch, -1, f.shape[-1]),
                                           locations[..., None], axis=1).astype(jnp.float32)
    weights = upsample_tokens(token_weights, height, width).reshape(batch, -1)
    weights = jnp.take_along_axis(weights, locations, axis=1)
    weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-12)
    active = upsample_tokens(token_active, height, width).reshape(batch, -1)
    active = jnp.take_along_axis(active, locations, axis=1)
    total += ops.probabilistic_contrastive_loss(gather(fx), gather(fy), weights, tau=tau,
                                                eps=eps, active=active, reduction=reduction)
  return total / len(features_x) if reduction == "mean" else total


def adaptive_gan_weight(reconstruction_grad: jax.Array, gan_grad: jax.Array, *,
                        disc_weight: float, max_weight: float = 1e4) -> jax.Array:
  """Taming's balance: ‖∇_last L_nll‖ / (‖∇_last L_gan‖ + 1e-4), clamped, × disc_weight.

  `reconstruction_grad` is the gradient of the NLL only (L1 + λ_p·LPIPS, taming's
  `nll_loss`), not of PCL, the quantizer or the representation losses.
  """
  rec_norm = jnp.linalg.norm(reconstruction_grad.astype(jnp.float32))
  gan_norm = jnp.linalg.norm(gan_grad.astype(jnp.float32))
  weight = jnp.clip(rec_norm / (gan_norm + 1e-4), 0.0, max_weight)
  return jax.lax.stop_gradient(weight) * disc_weight


def representation_loss(
    head: nnx.Module,
    teacher: nnx.Module,
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
