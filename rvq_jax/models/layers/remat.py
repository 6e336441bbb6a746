"""Rematerialization (gradient checkpointing) of residual, attention and transformer blocks.

One setting per network, as configs spell it (`tokenizer.model.remat`, `ar.model.remat`,
`diffusion.model.remat`):

  'none'    no checkpointing: the backward pass reads every intermediate the forward
            pass saved (the fastest, the most memory).
  'blocks'  each block runs under `nnx.remat` with the policy `SAVE_WEIGHT_LAYER_OUTPUTS`:
            the outputs of its weight layers — convolutions and matmuls without batch
            dimensions (projections) — are saved; normalizations, activations, softmaxes,
            attention matrices (batched matmuls) and residual sums are recomputed in the
            backward pass. About a third of a block's activations are kept, and only
            cheap element-wise work is redone.
  'full'    each block runs under `nnx.remat` with `jax.checkpoint_policies.nothing_saveable`:
            only the block's input is kept and the whole block is recomputed in the
            backward pass (about one extra forward pass; the least memory).

A block is what `rvq_jax.models.tokenizer.vqgan` calls `ResnetBlock`, `AttnBlock`,
`Upsample` and `Downsample`, the discriminator's conv-norm layers, and the
`TransformerBlock` of `rvq_jax.models.layers.transformer` (FQ adapters, representation
head, both priors). Checkpointing changes what is stored, not what is computed: losses
and gradients equal those of 'none' up to floating-point reassociation
(tests/test_remat.py). Forward-only calls (evaluation, sampling with a KV cache) are not
affected.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

REMAT_MODES = ("none", "blocks", "full")


def save_weight_layer_outputs(prim, *args, **params) -> bool:
  """The 'blocks' policy: save convolution outputs and matmuls without batch dimensions.

  `jax.checkpoint_policies.dots_with_no_batch_dims_saveable` is the usual transformer
  heuristic (projections saved, q·kᵀ and weights·v recomputed) but knows no
  convolution, so on a conv net it saves nothing; `dots_saveable` saves every matmul,
  including the [B, heads, L, L] attention logits. This keeps what both agree are the
  expensive, weight-bearing layers.
  """
  if prim is jax.lax.conv_general_dilated_p:
    return True
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


SAVE_WEIGHT_LAYER_OUTPUTS = save_weight_layer_outputs

POLICIES: dict[str, Callable[..., bool] | None] = {
    "none": None,
    "blocks": SAVE_WEIGHT_LAYER_OUTPUTS,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def check_mode(mode: str) -> str:
  """`mode` if it is one of `REMAT_MODES`, else ValueError naming the choices."""
  if mode not in REMAT_MODES:
    raise ValueError(f"remat must be one of {REMAT_MODES}, got {mode!r}.")
  return mode


def call(mode: str, fn: Callable[..., Any], module: nnx.Module, *args: Any) -> Any:
  """`fn(module, *args)`, checkpointed as `mode` says.

  `fn` is a plain function of the module and array (or `nnx.Rngs`, or None) arguments;
  anything static (flags, shapes) must be closed over, not passed. With 'none' it is
  simply called.
  """
  if mode == "none":
    return fn(module, *args)
  # Tree mode: graph mode updates the module's Variables inside the checkpointed trace,
  # which fails for modules merged inside a plain `jax.vjp`/`jax.grad` (the train steps);
  # tree mode returns their new values (RNG counts of dropout) instead.
  return nnx.remat(fn, policy=POLICIES[check_mode(mode)], prevent_cse=True,
                   graph=False)(module, *args)


def saved_residual_bytes(loss_fn: Callable[..., Any], params: Any, *inputs: Any) -> int:
  """Bytes of what `jax.vjp(loss_fn)` keeps for the backward pass (its residuals: the
  leaves of the pullback), traced abstractly (`jax.eval_shape`: nothing is compiled or
  allocated). Saved parameters count too. What XLA then allocates depends on the
  backend's fusion and scheduling (see `rvq_jax.tools.aot_check`)."""
  residuals = jax.eval_shape(
      lambda p, *x: jax.tree.leaves(jax.vjp(lambda q: loss_fn(q, *x), p)[1]), params, *inputs)
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in residuals))
