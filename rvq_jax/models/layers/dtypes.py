"""Compute dtypes by name, as configs spell them.

Parameters are stored in float32 everywhere; a module's `dtype` is the dtype its layers
compute in. Configs name it ('float32' | 'bfloat16'), modules take either the name or
a jnp dtype.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

Dtype = Any

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Standard deviation of token, position and condition embeddings (GPT-2's 0.02).
EMBED_STDDEV = 0.02


def compute_dtype(dtype: Any) -> Any:
  """'float32' | 'bfloat16' | a jnp dtype → the jnp dtype."""
  if isinstance(dtype, str):
    if dtype not in COMPUTE_DTYPES:
      raise ValueError(f"dtype must be one of {sorted(COMPUTE_DTYPES)}, got {dtype!r}.")
    return COMPUTE_DTYPES[dtype]
  return dtype
