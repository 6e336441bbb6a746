"""Builds any quantizer from a config, so one training loop compares them all."""
from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from rvq_jax.models.tokenizer.quantizers.factorized import FactorizedQuantizer
from rvq_jax.models.tokenizer.quantizers.gumbel import GumbelQuantizer
from rvq_jax.models.tokenizer.quantizers.output import TemperatureSchedule
from rvq_jax.models.tokenizer.quantizers.regularized import RegularizedQuantizer
from rvq_jax.models.tokenizer.quantizers.vector import VectorQuantizer

QUANTIZER_KINDS = ("vq", "gumbel", "regvq", "fq", "regfq")


def _temperature(config: Mapping[str, Any], default: TemperatureSchedule) -> TemperatureSchedule:
  return TemperatureSchedule(
      start=config.get("temperature_start", default.start),
      end=config.get("temperature_end", default.end),
      anneal_steps=config.get("temperature_anneal_steps", default.anneal_steps))


def _single(kind: str, config: Mapping[str, Any], num_codes: int, code_dim: int,
            in_features: int | None, rngs: nnx.Rngs):
  if kind == "vq":
    if in_features not in (None, code_dim):
      raise ValueError(f"vq quantizes its input directly: in_features ({in_features}) must "
                       f"equal code_dim ({code_dim}).")
    return VectorQuantizer(
        num_codes, code_dim, beta=config.get("beta", 0.25),
        normalize=config.get("normalize", False), use_ema=config.get("use_ema", False),
        ema_decay=config.get("ema_decay", 0.99),
        entropy_weight=config.get("entropy_weight", 0.0),
        entropy_temperature=config.get("entropy_temperature", 0.01), rngs=rngs)
  if kind == "gumbel":
    return GumbelQuantizer(
        num_codes, code_dim, in_features=in_features, kl_weight=config.get("kl_weight", 5e-4),
        logits=config.get("logits", "projection"),
        temperature=_temperature(config, TemperatureSchedule(0.9, 1e-6, 1_000_000)), rngs=rngs)
  if kind == "regvq":
    return RegularizedQuantizer(
        num_codes, code_dim, in_features=in_features, mask_ratio=config.get("mask_ratio", 0.4),
        prior_kl_weight=config.get("prior_kl_weight", 0.1),
        per_position_kl_weight=config.get("per_position_kl_weight", 0.0),
        logits=config.get("logits", "projection"),
        temperature=_temperature(config, TemperatureSchedule()), rngs=rngs)
  raise ValueError(f"unknown quantizer kind {kind!r}; choose one of {QUANTIZER_KINDS}.")


def build_quantizer(config: Mapping[str, Any], *, in_features: int | None = None,
                    rngs: nnx.Rngs):
  """A quantizer module from `config` (a dict or ConfigDict).

  Keys: `kind` ∈ {vq, gumbel, regvq, fq, regfq}; `num_codes` (K), `code_dim` (D); the
  options of the chosen class (beta, normalize, use_ema, ema_decay, entropy_weight,
  entropy_temperature | kl_weight | mask_ratio, prior_kl_weight, per_position_kl_weight,
  logits, temperature_start/_end/_anneal_steps); for fq/regfq `num_branches` (M) and
  `disentangle_weight`, where K and D are per sub-codebook and `in_features` per branch.
  """
  kind = config["kind"]
  if kind not in QUANTIZER_KINDS:
    raise ValueError(f"unknown quantizer kind {kind!r}; choose one of {QUANTIZER_KINDS}.")
  num_codes, code_dim = config["num_codes"], config["code_dim"]
  if kind in ("fq", "regfq"):
    sub_kind = "vq" if kind == "fq" else "regvq"
    num_branches = config.get("num_branches", 2)
    if num_branches < 2:
      raise ValueError(f"{kind} needs num_branches >= 2, got {num_branches}.")
    subs = [_single(sub_kind, config, num_codes, code_dim, in_features, rngs)
            for _ in range(num_branches)]
    return FactorizedQuantizer(subs, disentangle_weight=config.get("disentangle_weight", 0.1))
  return _single(kind, config, num_codes, code_dim, in_features, rngs)
