"""The optimizer every stage builds from its `optim` config block."""
from __future__ import annotations

import jax
import ml_collections
import optax
from flax import nnx


def _decay_mask(params):
  """True on matmul/conv kernels only: biases, norms and embeddings are not decayed
  (GPT-2/taming practice; decaying a LayerNorm scale towards 0 only hurts)."""
  def is_kernel(path, _):
    return bool(path) and getattr(path[-1], "key", None) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(optim: ml_collections.ConfigDict, learning_rate: float):
  """Adam(W) with linear warm-up and global-norm clipping; returns (tx, schedule).

  Weight decay (if any) applies to kernels only.
  """
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, max(optim.warmup_steps, 1)),
       optax.constant_schedule(learning_rate)], [optim.warmup_steps]
  ) if optim.warmup_steps else optax.constant_schedule(learning_rate)
  adam = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay,
                     mask=_decay_mask if optim.weight_decay else None)
  chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip else []
  return optax.chain(*chain, adam), schedule


def ema_update(ema_model: nnx.Module, model: nnx.Module, decay: float) -> None:
  """ema ← decay·ema + (1 − decay)·model for parameters; other state is copied."""
  ema_params = nnx.state(ema_model, nnx.Param)
  new_params = nnx.state(model, nnx.Param)
  nnx.update(ema_model,
             jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, new_params))
  nnx.update(ema_model, nnx.state(model, nnx.Not(nnx.Param)))
