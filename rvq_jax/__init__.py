"""rvq_jax: Regularized and Factorized Vector Quantization for tokenized image synthesis, in JAX."""

__version__ = "0.1.0"
