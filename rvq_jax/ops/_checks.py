"""Shape and argument checks shared by the ops: clear errors at trace time.

Ops run under `jax.jit`, where a shape mistake would otherwise surface as an XLA error
far from its cause. These checks only read static shapes, so they cost nothing at run time.
"""
from __future__ import annotations

import numbers

import jax


def check_min_rank(name: str, x: jax.Array, min_rank: int) -> None:
  if x.ndim < min_rank:
    raise ValueError(f"{name} must have rank >= {min_rank}, got shape {tuple(x.shape)}.")


def check_codebook(codebook: jax.Array) -> None:
  if codebook.ndim != 2:
    raise ValueError(f"codebook must be [K, D], got shape {tuple(codebook.shape)}.")


def check_feature_dim(name: str, x: jax.Array, codebook: jax.Array) -> None:
  check_min_rank(name, x, 1)
  check_codebook(codebook)
  if x.shape[-1] != codebook.shape[-1]:
    raise ValueError(
        f"{name} has feature dimension {x.shape[-1]} but the codebook has D="
        f"{codebook.shape[-1]} (shapes {tuple(x.shape)} and {tuple(codebook.shape)})."
    )


def check_ratio(name: str, ratio) -> None:
  """Checks a ratio in [0, 1] when it is a concrete Python number (traced values pass)."""
  if isinstance(ratio, numbers.Real) and not 0.0 <= float(ratio) <= 1.0:
    raise ValueError(f"{name} must lie in [0, 1], got {ratio}.")


def check_same_shape(names: tuple[str, str], a: jax.Array, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(
        f"{names[0]} and {names[1]} must have the same shape, got {tuple(a.shape)} and "
        f"{tuple(b.shape)}."
    )
