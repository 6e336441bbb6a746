"""Evaluation metrics: image quality (PSNR, SSIM); codebook statistics live in rvq_jax.ops."""
