"""VQ-VAE / VQGAN nearest-neighbour quantizer (the baseline every comparison needs)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax import ops
from rvq_jax.models.layers import partitioning
from rvq_jax.models.tokenizer.quantizers import registry
from rvq_jax.models.tokenizer.quantizers.output import QuantizerOutput
from rvq_jax.models.tokenizer.quantizers.output import build_aux
from rvq_jax.models.tokenizer.quantizers.output import check_input


class EMAState(nnx.Variable):
  """Codebook statistics updated by moving averages, not by the optimizer."""


def _unit(v: jax.Array) -> jax.Array:
  return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-12))


class VectorQuantizer(nnx.Module):
  """Nearest code with a straight-through gradient.

  Losses: codebook ‖sg(z) − z_q‖² (unless the codebook follows EMA updates) and
  β · commitment ‖z − sg(z_q)‖² on the encoder side; optionally the MaskGIT entropy loss
  on −distances. With `normalize=True`, z and codes are unit vectors (cosine nearest
  neighbour, as FQGAN). Training and evaluation differ only in the EMA update.

  Args:
    num_codes: K.
    code_dim: D; the input's last axis must be D.
    beta: commitment weight (0.25).
    normalize: L2-normalize z and the codes.
    use_ema: update the codebook by exponential moving averages (decay `ema_decay`).
    entropy_weight, entropy_temperature: MaskGIT/FQGAN entropy loss (0 = off).
    approx_recall: 1.0 (default) for the exact nearest code; below 1, the expected recall
      of an approximate search (`ops.nearest_code(recall_target=…)`, fast on TPUs only).
  """

  def __init__(self, num_codes: int, code_dim: int, *, beta: float = 0.25,
               normalize: bool = False, use_ema: bool = False, ema_decay: float = 0.99,
               entropy_weight: float = 0.0, entropy_temperature: float = 0.01,
               approx_recall: float = 1.0, deterministic: bool = False, rngs: nnx.Rngs):
    if num_codes <= 0 or code_dim <= 0:
      raise ValueError(f"num_codes and code_dim must be positive, got {num_codes}, {code_dim}.")
    if not 0.0 < ema_decay < 1.0:
      raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}.")
    if not 0.0 < approx_recall <= 1.0:
      raise ValueError(f"approx_recall must lie in (0, 1], got {approx_recall}.")
    self.num_codes, self.code_dim = num_codes, code_dim
    self.beta, self.normalize, self.use_ema, self.ema_decay = beta, normalize, use_ema, ema_decay
    self.entropy_weight, self.entropy_temperature = entropy_weight, entropy_temperature
    self.deterministic = deterministic
    self.approx_recall = float(approx_recall)
    init = jax.random.uniform(rngs.params(), (num_codes, code_dim), jnp.float32,
                              -1.0 / num_codes, 1.0 / num_codes)
    if normalize:
      init = _unit(init)
    if use_ema:
      self.codebook = EMAState(init, **partitioning.logical("vocab", "code"))
      # Each code starts as one pseudo-vector equal to itself (count 1, sum = the code), so
      # a code no batch selects keeps its value: its count and sum decay together.
      self.cluster_size = EMAState(jnp.ones((num_codes,), jnp.float32),
                                   **partitioning.logical("vocab"))
      self.embed_sum = EMAState(init, **partitioning.logical("vocab", "code"))
    else:
      self.codebook = partitioning.param(init, "vocab", "code")

  @property
  def input_features(self) -> int:
    return self.code_dim

  def codes(self) -> jax.Array:
    """[K, D] the codebook as used for lookup (unit rows when normalized)."""
    codebook = self.codebook[...]
    return _unit(codebook) if self.normalize else codebook

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """[B, ...] tokens → [B, ..., D] decoder inputs."""
    return ops.lookup(indices, self.codes())

  def __call__(self, z: jax.Array, *, key: jax.Array | None = None, step=None,
               deterministic: bool | None = None) -> QuantizerOutput:
    """z: [B, ..., D] → QuantizerOutput (`key` and `step` are unused: VQ is deterministic)."""
    del key, step
    check_input("VectorQuantizer", z, self.code_dim)
    deterministic = self.deterministic if deterministic is None else deterministic
    compute_z = _unit(z.astype(jnp.float32)) if self.normalize else z.astype(jnp.float32)
    codes = self.codes().astype(jnp.float32)
    indices = ops.nearest_code(compute_z, codes, recall_target=self.approx_recall)
    z_q = ops.lookup(indices, codes)
    codebook_loss, commitment_loss = ops.vq_losses(compute_z, z_q, beta=self.beta)
    losses = {"commitment": commitment_loss}
    if not self.use_ema:
      losses["codebook"] = codebook_loss
    if self.entropy_weight:
      distances = ops.code_distances(compute_z, codes)
      losses["entropy"] = self.entropy_weight * ops.entropy_loss(
          -distances, temperature=self.entropy_temperature)
    if self.use_ema and not deterministic:
      self._ema_update(jax.lax.stop_gradient(compute_z), indices)
    quantized = ops.straight_through(z_q, compute_z).astype(z.dtype)
    stats = ops.codebook_stats(indices, self.num_codes)
    aux = build_aux(jnp.zeros(indices.shape, bool), indices, indices, codes)
    return QuantizerOutput(quantized, indices, losses, stats, aux)

  def _ema_update(self, z: jax.Array, indices: jax.Array) -> None:
    cluster_size, embed_sum, codebook = ops.ema_codebook_update(
        self.cluster_size[...], self.embed_sum[...], z, indices, decay=self.ema_decay)
    self.cluster_size[...] = cluster_size
    self.embed_sum[...] = embed_sum
    self.codebook[...] = _unit(codebook) if self.normalize else codebook


def _check(options) -> list[str]:
  problems = []
  if not 0.0 < options["ema_decay"] < 1.0:
    problems.append(f"ema_decay={options['ema_decay']} must lie in (0, 1)")
  if options["beta"] < 0 or options["entropy_weight"] < 0:
    problems.append("beta and entropy_weight must be >= 0")
  if options["entropy_temperature"] <= 0:
    problems.append("entropy_temperature must be > 0")
  if not 0.0 < options["approx_recall"] <= 1.0:
    problems.append(f"approx_recall={options['approx_recall']} must lie in (0, 1] (1 = exact)")
  return problems


def _build(options, *, num_codes: int, code_dim: int, in_features: int | None,
           rngs: nnx.Rngs) -> VectorQuantizer:
  if in_features not in (None, code_dim):
    raise ValueError(f"vq quantizes its input directly: in_features ({in_features}) must "
                     f"equal code_dim ({code_dim}).")
  return VectorQuantizer(num_codes, code_dim, rngs=rngs, **options)


# VQ-VAE/VQGAN: β = 0.25, learned codebook; FQGAN's variant is cosine codes + entropy loss.
# approx_recall: 1.0 is the exact nearest code; below 1, jax.lax.approx_min_k with that
# expected recall (a TPU speed option; exact, and slower, elsewhere).
VQ_OPTIONS = dict(beta=0.25, normalize=False, use_ema=False, ema_decay=0.99,
                  entropy_weight=0.0, entropy_temperature=0.01, approx_recall=1.0)
SPEC = registry.QuantizerSpec(
    kind="vq", build=_build, options=VQ_OPTIONS, categorical=False, check=_check,
    summary="nearest code, straight-through; codebook + β·commitment loss (VQ-VAE/VQGAN)")
