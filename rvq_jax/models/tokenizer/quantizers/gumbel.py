"""Gumbel-VQ: taming-transformers' GumbelQuantize, the baseline Reg-VQ improves on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.tokenizer.quantizers import registry
from rvq_jax.models.tokenizer.quantizers import regularized
from rvq_jax.models.tokenizer.quantizers.output import QuantizerOutput
from rvq_jax.models.tokenizer.quantizers.output import TemperatureSchedule
from rvq_jax.models.tokenizer.quantizers.regularized import RegularizedQuantizer


class GumbelQuantizer(RegularizedQuantizer):
  """Every position takes a hard straight-through Gumbel sample in training.

  Regularized by the per-position KL(softmax(ℓ_i) ‖ uniform) (weight 5e-4, τ-free), with τ
  annealed by cosine from 0.9 to 1e-6 — taming's defaults. It is Reg-VQ's categorical
  quantizer with mask ratio 1 and the per-position instead of the marginal prior, so the
  two differ only in what the paper changes. Evaluation takes the argmax. Its
  `deterministic_region` is every position: taming's Gumbel-VQ reconstructs all tokens
  with the full L1 (restricting L1 to argmax tokens is Reg-VQ's change).
  """

  def __init__(self, num_codes: int, code_dim: int, *, in_features: int | None = None,
               kl_weight: float = 5e-4, logits: str = "projection",
               temperature: TemperatureSchedule = TemperatureSchedule(0.9, 1e-6, 1_000_000),
               deterministic: bool = False, prng: str = "threefry", rngs: nnx.Rngs):
    super().__init__(num_codes, code_dim, in_features=in_features, mask_ratio=1.0,
                     prior_kl_weight=0.0, per_position_kl_weight=kl_weight, logits=logits,
                     temperature=temperature, deterministic=deterministic, prng=prng,
                     rngs=rngs)

  def __call__(self, z: jax.Array, *, key: jax.Array | None = None, step=None,
               deterministic: bool | None = None) -> QuantizerOutput:
    output = super().__call__(z, key=key, step=step, deterministic=deterministic)
    region = jnp.ones_like(output.aux["deterministic_region"])
    return output.replace(aux={**output.aux, "deterministic_region": region})


def _build(options, *, num_codes: int, code_dim: int, in_features: int | None,
           rngs: nnx.Rngs) -> GumbelQuantizer:
  return GumbelQuantizer(num_codes, code_dim, in_features=in_features,
                         kl_weight=options["kl_weight"], logits=options["logits"],
                         temperature=regularized.temperature_schedule(options),
                         prng=options["prng"], rngs=rngs)


def _check(options) -> list[str]:
  problems = regularized.check_categorical(options)
  if options["kl_weight"] < 0:
    problems.append("kl_weight must be >= 0")
  return problems


# Taming's GumbelQuantize: KL weight 5e-4, τ annealed by cosine 0.9 → 1e-6 over ~1e6 steps.
SPEC = registry.QuantizerSpec(
    kind="gumbel", build=_build, categorical=True, check=_check,
    options=dict(kl_weight=5e-4, logits="projection", temperature_start=0.9,
                 temperature_end=1e-6, temperature_anneal_steps=1_000_000, prng="threefry"),
    summary="Gumbel-VQ: a straight-through Gumbel sample everywhere, per-position KL")
