"""Logical axis names on parameters, for sharding by rules chosen at training time.

Modules name the axes of each parameter ('vocab', 'embed', 'mlp', ...); the training
loop maps names to mesh axes with the rules in the config. The annotation is metadata
only (`eager_sharding=False`): building a module needs no mesh, so the same module runs
unsharded in a notebook and sharded on a pod.

Logical axis names used in rvq_jax:
  vocab     codebook entries / token vocabulary (K)
  code      code-vector features (D)
  embed     model width of transformer and projection layers
  mlp       hidden width of MLPs
  heads     attention heads
  conv_in, conv_out   input/output channels of convolutions
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx

# Axis names of convolution kernels [kh, kw, C_in, C_out] and biases, and of norm scales
# and biases (tiny: left replicated by the default rules).
CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
CONV_BIAS_AXES = ("conv_out",)
NORM_AXES = ("norm",)


def logical(*names: str | None) -> dict[str, Any]:
  """Variable metadata naming the axes.

  E.g. `nnx.Linear(..., kernel_metadata=logical('embed', 'vocab'))`.
  """
  return {"out_sharding": tuple(names), "eager_sharding": False}


def param(value: jax.Array, *names: str | None) -> nnx.Param:
  """A parameter with logical axis names."""
  if len(names) != value.ndim:
    raise ValueError(f"{len(names)} axis names given for a parameter of shape {value.shape}.")
  return nnx.Param(value, **logical(*names))
