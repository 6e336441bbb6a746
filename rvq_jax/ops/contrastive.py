"""Reg-VQ's probabilistic contrastive loss (PCL) and the perturbation weights it uses."""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from rvq_jax.ops import _checks


def pcl_weights(sampled_codes: jax.Array, argmax_codes: jax.Array) -> jax.Array:
  """Per-position perturbation weights w'_i ∝ ‖c_sampled,i − c_argmax,i‖², normalized per image.

  The weights say how far the Gumbel sample moved a token from its argmax code. They
  are constants for the loss (stop_gradient): they set how strongly each position is
  pulled, they are not themselves a target. An image whose samples all equal the argmax
  gets all-zero weights.

  Args:
    sampled_codes: [B, ..., D] code vectors of the sampled tokens.
    argmax_codes: [B, ..., D] code vectors of the argmax tokens.

  Returns:
    [B, ...] float32 weights; each image's weights sum to 1 (or are all 0).
  """
  _checks.check_same_shape(("sampled_codes", "argmax_codes"), sampled_codes, argmax_codes)
  _checks.check_min_rank("sampled_codes", sampled_codes, 2)
  diff = (sampled_codes.astype(jnp.float32) - argmax_codes.astype(jnp.float32))
  squared = jax.lax.stop_gradient(jnp.sum(diff * diff, axis=-1))
  per_image = squared.reshape(squared.shape[0], -1)
  total = jnp.sum(per_image, axis=-1, keepdims=True)
  normalized = per_image / jnp.where(total > 0, total, 1.0)
  return normalized.reshape(squared.shape)


def probabilistic_contrastive_loss(
    feat_x: jax.Array,
    feat_y: jax.Array,
    weights: jax.Array,
    *,
    tau: float = 0.07,
    eps: float = 1e-6,
    active: jax.Array | None = None,
    reduction: str = "sum",
) -> jax.Array:
  """PCL between features of the input and of its reconstruction at S sampled locations.

  With unit-normalized features, s_ij = x_i · y_j / τ and w_i the normalized weight:

    L = −Σ_i log( (w_i+ε) e^{s_ii} / ((w_i+ε) e^{s_ii} + (1/S) Σ_{j≠i} e^{s_ij}) ),

  summed over the anchors i (all, or those in `active`) of each image and averaged over
  the batch (`reduction='sum'`, the paper's formula), or averaged over every anchor of
  the batch that is in `active` (`reduction='mean'`: one anchor's term, O(1) whatever
  the number of sampled locations; 0 when no anchor is active). Positives are the same
  location, negatives the other sampled locations of the same image. A larger weight
  makes the positive term larger and so pulls *less* (the elastic reconstruction of
  Reg-VQ). Evaluated with log-sum-exp, so it is finite
  and has finite gradients for zero weights.

  Args:
    feat_x: [B, S, C] features of the input image (Reg-VQ's Y).
    feat_y: [B, S, C] features of the reconstruction (Reg-VQ's Z), same locations.
    weights: [B, S] normalized perturbation weights (see `pcl_weights`).
    tau: temperature τ_c.
    eps: added to every weight so that log(w) stays finite; must be > 0.
    active: optional [B, S] bool; anchors outside it add nothing (their locations still
      serve as negatives).
    reduction: 'sum' (Σ over anchors, mean over images) or 'mean' (mean over the active
      anchors of the whole batch).

  Returns:
    float32 scalar.
  """
  _checks.check_same_shape(("feat_x", "feat_y"), feat_x, feat_y)
  if feat_x.ndim != 3:
    raise ValueError(f"features must be [B, S, C], got shape {tuple(feat_x.shape)}.")
  if weights.shape != feat_x.shape[:2]:
    raise ValueError(
        f"weights must be [B, S] = {tuple(feat_x.shape[:2])}, got {tuple(weights.shape)}.")
  if active is not None and active.shape != weights.shape:
    raise ValueError(f"active must have shape {tuple(weights.shape)}, got {tuple(active.shape)}.")
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
  if isinstance(eps, numbers.Real) and eps <= 0:
    raise ValueError(f"eps must be > 0 to keep log(w + eps) finite, got {eps}.")
  num_locations = feat_x.shape[1]

  def unit(v):
    v = v.astype(jnp.float32)
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-12))

  similarity = jnp.einsum("bic,bjc->bij", unit(feat_x), unit(feat_y)) / tau
  positive = jnp.diagonal(similarity, axis1=1, axis2=2)
  off_diagonal = ~jnp.eye(num_locations, dtype=bool)
  log_negatives = jax.nn.logsumexp(
      jnp.where(off_diagonal, similarity, -jnp.inf), axis=-1) - jnp.log(float(num_locations))
  log_weighted_positive = jnp.log(weights.astype(jnp.float32) + eps) + positive
  per_anchor = jnp.logaddexp(log_weighted_positive, log_negatives) - log_weighted_positive
  if active is None:
    active = jnp.ones(per_anchor.shape, bool)
  per_anchor = jnp.where(active, per_anchor, 0.0)
  if reduction == "mean":
    return jnp.sum(per_anchor) / jnp.maximum(jnp.sum(active.astype(jnp.float32)), 1.0)
  return jnp.mean(jnp.sum(per_anchor, axis=-1))
