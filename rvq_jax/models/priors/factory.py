"""The prior registry: each kind's class, built from its stage config.

Both priors see the tokenizer's tokens as a raster sequence of L = h·w positions, each
one token from K codes or M sub-tokens for a factorized (FQ) tokenizer (`TokenLayout`,
which the caller reads off the tokenizer, so that a prior always matches it).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from rvq_jax.models.priors.ar import ARPrior
from rvq_jax.models.priors.base import Prior
from rvq_jax.models.priors.diffusion import DiffusionPrior
from rvq_jax.models.priors.token_layout import TokenLayout

PRIORS: dict[str, type[Prior]] = {"ar": ARPrior, "diffusion": DiffusionPrior}


def prior_class(kind: str) -> type[Prior]:
  try:
    return PRIORS[kind]
  except KeyError:
    raise ValueError(f"unknown prior {kind!r}: choose from {tuple(PRIORS)}") from None


def build_prior(kind: str, settings: Mapping[str, Any], layout: TokenLayout, *,
                condition: str = "none", num_classes: int = 0, rngs: nnx.Rngs) -> Prior:
  """The `kind` prior `settings` (`config.<kind>`) describes, over tokens laid out as
  `layout`, conditioned on `condition` ('none' | 'class' | 'semantic')."""
  return prior_class(kind).from_config(settings, layout, condition=condition,
                                       num_classes=num_classes, rngs=rngs)
