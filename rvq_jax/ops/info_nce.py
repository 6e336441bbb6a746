"""In-batch InfoNCE on cosine similarity: FQGAN's representation-alignment loss.

A student (the feature-prediction head on one sub-code) predicts the global feature a
frozen teacher (CLIP / DINOv2 / a stand-in) computes from the same image. Image i's
prediction must pick out image i's teacher feature among all teacher features of the
batch: with unit-normalized rows s_i (student) and t_j (teacher),

  L = −mean_i log( exp(s_i·t_i / τ) / Σ_j exp(s_i·t_j / τ) ).

One-directional (only students are anchors) and the teacher side is a constant
(stop-gradient), as in FQGAN (`background/fqgan.md` §1.4, τ = 1 there).

Negatives span the *global* batch: under `jax.jit` with batch-sharded inputs the
similarity matrix is global by construction; inside `shard_map`, pass the mapped
`axis_name` and the teacher features of every device are gathered. FQGAN itself uses
only each GPU's local batch (no gather), so its loss equals this one computed per device
without `axis_name` inside `shard_map`. With more negatives the loss's floor log(B)
is higher, so loss values are comparable only at equal global batch.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from rvq_jax.ops import _checks
from rvq_jax.ops.divergences import AxisName


def _unit_rows(x: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (float32); an all-zero row stays zero, with finite grads."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def info_nce(
    student: jax.Array,
    teacher: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    axis_name: AxisName = None,
) -> jax.Array:
  """One-directional in-batch InfoNCE between student and (stop-gradient) teacher features.

  Both inputs are L2-normalized row-wise and all arithmetic is float32 whatever their
  dtype. Row i of `student` and row i of `teacher` belong to the same image (the positive
  pair); every other teacher row of the (global) batch is a negative.

  Args:
    student: [B, C] predicted features (gradients flow into these).
    teacher: [B, C] target features; treated as constants (`stop_gradient`).
    temperature: τ > 0 dividing the cosine similarities (FQGAN: 1).
    axis_name: mapped axis (or axes) inside `shard_map`/`pmap`, over which the batch is
      split. The teacher rows of all devices are gathered as negatives and the per-row
      losses averaged over all devices, so the value equals the loss of the unsharded
      global batch (shards must hold equal numbers of rows, as even sharding guarantees).
      Under plain `jax.jit` with sharded inputs leave it None: the loss is global already.

  Returns:
    float32 scalar (on every device, with `axis_name`). It lies in [0, log B + 2/τ]; log B
    (B the global batch) when the student carries no information about which image is
    which, and → 0 for distinct positives as τ → 0.
  """
  _checks.check_same_shape(("student", "teacher"), student, teacher)
  if student.ndim != 2:
    raise ValueError(f"features must be [B, C], got shape {tuple(student.shape)}.")
  if isinstance(temperature, numbers.Real) and temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  student_unit = _unit_rows(student)
  teacher_unit = _unit_rows(jax.lax.stop_gradient(teacher))
  if axis_name is None:
    all_teacher = teacher_unit
  else:
    # [B_local, C] → [B_global, C]. Only the (constant) teacher side crosses devices, so
    # the backward pass needs no communication.
    all_teacher = jax.lax.all_gather(teacher_unit, axis_name, tiled=True)
  # 'highest': on TPU the default f32 matmul rounds to bfloat16, which at small τ would
  # blur the logits; [B_local, C] × [C, B_global] is tiny next to the rest of a step.
  logits = jnp.matmul(student_unit, all_teacher.T,
                      precision=jax.lax.Precision.HIGHEST) / temperature  # [B_local, B_global]
  # The positive logit from the pair itself: no need to know where this device's rows
  # sit in the gathered order (which multi-axis gathers make awkward).
  positive = jnp.sum(student_unit * teacher_unit, axis=-1) / temperature  # [B_local]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) - positive)
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return loss


def positive_cosine(student: jax.Array, teacher: jax.Array, *,
                    axis_name: AxisName = None) -> jax.Array:
  """Mean cosine similarity of the positive pairs, a diagnostic: 1 when aligned.

  Args:
    student: [B, C]; teacher: [B, C] (row i of each from the same image).
    axis_name: mapped axis (or axes) to average over inside `shard_map`.

  Returns:
    float32 scalar in [−1, 1] (no gradient to the teacher).
  """
  _checks.check_same_shape(("student", "teacher"), student, teacher)
  cosine = jnp.mean(jnp.sum(
      _unit_rows(student) * _unit_rows(jax.lax.stop_gradient(teacher)), axis=-1))
  if axis_name is not None:
    cosine = jax.lax.pmean(cosine, axis_name)
  return cosine
