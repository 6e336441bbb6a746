"""FQ: factorized quantization over M sub-codebooks (FQGAN), and Reg-FQ."""
from __future__ import annotations

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax import ops
from rvq_jax.models.tokenizer.quantizers import registry
from rvq_jax.models.tokenizer.quantizers import regularized
from rvq_jax.models.tokenizer.quantizers import vector
from rvq_jax.models.tokenizer.quantizers.output import QuantizerOutput


class FactorizedQuantizer(nnx.Module):
  """M independent sub-quantizers, one per encoder branch, and a disentanglement loss.

  Each sub-quantizer may be any quantizer here; FQGAN uses `VectorQuantizer(normalize=
  True)` with D = 8. With `RegularizedQuantizer` sub-quantizers this is Reg-FQ: each
  sub-codebook gets its own stochastic mask and prior KL. The decoder input is the
  concatenation of the M sub-codes; the tokens are [B, ..., M].

  The disentanglement loss (weight 0.1) is the mean squared cosine between the
  straight-through sub-codes of each token, averaged over pairs; it needs equal
  sub-code widths.
  """

  def __init__(self, quantizers: Sequence[nnx.Module], *, disentangle_weight: float = 0.1):
    if len(quantizers) < 2:
      raise ValueError(f"FactorizedQuantizer needs M >= 2 sub-quantizers, got {len(quantizers)}.")
    dims = [q.code_dim for q in quantizers]
    if disentangle_weight and len(set(dims)) != 1:
      raise ValueError(f"the disentanglement loss needs equal sub-code widths, got {dims}.")
    self.quantizers = nnx.List(quantizers)
    self.disentangle_weight = disentangle_weight

  @property
  def num_branches(self) -> int:
    return len(self.quantizers)

  @property
  def code_dim(self) -> int:
    return sum(q.code_dim for q in self.quantizers)

  @property
  def num_codes(self) -> tuple[int, ...]:
    return tuple(q.num_codes for q in self.quantizers)

  @property
  def input_features(self) -> tuple[int, ...]:
    return tuple(q.input_features for q in self.quantizers)

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """[B, ..., M] tokens → [B, ..., ΣD_m] decoder inputs."""
    if indices.shape[-1] != self.num_branches:
      raise ValueError(f"factorized tokens must end in M={self.num_branches}, got "
                       f"{tuple(indices.shape)}.")
    return jnp.concatenate(
        [q.decode_indices(indices[..., m]) for m, q in enumerate(self.quantizers)], axis=-1)

  def split_input(self, z: jax.Array) -> list[jax.Array]:
    """One [B, ..., ΣC_m] tensor → M branch inputs, by each sub-quantizer's input width."""
    if z.shape[-1] != sum(self.input_features):
      raise ValueError(
          f"a single FQ input must have {sum(self.input_features)} = sum of "
          f"{self.input_features} features, got shape {tuple(z.shape)}.")
    boundaries = list(itertools.accumulate(self.input_features))[:-1]
    return list(jnp.split(z, boundaries, axis=-1))

  def soft_probs(self, z: jax.Array | Sequence[jax.Array], *, step=None) -> jax.Array | None:
    """M branch features → [B, ..., M, K] soft token distributions, when every
    sub-quantizer is categorical (Reg-FQ); None otherwise (FQ's nearest codes)."""
    if not all(hasattr(q, "soft_probs") for q in self.quantizers):
      return None
    branches = self.split_input(z) if isinstance(z, jax.Array) else list(z)
    return jnp.stack([q.soft_probs(branch, step=step)
                      for q, branch in zip(self.quantizers, branches)], axis=-2)

  def __call__(self, z: jax.Array | Sequence[jax.Array], *, key: jax.Array | None = None,
               step=None, deterministic: bool | None = None) -> QuantizerOutput:
    """z: M branch features [B, ..., C_m] (or one tensor to split) → QuantizerOutput."""
    branches = self.split_input(z) if isinstance(z, jax.Array) else list(z)
    if len(branches) != self.num_branches:
      raise ValueError(f"expected {self.num_branches} branch inputs, got {len(branches)}.")
    keys = [None] * self.num_branches if key is None else list(
        jax.random.split(key, self.num_branches))
    outputs = [q(branch, key=k, step=step, deterministic=deterministic)
               for q, branch, k in zip(self.quantizers, branches, keys)]

    losses, stats = {}, {}
    for m, out in enumerate(outputs):
      losses.update({f"{name}_{m}": value for name, value in out.losses.items()})
      stats.update({f"{name}_{m}": value for name, value in out.stats.items()})
    if self.disentangle_weight:
      losses["disentanglement"] = self.disentangle_weight * ops.disentanglement_loss(
          [out.quantized for out in outputs])
    stats["usage"] = jnp.mean(jnp.stack([out.stats["usage"] for out in outputs]))

    # The perturbation of a token is that of its concatenated code vector, so the PCL
    # weights are recomputed over the concatenation rather than averaged per branch.
    sampled = jnp.concatenate([out.aux["sampled_codes"] for out in outputs], axis=-1)
    argmax = jnp.concatenate([out.aux["argmax_codes"] for out in outputs], axis=-1)
    aux = {
        "mask": jnp.any(jnp.stack([out.aux["mask"] for out in outputs]), axis=0),
        "deterministic_region": jnp.all(
            jnp.stack([out.aux["deterministic_region"] for out in outputs]), axis=0),
        "sampled_codes": sampled,
        "argmax_codes": argmax,
        "pcl_weights": ops.pcl_weights(sampled, argmax),
    }
    quantized = jnp.concatenate([out.quantized for out in outputs], axis=-1)
    indices = jnp.stack([out.indices for out in outputs], axis=-1)
    return QuantizerOutput(quantized, indices, losses, stats, aux)


def _factorized_spec(kind: str, sub: registry.QuantizerSpec, sub_options: dict,
                     summary: str) -> registry.QuantizerSpec:
  """M sub-quantizers of kind `sub`, each with the options `sub` takes."""
  own = ("num_branches", "disentangle_weight")

  def build(options, *, num_codes, code_dim, in_features, rngs):
    if options["num_branches"] < 2:
      raise ValueError(f"{kind} needs num_branches >= 2, got {options['num_branches']}.")
    sub_config = {name: value for name, value in options.items() if name not in own}
    subs = [sub.build(sub_config, num_codes=num_codes, code_dim=code_dim,
                      in_features=in_features, rngs=rngs)
            for _ in range(options["num_branches"])]
    return FactorizedQuantizer(subs, disentangle_weight=options["disentangle_weight"])

  def check(options):
    problems = sub.check({name: value for name, value in options.items() if name not in own})
    if options["num_branches"] < 2:
      problems.append(f"num_branches={options['num_branches']} must be >= 2")
    if options["disentangle_weight"] < 0:
      problems.append("disentangle_weight must be >= 0")
    return problems

  return registry.QuantizerSpec(
      kind=kind, build=build, categorical=sub.categorical, factorized=True, check=check,
      options={**sub_options, "num_branches": 2, "disentangle_weight": 0.1},
      # FQGAN's sub-codes are 8 wide.
      variant={"code_dim": 8}, summary=summary)


# FQGAN: cosine codes of width 8, entropy loss 0.03 on −d/0.01, disentanglement 0.1.
FQ_SPEC = _factorized_spec(
    "fq", vector.SPEC, {**vector.VQ_OPTIONS, "normalize": True, "entropy_weight": 0.03},
    "FQGAN: M cosine VQ sub-codebooks on adapter branches + disentanglement loss")
REGFQ_SPEC = _factorized_spec(
    "regfq", regularized.SPEC, dict(regularized.REGVQ_OPTIONS),
    "Reg-FQ: FQ with a Reg-VQ quantizer per sub-codebook")

