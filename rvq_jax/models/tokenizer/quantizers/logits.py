"""Token logits for the categorical quantizers (Gumbel-VQ, Reg-VQ)."""
from __future__ import annotations

import jax
from flax import nnx

from rvq_jax import ops
from rvq_jax.models.layers import partitioning

LOGIT_KINDS = ("projection", "distance")


class TokenLogits(nnx.Module):
  """ℓ_i over K codes at every position.

  `projection` (default, as Gumbel-VQ and the Reg-VQ authors): a learned linear map of
  the encoder feature (a 1×1 conv). `distance`: ℓ_i,k = −‖z_i − c_k‖², which needs the
  input width to equal the code width D.
  """

  def __init__(self, kind: str, in_features: int, num_codes: int, code_dim: int, *,
               rngs: nnx.Rngs):
    if kind not in LOGIT_KINDS:
      raise ValueError(f"logits must be one of {LOGIT_KINDS}, got {kind!r}.")
    if kind == "distance" and in_features != code_dim:
      raise ValueError(
          f"distance logits compare the input with the codes, so in_features ({in_features}) "
          f"must equal code_dim ({code_dim}).")
    self.kind = kind
    if kind == "projection":
      self.projection = nnx.Linear(
          in_features, num_codes, rngs=rngs,
          kernel_metadata=partitioning.logical("embed", "vocab"),
          bias_metadata=partitioning.logical("vocab"))

  def __call__(self, z: jax.Array, codebook: jax.Array) -> jax.Array:
    """z: [B, ..., C], codebook: [K, D] → logits [B, ..., K].

    Float32 for a bfloat16 `z` too: the projection promotes to its float32 kernel, and
    distances stay in float32 (rounding them to bfloat16 would tie near codes).
    """
    if self.kind == "projection":
      return self.projection(z)
    return -ops.code_distances(z, codebook)

  def without_bias(self, z: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(ℓ − b, b): the logits before the projection's bias [K], and the bias (None for
    distance logits). `ops.categorical_quantize` adds b itself, so no [.., K] pass is
    spent on it."""
    if self.kind != "projection":
      return self(z, codebook), None
    projection = self.projection
    z, kernel, bias = projection.promote_dtype(
        (z, projection.kernel[...], projection.bias[...]), dtype=projection.dtype)
    # A [N, C] × [C, K] matmul: with z's leading axes kept, the kernel's gradient contracts
    # several axes, and XLA's CPU backend then transposes the whole [N, K] cotangent first.
    flat = z.reshape(-1, z.shape[-1])
    logits = jax.lax.dot_general(flat, kernel, (((1,), (0,)), ((), ())),
                                 precision=projection.precision)
    return logits.reshape(z.shape[:-1] + (kernel.shape[-1],)), bias
