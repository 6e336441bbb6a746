"""PSNR/SSIM against scikit-image's independent implementations."""
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio
from skimage.metrics import structural_similarity

from rvq_jax.metrics.image_quality import psnr
from rvq_jax.metrics.image_quality import ssim


def _pair(seed=0, noise=0.2):
  rng = np.random.default_rng(seed)
  clean = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  noisy = np.clip(clean + rng.normal(0, noise, clean.shape), -1, 1).astype(np.float32)
  return clean, noisy


def test_psnr_matches_skimage():
  clean, noisy = _pair()
  got = np.asarray(psnr(jnp.asarray(noisy), jnp.asarray(clean)))
  want = [peak_signal_noise_ratio(clean[i], noisy[i], data_range=2.0) for i in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_ssim_matches_skimage_on_valid_windows():
  clean, noisy = _pair(1, 0.3)
  got = np.asarray(ssim(jnp.asarray(noisy), jnp.asarray(clean)))
  for i in range(3):
    _, full = structural_similarity(clean[i], noisy[i], data_range=2.0, gaussian_weights=True,
                                    sigma=1.5, use_sample_covariance=False, channel_axis=-1,
                                    full=True)
    np.testing.assert_allclose(got[i], full[5:-5, 5:-5].mean(), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(ssim(jnp.asarray(clean), jnp.asarray(clean))), 1.0,
                             rtol=1e-5)


def test_ssim_rejects_images_smaller_than_the_window():
  with pytest.raises(ValueError, match="at least 11x11"):
    ssim(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
