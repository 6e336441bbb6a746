"""Reg-VQ: a categorical quantizer regularized by a prior KL and a stochastic mask."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax import ops
from rvq_jax.models.layers import partitioning
from rvq_jax.models.tokenizer.quantizers import registry
from rvq_jax.models.tokenizer.quantizers.logits import TokenLogits
from rvq_jax.models.tokenizer.quantizers.output import QuantizerOutput
from rvq_jax.models.tokenizer.quantizers.output import TemperatureSchedule
from rvq_jax.models.tokenizer.quantizers.output import build_aux
from rvq_jax.models.tokenizer.quantizers.output import check_input


class RegularizedQuantizer(nnx.Module):
  """Regularized VQ (Zhang et al., CVPR 2023).

  At every position the model predicts p_i = softmax(ℓ_i/τ) over K codes. In training,
  exactly round(r·L) positions per sample (chosen uniformly) take a hard Gumbel sample
  of p_i; the others take the argmax, both straight-through (gradient of the tempered
  softmax). The codebook learns through the one-hot product, with no VQ codebook or
  commitment loss. The prior loss is KL(p̄ ‖ uniform) of the mean distribution of the
  global batch. In evaluation every position takes the argmax.

  Args:
    num_codes: K.
    code_dim: D, the width of the quantized output.
    in_features: width of the input (defaults to D).
    mask_ratio: r, the fraction of stochastic positions (0.4 in the paper).
    prior_kl_weight: λ_kl on KL(p̄ ‖ uniform).
    per_position_kl_weight: weight on mean_i KL(softmax(ℓ_i) ‖ uniform), τ-free (Gumbel-VQ; 0 here).
    prior_kl_temperature: beyond the paper: the temperature of the p_i whose batch mean
      the prior KL sees (0 = τ, the paper). A value below τ lets the KL judge sharper
      distributions, so it rewards diverse argmaxes rather than flat p_i.
    position_entropy_weight: beyond the paper: FQGAN's per-position entropy term,
      λ_H · mean_i H(softmax(ℓ_i / τ_H)), which sharpens each p_i while the prior KL
      spreads their mean (the two halves of FQGAN's entropy loss). 0 = off.
    position_entropy_temperature: τ_H.
    logits: 'projection' or 'distance'.
    temperature: τ schedule (constant 1.0 by default).
    prng: where the Gumbel noise comes from: 'threefry' (the key as given), 'rbg' or
      'unsafe_rbg' (XLA's RngBitGenerator: cheaper, but backend- and sharding-dependent
      bits; see ops.gumbel_noise and benchmarks/README.md).
  """

  def __init__(self, num_codes: int, code_dim: int, *, in_features: int | None = None,
               mask_ratio: float = 0.4, prior_kl_weight: float = 0.1,
               per_position_kl_weight: float = 0.0, prior_kl_temperature: float = 0.0,
               position_entropy_weight: float = 0.0, position_entropy_temperature: float = 1.0,
               logits: str = "projection",
               temperature: TemperatureSchedule = TemperatureSchedule(),
               deterministic: bool = False, prng: str = "threefry", rngs: nnx.Rngs):
    if num_codes <= 0 or code_dim <= 0:
      raise ValueError(f"num_codes and code_dim must be positive, got {num_codes}, {code_dim}.")
    if not 0.0 <= mask_ratio <= 1.0:
      raise ValueError(f"mask_ratio must lie in [0, 1], got {mask_ratio}.")
    if prior_kl_weight < 0 or per_position_kl_weight < 0 or position_entropy_weight < 0:
      raise ValueError(f"KL and entropy weights must be >= 0, got prior_kl_weight="
                       f"{prior_kl_weight}, per_position_kl_weight={per_position_kl_weight}, "
                       f"position_entropy_weight={position_entropy_weight}.")
    if prior_kl_temperature < 0 or position_entropy_temperature <= 0:
      raise ValueError(f"prior_kl_temperature={prior_kl_temperature} must be >= 0 (0 = τ) and "
                       f"position_entropy_temperature={position_entropy_temperature} > 0.")
    if prng not in ops.PRNG_IMPLS:
      raise ValueError(f"prng must be one of {ops.PRNG_IMPLS}, got {prng!r}.")
    in_features = code_dim if in_features is None else in_features
    self.num_codes, self.code_dim, self.in_features = num_codes, code_dim, in_features
    self.mask_ratio = float(mask_ratio)
    self.prior_kl_weight, self.per_position_kl_weight = prior_kl_weight, per_position_kl_weight
    self.prior_kl_temperature = float(prior_kl_temperature)
    self.position_entropy_weight = float(position_entropy_weight)
    self.position_entropy_temperature = float(position_entropy_temperature)
    self.temperature = temperature
    self.deterministic = deterministic
    self.prng = prng
    # Standard-normal codes, as the nn.Embedding of taming's GumbelQuantize: the decoder
    # sees unit-scale inputs from the first step.
    init = jax.random.normal(rngs.params(), (num_codes, code_dim), jnp.float32)
    self.codebook = partitioning.param(init, "vocab", "code")
    self.logits = TokenLogits(logits, in_features, num_codes, code_dim, rngs=rngs)

  @property
  def input_features(self) -> int:
    return self.in_features

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """[B, ...] tokens → [B, ..., D] decoder inputs."""
    return ops.lookup(indices, self.codebook[...])

  def soft_probs(self, z: jax.Array, *, step=None) -> jax.Array:
    """z: [B, ..., C] → [B, ..., K] float32, the p_i whose batch mean the prior KL sees
    (softmax(ℓ_i/τ), or at `prior_kl_temperature` when set): held-out soft usage."""
    check_input(type(self).__name__, z, self.in_features)
    tau = self.prior_kl_temperature or self.temperature(step)
    logits = self.logits(z, self.codebook[...]).astype(jnp.float32)
    return jax.nn.softmax(logits / tau, axis=-1)

  def __call__(self, z: jax.Array, *, key: jax.Array | None = None, step=None,
               deterministic: bool | None = None) -> QuantizerOutput:
    """z: [B, ..., C] encoder features → QuantizerOutput with quantized [B, ..., D].

    `key` is required in training when any position is stochastic; `step` drives the
    temperature schedule.
    """
    check_input(type(self).__name__, z, self.in_features)
    deterministic = self.deterministic if deterministic is None else deterministic
    codebook = self.codebook[...]
    logits, bias = self.logits.without_bias(z, codebook)
    tau = self.temperature(step)
    batch, length = z.shape[0], math.prod(z.shape[1:-1])
    num_sampled = ops.num_masked(length, self.mask_ratio)
    gumbel = positions = None
    if not deterministic and num_sampled > 0:
      if key is None:
        raise ValueError(
            f"{type(self).__name__} samples tokens in training: pass key=… (a PRNG key), "
            "or deterministic=True for evaluation.")
      mask_key, gumbel_key = jax.random.split(key)
      # Gumbel noise only where a sample is drawn: round(r·L) rows per image (a static
      # count), gathered, not noise over all N × K (ops.categorical_quantize).
      if num_sampled < length:
        positions = ops.stochastic_positions(mask_key, batch, length, self.mask_ratio)
      if self.prng == "threefry":
        # Drawn inside the op, block by block: ops.gumbel_noise(gumbel_key, (B, S, K)).
        gumbel = ops.GumbelSource(key=gumbel_key)
      else:
        gumbel = ops.GumbelSource(noise=ops.gumbel_noise(
            gumbel_key, (batch, num_sampled, self.num_codes), prng=self.prng))
    result = ops.categorical_quantize(
        logits.reshape(batch, length, self.num_codes), codebook, bias=bias, tau=tau,
        gumbel=gumbel, positions=positions,
        per_position_kl=bool(self.per_position_kl_weight))
    token_shape = z.shape[:-1]
    indices = result.indices.reshape(token_shape)
    argmax_indices = result.argmax_indices.reshape(token_shape)
    if gumbel is None:
      mask = jnp.zeros(token_shape, bool)
    elif positions is None:
      mask = jnp.ones(token_shape, bool)
    else:
      mask = ops.positions_to_mask(positions, length).reshape(token_shape)
    quantized = result.quantized.reshape(token_shape + (self.code_dim,))
    # Reg-VQ's prior KL is on the batch mean of p_i = softmax(ℓ_i/τ) (method.md); the op's
    # p̄ shares its log-sum-exp with the straight-through softmax.
    prior_kl = ops.kl_to_uniform(result.mean_probs)
    losses = {}
    if self.prior_kl_temperature or self.position_entropy_weight:
      # The options beyond the paper need softmaxes at other temperatures: one more
      # [N, K] pass each, paid only when they are on.
      full_logits = logits.reshape(batch * length, self.num_codes).astype(jnp.float32)
      if bias is not None:
        full_logits = full_logits + bias.astype(jnp.float32)
      if self.prior_kl_temperature:
        prior_kl = ops.kl_to_uniform(jax.nn.softmax(full_logits / self.prior_kl_temperature))
      if self.position_entropy_weight:
        position_entropy = ops.mean_position_entropy(
            full_logits, temperature=self.position_entropy_temperature)
        losses["position_entropy"] = self.position_entropy_weight * position_entropy
    if self.prior_kl_weight:
      losses["prior_kl"] = self.prior_kl_weight * prior_kl
    if self.per_position_kl_weight:
      # Gumbel-VQ's per-position KL is on softmax(ℓ_i), independent of τ (taming's
      # GumbelQuantize: qy = softmax(logits)).
      losses["per_position_kl"] = self.per_position_kl_weight * result.per_position_kl
    stats = ops.codebook_stats(indices, self.num_codes)
    stats.update(temperature=tau, kl_to_uniform=jax.lax.stop_gradient(prior_kl),
                 stochastic_fraction=jnp.mean(mask.astype(jnp.float32)))
    aux = build_aux(mask, indices, argmax_indices, codebook)
    return QuantizerOutput(quantized.astype(z.dtype), indices, losses, stats, aux)


def check_categorical(options) -> list[str]:
  """Checks the options every categorical (logit) quantizer shares."""
  problems = []
  if options["logits"] not in ("projection", "distance"):
    problems.append(f"logits={options['logits']!r}: 'projection' or 'distance'")
  if options["temperature_start"] <= 0 or options["temperature_end"] <= 0:
    problems.append("temperature_start and temperature_end must be > 0")
  if options["temperature_anneal_steps"] < 0:
    problems.append("temperature_anneal_steps must be >= 0")
  if options["prng"] not in ops.PRNG_IMPLS:
    problems.append(f"prng={options['prng']!r}: one of {', '.join(ops.PRNG_IMPLS)}")
  return problems


def temperature_schedule(options) -> TemperatureSchedule:
  return TemperatureSchedule(start=options["temperature_start"], end=options["temperature_end"],
                             anneal_steps=options["temperature_anneal_steps"])


def _check(options) -> list[str]:
  problems = check_categorical(options)
  if not 0.0 <= options["mask_ratio"] <= 1.0:
    problems.append(f"mask_ratio={options['mask_ratio']} must lie in [0, 1]")
  for name in ("prior_kl_weight", "per_position_kl_weight", "position_entropy_weight",
               "prior_kl_temperature"):
    if not options[name] >= 0:  # Also refuses NaN.
      problems.append(f"{name}={options[name]} must be >= 0")
  if not options["position_entropy_temperature"] > 0:
    problems.append(f"position_entropy_temperature={options['position_entropy_temperature']} "
                    "must be > 0")
  return problems


def _build(options, *, num_codes: int, code_dim: int, in_features: int | None,
           rngs: nnx.Rngs) -> RegularizedQuantizer:
  return RegularizedQuantizer(
      num_codes, code_dim, in_features=in_features, mask_ratio=options["mask_ratio"],
      prior_kl_weight=options["prior_kl_weight"],
      per_position_kl_weight=options["per_position_kl_weight"],
      prior_kl_temperature=options["prior_kl_temperature"],
      position_entropy_weight=options["position_entropy_weight"],
      position_entropy_temperature=options["position_entropy_temperature"],
      logits=options["logits"],
      temperature=temperature_schedule(options), prng=options["prng"], rngs=rngs)


REGVQ_OPTIONS = dict(
    mask_ratio=0.4,
    # λ_kl: the paper gives none. 0.1 kept by the codebook study: usage 15/32/61/80 % at
    # λ_kl 0/0.01/0.1/1 for −0.2/−0.5 dB PSNR (docs/results/codebook_study.md).
    prior_kl_weight=0.1,
    per_position_kl_weight=0.0,
    # Beyond the paper (off by default; docs/results/regvq_study.md measures them): the
    # prior KL on p̄ of sharper p_i (temperature; 0 = τ), and FQGAN's per-position
    # entropy term that sharpens each p_i.
    prior_kl_temperature=0.0,
    position_entropy_weight=0.0,
    position_entropy_temperature=1.0,
    logits="projection",
    # τ: constant 1.0, as in the authors' code. The codebook study's τ = 0.5 used more
    # codes, but τ also scales the prior KL (a sharper p̄), so it is kept.
    temperature_start=1.0, temperature_end=1.0, temperature_anneal_steps=0,
    # The Gumbel noise's generator: 'threefry' (JAX's default, reproducible across
    # backends and shardings) or 'rbg'/'unsafe_rbg' (cheaper on the CPU; see ops.gumbel_noise).
    prng="threefry")
SPEC = registry.QuantizerSpec(
    kind="regvq", build=_build, options=REGVQ_OPTIONS, categorical=True, check=_check,
    summary="Reg-VQ: prior KL on the batch-mean distribution + stochastic mask (ratio r)")
