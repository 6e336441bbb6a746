"""Quantizer modules: VQ, Gumbel-VQ, Reg-VQ and factorized (FQ / Reg-FQ), one output type.

Each kind is registered once below; `registry` builds and validates any of them.
"""
from rvq_jax.models.tokenizer.quantizers import factorized
from rvq_jax.models.tokenizer.quantizers import gumbel
from rvq_jax.models.tokenizer.quantizers import registry
from rvq_jax.models.tokenizer.quantizers import regularized
from rvq_jax.models.tokenizer.quantizers import vector
from rvq_jax.models.tokenizer.quantizers.factorized import FactorizedQuantizer
from rvq_jax.models.tokenizer.quantizers.gumbel import GumbelQuantizer
from rvq_jax.models.tokenizer.quantizers.output import QuantizerOutput
from rvq_jax.models.tokenizer.quantizers.output import TemperatureSchedule
from rvq_jax.models.tokenizer.quantizers.registry import QuantizerSpec
from rvq_jax.models.tokenizer.quantizers.registry import build_quantizer
from rvq_jax.models.tokenizer.quantizers.regularized import RegularizedQuantizer
from rvq_jax.models.tokenizer.quantizers.vector import EMAState
from rvq_jax.models.tokenizer.quantizers.vector import VectorQuantizer

# The built-in kinds, in the order configs and docs list them: one line per quantizer.
for _spec in (vector.SPEC, gumbel.SPEC, regularized.SPEC, factorized.FQ_SPEC,
              factorized.REGFQ_SPEC):
  registry.register(_spec)

__all__ = [
    "EMAState",
    "FactorizedQuantizer",
    "GumbelQuantizer",
    "QuantizerOutput",
    "QuantizerSpec",
    "RegularizedQuantizer",
    "TemperatureSchedule",
    "VectorQuantizer",
    "build_quantizer",
    "registry",
]
