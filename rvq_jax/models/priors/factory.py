"""Builds either prior (AR transformer, VQ-Diffusion) from a run config.

Both priors see the tokenizer's tokens as a raster sequence of L = h·w positions, each
one token from K codes, or M sub-tokens for a factorized (FQ) tokenizer. This module
reads that layout from the tokenizer's config so that a prior always matches the
tokenizer it models.
"""
from __future__ import annotations

import ml_collections
from flax import nnx

from rvq_jax.models.priors.ar import ARPrior
from rvq_jax.models.priors.diffusion import DiffusionPrior
from rvq_jax.models.priors.token_layout import TokenLayout


def token_layout(config: ml_collections.ConfigDict) -> TokenLayout:
  factor = 2 ** (len(config.model.ch_mult) - 1)
  side = config.data.image_size // factor
  factorized = config.quantizer.kind in ("fq", "regfq")
  return TokenLayout(vocab_size=config.quantizer.num_codes,
                     num_subtokens=config.quantizer.num_branches if factorized else 1,
                     grid_size=(side, side))


def build_prior(config: ml_collections.ConfigDict, kind: str, *, rngs: nnx.Rngs):
  """The `kind` ('ar' | 'diffusion') prior for the tokens of `config`'s tokenizer."""
  layout = token_layout(config)
  settings = config[kind]
  common = dict(vocab_size=layout.vocab_size, num_subtokens=layout.num_subtokens,
                grid_size=layout.grid_size, condition=config.prior.condition,
                num_classes=config.prior.num_classes, width=settings.model.width,
                depth=settings.model.depth, num_heads=settings.model.num_heads,
                mlp_ratio=settings.model.mlp_ratio, dropout=settings.model.dropout,
                dtype=settings.model.dtype, rngs=rngs)
  if kind == "ar":
    return ARPrior(**common)
  if kind == "diffusion":
    return DiffusionPrior(num_timesteps=settings.num_timesteps,
                          aux_weight=settings.aux_weight, **common)
  raise ValueError(f"unknown prior {kind!r}: 'ar' or 'diffusion'")
