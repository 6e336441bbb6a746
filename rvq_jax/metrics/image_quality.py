"""PSNR and SSIM of reconstructions, per image, in float32 on the accelerator."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr(images: jax.Array, references: jax.Array, *, data_range: float = 2.0) -> jax.Array:
  """Peak signal-to-noise ratio per image.

  Args:
    images, references: [B, H, W, C] in the same range (default [-1, 1], range 2).
    data_range: max − min of the value range.

  Returns:
    [B] float32 PSNR in dB (inf for identical images).
  """
  diff = images.astype(jnp.float32) - references.astype(jnp.float32)
  mse = jnp.mean(diff * diff, axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_kernel(size: int, sigma: float) -> jax.Array:
  coords = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  kernel = jnp.exp(-0.5 * (coords / sigma) ** 2)
  return kernel / jnp.sum(kernel)


def _blur(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Separable 'valid' Gaussian filter over H and W of [B, H, W, C]."""
  channels = x.shape[-1]
  size = kernel.shape[0]
  horizontal = jnp.tile(kernel.reshape(1, size, 1, 1), (1, 1, 1, channels))
  vertical = jnp.tile(kernel.reshape(size, 1, 1, 1), (1, 1, 1, channels))
  dims = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, horizontal, (1, 1), "VALID", dimension_numbers=dims,
                                   feature_group_count=channels)
  return jax.lax.conv_general_dilated(x, vertical, (1, 1), "VALID", dimension_numbers=dims,
                                      feature_group_count=channels)


def ssim(images: jax.Array, references: jax.Array, *, data_range: float = 2.0,
         window: int = 11, sigma: float = 1.5) -> jax.Array:
  """Structural similarity (Wang et al. 2004) per image, Gaussian window, channel mean.

  Matches `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, channel_axis=-1)` up to its border handling: only 'valid'
  windows are averaged.

  Args:
    images, references: [B, H, W, C] with H, W >= `window`.

  Returns:
    [B] float32 SSIM in [-1, 1].
  """
  if images.shape[1] < window or images.shape[2] < window:
    raise ValueError(f"SSIM needs images of at least {window}x{window}, got {images.shape}.")
  x = images.astype(jnp.float32)
  y = references.astype(jnp.float32)
  kernel = _gaussian_kernel(window, sigma)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_x, mu_y = _blur(x, kernel), _blur(y, kernel)
  var_x = _blur(x * x, kernel) - mu_x**2
  var_y = _blur(y * y, kernel) - mu_y**2
  cov = _blur(x * y, kernel) - mu_x * mu_y
  numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
  denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
  return jnp.mean(numerator / denominator, axis=(1, 2, 3))
