"""Generative priors over tokenizer tokens: the AR transformer and VQ-Diffusion."""
from rvq_jax.models.priors.ar import ARPrior
from rvq_jax.models.priors.diffusion import DiffusionPrior
from rvq_jax.models.priors.token_layout import TokenLayout

__all__ = ["ARPrior", "DiffusionPrior", "TokenLayout"]
