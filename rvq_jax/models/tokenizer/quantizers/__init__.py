"""Quantizer modules: VQ, Gumbel-VQ, Reg-VQ and factorized (FQ / Reg-FQ), one output type."""
from rvq_jax.models.tokenizer.quantizers.factorized import FactorizedQuantizer
from rvq_jax.models.tokenizer.quantizers.factory import QUANTIZER_KINDS, build_quantizer
from rvq_jax.models.tokenizer.quantizers.gumbel import GumbelQuantizer
from rvq_jax.models.tokenizer.quantizers.output import QuantizerOutput, TemperatureSchedule
from rvq_jax.models.tokenizer.quantizers.regularized import RegularizedQuantizer
from rvq_jax.models.tokenizer.quantizers.vector import EMAState, VectorQuantizer

__all__ = [
    "EMAState",
    "FactorizedQuantizer",
    "GumbelQuantizer",
    "QUANTIZER_KINDS",
    "QuantizerOutput",
    "RegularizedQuantizer",
    "TemperatureSchedule",
    "VectorQuantizer",
    "build_quantizer",
]
