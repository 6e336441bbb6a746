"""Generative priors over tokenizer tokens: the AR transformer and VQ-Diffusion, behind one
interface (`Prior`) and a registry (`build_prior`)."""
from rvq_jax.models.priors.ar import ARPrior
from rvq_jax.models.priors.base import Prior
from rvq_jax.models.priors.diffusion import DiffusionPrior
from rvq_jax.models.priors.factory import PRIORS
from rvq_jax.models.priors.factory import build_prior
from rvq_jax.models.priors.factory import prior_class
from rvq_jax.models.priors.token_layout import TokenLayout

__all__ = ["ARPrior", "DiffusionPrior", "PRIORS", "Prior", "TokenLayout", "build_prior",
           "prior_class"]
