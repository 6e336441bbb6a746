"""Gumbel-VQ: taming-transformers' GumbelQuantize, the baseline Reg-VQ improves on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.tokenizer.quantizers.output import QuantizerOutput, TemperatureSchedule
from rvq_jax.models.tokenizer.quantizers.regularized import RegularizedQuantizer


class GumbelQuantizer(RegularizedQuantizer):
  """Every position takes a hard straight-through Gumbel sample in training.

  Regularized by the per-position KL(p_i ‖ uniform) (weight 5e-4), with the temperature
  annealed by cosine from 0.9 to 1e-6 — taming's defaults. It is Reg-VQ's categorical
  quantizer with mask ratio 1 and the per-position instead of the marginal prior, so the
  two differ only in what the paper changes. Evaluation takes the argmax. Its
  `deterministic_region` is every position: taming's Gumbel-VQ reconstructs all tokens
  with the full L1 (restricting L1 to argmax tokens is Reg-VQ's change).
  """

  def __init__(self, num_codes: int, code_dim: int, *, in_features: int | None = None,
               kl_weight: float = 5e-4, logits: str = "projection",
               temperature: TemperatureSchedule = TemperatureSchedule(0.9, 1e-6, 1_000_000),
               deterministic: bool = False, rngs: nnx.Rngs):
    super().__init__(num_codes, code_dim, in_features=in_features, mask_ratio=1.0,
                     prior_kl_weight=0.0, per_position_kl_weight=kl_weight, logits=logits,
                     temperature=temperature, deterministic=deterministic, rngs=rngs)

  def __call__(self, z: jax.Array, *, key: jax.Array | None = None, step=None,
               deterministic: bool | None = None) -> QuantizerOutput:
    output = super().__call__(z, key=key, step=step, deterministic=deterministic)
    region = jnp.ones_like(output.aux["deterministic_region"])
    return output.replace(aux={**output.aux, "deterministic_region": region})
