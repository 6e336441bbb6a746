"""VQ-Diffusion's mask-and-replace discrete diffusion, all in log space.

Tokens take K+1 classes: the K codebook entries and [MASK], the last class (index K).
One forward step keeps a token with probability a_t, replaces it by each of the K codes
with b_t, and masks it with c_t; [MASK] is absorbing. Every composition of such steps has
the same form, so the marginal q(x_t|x_0) and the posterior q(x_s|x_t, x_0) have closed
forms in terms of a handful of per-step scalars, and nothing here builds a (K+1)×(K+1)
transition matrix: the cost is O(K) per token.

Timestep convention (that of the released code, 0-based): t ∈ [0, T) and step t maps
x_{t−1} → x_t, where x_{−1} is the data. So t=0 is the first noising step, x_{T−1} is
(almost) all [MASK], and the paper's 1-based step t is t+1 here. Functions that take a
"source" time accept t = −1 for "no noise": q(x_{−1}|x_0) is x_0 itself.

Shapes: a distribution has its class axis last, [..., K+1] (or [..., K] for a
distribution over data tokens, which never puts mass on [MASK]); indices are [...] int.
Leading axes are [B, L] or [B, L, M] (M = FQ sub-tokens, each an independent diffusion
channel; nothing here distinguishes them). A timestep array has the shape of a prefix of
the leading axes (usually [B]) and is broadcast over the rest.

Probabilities of zero are represented by LOG_ZERO = −70 and every log-probability is
clamped to [LOG_ZERO, 0], as in the released code; exp(−70) ≈ 4e-31 is a normal float32.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from rvq_jax.ops import _checks

LOG_ZERO = -70.0


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["log_a", "log_b", "log_c", "log_1m_c", "log_cum_a", "log_cum_b",
                 "log_cum_c", "log_1m_cum_c"],
    meta_fields=["vocab_size", "num_timesteps"])
@dataclasses.dataclass(frozen=True)
class DiffusionSchedule:
  """Per-step and cumulative log-probabilities of the forward process; every array is [T].

  Index t is step t (0-based, see the module docstring). One step t: keep a_t, replace
  (per code) b_t, mask c_t. Cumulative after steps 0..t: keep ā_t, replace b̄_t, mask γ̄_t
  (`cum_c`), with ā_t + K·b̄_t + γ̄_t = 1.
  """
  log_a: jax.Array
  log_b: jax.Array
  log_c: jax.Array
  log_1m_c: jax.Array
  log_cum_a: jax.Array
  log_cum_b: jax.Array
  log_cum_c: jax.Array
  log_1m_cum_c: jax.Array
  vocab_size: int
  num_timesteps: int


def make_schedule(num_timesteps: int, vocab_size: int, *, alpha_start: float = 0.99999,
                  alpha_end: float = 9e-6, mask_start: float = 9e-6,
                  mask_end: float = 0.99999) -> DiffusionSchedule:
  """The released code's schedule ('alpha1'): ā_t and γ̄_t linear in t.

  ā_t falls linearly from `alpha_start` (t=0) to `alpha_end` (t=T−1); γ̄_t rises
  linearly from `mask_start` to `mask_end`. Then a_t = ā_t/ā_{t−1},
  c_t = 1 − (1−γ̄_t)/(1−γ̄_{t−1}), b_t = (1 − a_t − c_t)/K with ā_{−1}=1, γ̄_{−1}=0.
  Computed in float64 (b_t is a small difference of numbers near 1) and stored as
  float32 logs.

  Args:
    num_timesteps: T ≥ 2.
    vocab_size: K, the number of codes (the [MASK] class is extra).

  Returns:
    The schedule; its arrays are [T] float32.
  """
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}.")
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be positive, got {vocab_size}.")
  if not (0 < alpha_end < alpha_start <= 1 and 0 <= mask_start < mask_end < 1
          and alpha_start + mask_start <= 1 and alpha_end + mask_end <= 1):
    raise ValueError("the schedule needs 0 < alpha_end < alpha_start <= 1, "
                     "0 <= mask_start < mask_end < 1 and alpha + mask <= 1 at both ends.")
  steps = np.arange(num_timesteps, dtype=np.float64) / (num_timesteps - 1)
  cum_a = alpha_start + steps * (alpha_end - alpha_start)
  cum_c = mask_start + steps * (mask_end - mask_start)
  prev_cum_a = np.concatenate([[1.0], cum_a[:-1]])
  prev_cum_c = np.concatenate([[0.0], cum_c[:-1]])
  a = cum_a / prev_cum_a
  c = 1.0 - (1.0 - cum_c) / (1.0 - prev_cum_c)
  b = (1.0 - a - c) / vocab_size
  cum_b = (1.0 - cum_a - cum_c) / vocab_size
  if (b <= 0).any() or (cum_b <= 0).any():
    raise ValueError("the schedule gives a non-positive replacement probability; "
                     "keep alpha + mask < 1.")

  def log(x):
    return jnp.asarray(np.maximum(np.log(x), LOG_ZERO), jnp.float32)

  return DiffusionSchedule(
      log_a=log(a), log_b=log(b), log_c=log(c), log_1m_c=log(1.0 - c),
      log_cum_a=log(cum_a), log_cum_b=log(cum_b), log_cum_c=log(cum_c),
      log_1m_cum_c=log(1.0 - cum_c), vocab_size=int(vocab_size),
      num_timesteps=int(num_timesteps))


# ---------------------------------------------------------------- helpers


def log_onehot(indices: jax.Array, num_classes: int) -> jax.Array:
  """[...] int → [..., num_classes] float32 log one-hot (0 at the index, LOG_ZERO elsewhere)."""
  return jnp.where(jax.nn.one_hot(indices, num_classes, dtype=jnp.bool_), 0.0, LOG_ZERO)


def _log1mexp(x: jax.Array) -> jax.Array:
  """log(1 − eˣ) for x ≤ 0, accurate at both ends, floored at LOG_ZERO."""
  x = jnp.minimum(x, -1e-30)
  out = jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))
  return jnp.maximum(out, LOG_ZERO)


def _clamp(log_p: jax.Array) -> jax.Array:
  return jnp.clip(log_p, LOG_ZERO, 0.0)


def _check_t(t) -> jax.Array:
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"timesteps must be integers, got dtype {t.dtype}.")
  return t


def _at(table: jax.Array, t: jax.Array, ndim: int, *, allow_minus_one: bool = False,
        minus_one_value: float = 0.0) -> jax.Array:
  """table[t] reshaped to broadcast against an [*t.shape, ...] array of rank `ndim`."""
  if t.ndim > ndim:
    raise ValueError(f"timesteps of shape {tuple(t.shape)} have more axes than the "
                     f"distribution's {ndim - 1} leading axes.")
  if allow_minus_one:
    value = jnp.where(t < 0, minus_one_value, table[jnp.maximum(t, 0)])
  else:
    value = table[t]
  return value.reshape(t.shape + (1,) * (ndim - t.ndim))


def _cumulative(schedule: DiffusionSchedule, t: jax.Array, ndim: int):
  """(log ā, log b̄, log γ̄, log 1−γ̄) at t ∈ [−1, T), broadcastable to rank `ndim`."""
  return (_at(schedule.log_cum_a, t, ndim, allow_minus_one=True, minus_one_value=0.0),
          _at(schedule.log_cum_b, t, ndim, allow_minus_one=True, minus_one_value=LOG_ZERO),
          _at(schedule.log_cum_c, t, ndim, allow_minus_one=True, minus_one_value=LOG_ZERO),
          _at(schedule.log_1m_cum_c, t, ndim, allow_minus_one=True, minus_one_value=0.0))


def _data_part(log_x0: jax.Array, vocab_size: int) -> jax.Array:
  """The K data classes of a [..., K] or [..., K+1] distribution ([MASK] has no mass at x_0)."""
  if log_x0.shape[-1] not in (vocab_size, vocab_size + 1):
    raise ValueError(f"a distribution over x_0 must have K={vocab_size} or K+1="
                     f"{vocab_size + 1} classes on its last axis, got shape "
                     f"{tuple(log_x0.shape)}.")
  return log_x0[..., :vocab_size].astype(jnp.float32)


def _mix(log_x: jax.Array, log_keep, log_replace, log_mask, log_unmasked) -> jax.Array:
  """log of one mask-and-replace transition applied to a distribution that sums to 1.

  Non-mask class k: x_k·keep + replace (the replace mass arrives from every non-mask
  class, Σ x = 1 of it, assuming x sums to 1); [MASK]: x_K·(1 − mask) + mask.
  """
  log_x = log_x.astype(jnp.float32)
  codes = jnp.logaddexp(log_x[..., :-1] + log_keep, log_replace)
  mask = jnp.logaddexp(log_x[..., -1:] + log_unmasked, log_mask)
  return _clamp(jnp.concatenate([codes, mask], axis=-1))


# ---------------------------------------------------------------- forward process


def log_q_xt_given_x0(log_x0: jax.Array, t, schedule: DiffusionSchedule) -> jax.Array:
  """Closed-form marginal q(x_t | x_0), for a one-hot or any distribution over x_0.

  Linear in the distribution, so a predicted p(x_0) gives Σ_{x0} q(x_t|x_0) p(x_0).

  Args:
    log_x0: [..., K] or [..., K+1] log-probabilities of x_0 (summing to 1).
    t: timesteps in [−1, T), shape a prefix of `log_x0`'s leading axes; −1 returns x_0.
    schedule: from `make_schedule`.

  Returns:
    [..., K+1] log q(x_t | x_0).
  """
  t = _check_t(t)
  log_x0 = _data_part(log_x0, schedule.vocab_size)
  log_x0 = jnp.concatenate([log_x0, jnp.full_like(log_x0[..., :1], LOG_ZERO)], axis=-1)
  cum_a, cum_b, cum_c, one_minus_cum_c = _cumulative(schedule, t, log_x0.ndim)
  return _mix(log_x0, cum_a, cum_b, cum_c, one_minus_cum_c)


def log_q_xt_given_xtm1(log_x_prev: jax.Array, t, schedule: DiffusionSchedule) -> jax.Array:
  """One forward step q(x_t | x_{t−1}) applied to a distribution over x_{t−1}.

  Args:
    log_x_prev: [..., K+1] log-probabilities of x_{t−1} (summing to 1).
    t: timesteps in [0, T), shape a prefix of the leading axes.
    schedule: from `make_schedule`.

  Returns:
    [..., K+1] log-probabilities of x_t.
  """
  t = _check_t(t)
  if log_x_prev.shape[-1] != schedule.vocab_size + 1:
    raise ValueError(f"log_x_prev must have K+1={schedule.vocab_size + 1} classes, got "
                     f"shape {tuple(log_x_prev.shape)}.")
  nd = log_x_prev.ndim
  return _mix(log_x_prev, _at(schedule.log_a, t, nd), _at(schedule.log_b, t, nd),
              _at(schedule.log_c, t, nd), _at(schedule.log_1m_c, t, nd))


def q_sample(key: jax.Array, x0: jax.Array, t, schedule: DiffusionSchedule) -> jax.Array:
  """Samples x_t ~ q(x_t | x_0) for token indices.

  One uniform per token picks keep (prob ā_t), mask (γ̄_t) or replace-uniformly (K·b̄_t),
  and a second picks the replacement code; exact, and cheaper than a Gumbel-max over K+1.

  Args:
    key: PRNG key.
    x0: [...] int data tokens in [0, K).
    t: timesteps in [0, T), shape a prefix of `x0`'s axes.
    schedule: from `make_schedule`.

  Returns:
    [...] int32 x_t in [0, K]; K = [MASK].
  """
  t = _check_t(t)
  nd = x0.ndim + 1
  cum_a, _, cum_c, _ = _cumulative(schedule, t, nd)
  keep = jnp.exp(cum_a[..., 0])
  mask = jnp.exp(cum_c[..., 0])
  choice_key, code_key = jax.random.split(key)
  u = jax.random.uniform(choice_key, x0.shape)
  replacement = jax.random.randint(code_key, x0.shape, 0, schedule.vocab_size, jnp.int32)
  x0 = x0.astype(jnp.int32)
  out = jnp.where(u < keep, x0, replacement)
  return jnp.where(u >= 1.0 - mask, jnp.int32(schedule.vocab_size), out)


def log_q_posterior(log_x0: jax.Array, x_t: jax.Array, t, schedule: DiffusionSchedule, *,
                    s=None) -> jax.Array:
  """q(x_s | x_t, x_0) for s < t (default s = t−1), averaged over a distribution of x_0.

  With p(x_0) one-hot this is the true posterior; with the network's p(x_0|x_t) it is the
  model's reverse step p_θ(x_s|x_t) = Σ_{x0} q(x_s|x_t, x_0) p(x_0|x_t). By Bayes,
  q(x_s|x_t,x_0) = q(x_t|x_s) q(x_s|x_0) / q(x_t|x_0), so the sum is
  q(x_t|x_s) · Σ_{x0} q(x_s|x_0) w(x_0) with w(x_0) = p(x_0)/q(x_t|x_0): the inner sum is
  the closed-form marginal applied to w, normalized to a distribution first and its
  log-normalizer added back (the released code's trick; the marginal is linear only for
  inputs that sum to 1). q(x_t|x_s) is the (t−s)-step transition, itself mask-and-replace
  with keep ā_t/ā_s, mask (γ̄_t−γ̄_s)/(1−γ̄_s) and replace
  b̄_t(1 − ā_t b̄_s/(ā_s b̄_t))/(1−γ̄_s), written so that no small number is a difference
  of float32 numbers near 1. s < t − 1 is
  the strided (fast-sampling) step; s = −1 gives a distribution over x_0 itself.

  Args:
    log_x0: [..., K] or [..., K+1] log p(x_0) (summing to 1; may be a one-hot).
    x_t: [...] int tokens at time t, in [0, K].
    t: timesteps in [0, T), shape a prefix of `x_t`'s axes.
    schedule: from `make_schedule`.
    s: target timesteps in [−1, t), same shape rules; default t − 1.

  Returns:
    [..., K+1] log q(x_s | x_t, p(x_0)), summing to 1 (up to the LOG_ZERO floor).
  """
  t = _check_t(t)
  s = t - 1 if s is None else _check_t(s)
  vocab = schedule.vocab_size
  log_x0 = _data_part(log_x0, vocab)
  if x_t.shape != log_x0.shape[:-1]:
    raise ValueError(f"x_t has shape {tuple(x_t.shape)} but log_x0 has leading shape "
                     f"{tuple(log_x0.shape[:-1])}.")
  nd = log_x0.ndim
  is_mask = (x_t == vocab)[..., None]
  is_xt = jax.nn.one_hot(x_t, vocab, dtype=jnp.bool_)  # all False where x_t is [MASK]

  # log q(x_t | x_0 = k) for every data class k (symmetric in x_t and x_0).
  cum_a_t, cum_b_t, cum_c_t, one_minus_cum_c_t = _cumulative(schedule, t, nd)
  log_qt = jnp.where(is_mask, cum_c_t, jnp.where(is_xt, jnp.logaddexp(cum_a_t, cum_b_t),
                                                 cum_b_t))
  weights = log_x0 - log_qt
  log_norm = jax.nn.logsumexp(weights, axis=-1, keepdims=True)
  weights = weights - log_norm

  # Σ_{x0} q(x_s | x_0) w(x_0): the marginal at s of the normalized weights.
  cum_a_s, cum_b_s, cum_c_s, one_minus_cum_c_s = _cumulative(schedule, s, nd)
  weights = jnp.concatenate([weights, jnp.full_like(weights[..., :1], LOG_ZERO)], axis=-1)
  log_marginal_s = _mix(weights, cum_a_s, cum_b_s, cum_c_s, one_minus_cum_c_s)

  # The (t−s)-step transition q(x_t | x_s = j), as a function of j.
  log_keep = cum_a_t - cum_a_s
  log_mask = cum_c_t + _log1mexp(cum_c_s - cum_c_t) - one_minus_cum_c_s
  log_replace = (cum_b_t + _log1mexp(cum_a_t + cum_b_s - cum_b_t - cum_a_s)
                 - one_minus_cum_c_s)
  log_lik_codes = jnp.where(is_mask, log_mask,
                            jnp.where(is_xt, jnp.logaddexp(log_keep, log_replace),
                                      log_replace))
  # From [MASK] the chain can only stay [MASK].
  log_lik_mask = jnp.where(is_mask, 0.0, LOG_ZERO)
  log_lik = jnp.concatenate([log_lik_codes, log_lik_mask], axis=-1)
  return _clamp(log_marginal_s + log_lik + log_norm)


SKIP_RULES = ("exact", "released")


def log_strided_posterior(log_x0: jax.Array, x_t: jax.Array, t, s,
                          schedule: DiffusionSchedule, *, rule: str = "exact") -> jax.Array:
  """The model's reverse step x_t → x_s (s < t) of fast sampling, under a skip rule.

  'exact' (default): the true (t−s)-step posterior q(x_s | x_t, p(x_0)) of
  `log_q_posterior`, which accounts for every skipped step.
  'released': VQ-Diffusion's released `sample_fast`: the ONE-step posterior of step
  s+1 → s, evaluated as if the current tokens were x_{s+1}, i.e.
  `log_q_posterior(log_x0, x_t, s + 1, schedule, s=s)`. It weighs p(x_0) by step s+1's
  marginal q(x_{s+1}|x_0) instead of q(x_t|x_0), and uses a single step's transition
  (keep a_{s+1}, mask c_{s+1}) for the likelihood of x_t instead of the t−s steps'
  composition. A [MASK] token stays [MASK] with probability γ̄_s/γ̄_{s+1} instead of
  γ̄_s/γ̄_t, so each strided step unmasks about one step's share of the tokens and the
  rest are left for the final steps. With s = t − 1 (no step skipped) the two rules are
  the same function.

  Args:
    log_x0: [..., K] or [..., K+1] log p(x_0 | x_t) (summing to 1).
    x_t: [...] int tokens at time t, in [0, K].
    t: timesteps in [0, T), shape a prefix of `x_t`'s axes.
    s: target timesteps in [−1, t), same shape rules.
    schedule: from `make_schedule`.
    rule: one of `SKIP_RULES`.

  Returns:
    [..., K+1] log-probabilities of x_s.
  """
  # What the released code does (microsoft/VQ-Diffusion at d1d3948,
  # image_synthesis/modeling/transformers/diffusion_transformer.py):
  # * `sample_fast` (l. 620-684) visits t = T−1, T−2−skip_step, … (l. 664: stride
  #   skip_step + 1) and appends t = 0 when the range misses it (l. 665-666). At each t the
  #   network, told t, predicts p(x_0|x_t) (l. 671); then `q_posterior` is evaluated at
  #   u = t − skip_step when t > skip_step, else at u = t (l. 672-675), and the result is
  #   Gumbel-sampled (l. 677).
  # * `q_posterior(p(x_0), x_t, u)` (l. 235-267) is the one-step posterior over x_{u−1}:
  #   p(x_0) divided by q(x_t|x_0) at cumulative step u (l. 244-250; γ̄_u where x_t is
  #   [MASK]), normalized (l. 262-265), pushed through the cumulative marginal at u − 1
  #   (`q_pred`, l. 266), times the one-step likelihood q(x_t|x_{u−1}) with a_u, b_u, c_u
  #   (`q_pred_one_timestep`, l. 253-258), log-normalizer added back, clamped (l. 267).
  # The next visited step is t − skip_step − 1 = u − 1, so each strided step draws x_s
  # from step u = s + 1's one-step posterior: that is the rule here, applied to our own
  # timestep list (`sampling_timesteps`). The released tail differs: a visited t ≤
  # skip_step (t > 0) uses u = t and lands on x_{t−1} although the next visited step is
  # 0, which happens when (T−1) mod (skip_step+1) ≥ 2; with u = s + 1 we never do that.
  if rule not in SKIP_RULES:
    raise ValueError(f"skip rule must be one of {SKIP_RULES}, got {rule!r}.")
  t, s = _check_t(t), _check_t(s)
  if rule == "released":
    t = s + 1
  return log_q_posterior(log_x0, x_t, t, schedule, s=s)


# ---------------------------------------------------------------- losses


def multinomial_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """KL(p ‖ q) over the last axis: [..., C], [..., C] → [...]."""
  _checks.check_same_shape(("log_p", "log_q"), log_p, log_q)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def vlb_terms(x0: jax.Array, log_p_x0: jax.Array, x_t: jax.Array, t,
              schedule: DiffusionSchedule) -> jax.Array:
  """Per-token VLB term L_t in nats, for the network's prediction p(x_0 | x_t).

  t > 0: KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)); t = 0: the decoder NLL
  −log p_θ(x_{−1} = x_0 | x_t). The prior term at T is separate (`prior_kl`).

  Args:
    x0: [...] int data tokens in [0, K).
    log_p_x0: [..., K] (or K+1) predicted log p(x_0 | x_t).
    x_t: [...] int noisy tokens in [0, K].
    t: timesteps in [0, T), shape a prefix of `x0`'s axes.
    schedule: from `make_schedule`.

  Returns:
    [...] float32 per-token loss.
  """
  t = _check_t(t)
  _checks.check_same_shape(("x0", "x_t"), x0, x_t)
  num_classes = schedule.vocab_size + 1
  log_true = log_q_posterior(log_onehot(x0, num_classes), x_t, t, schedule)
  log_model = log_q_posterior(log_p_x0, x_t, t, schedule)
  kl = multinomial_kl(log_true, log_model)
  nll = -jnp.take_along_axis(log_model, x0[..., None].astype(jnp.int32), axis=-1)[..., 0]
  is_first = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim)) == 0
  return jnp.where(is_first, nll, kl)


def prior_kl(x0: jax.Array, schedule: DiffusionSchedule) -> jax.Array:
  """KL(q(x_{T−1} | x_0) ‖ all-[MASK]) per token: the VLB's prior term (≈ 0 by design).

  The all-[MASK] prior is floored at LOG_ZERO like every other zero probability, so the
  term is finite: about (1−γ̄_{T−1})·70 ≈ 7e-4 nats with the default schedule.
  """
  num_classes = schedule.vocab_size + 1
  t_last = jnp.int32(schedule.num_timesteps - 1)
  log_q = log_q_xt_given_x0(log_onehot(x0, num_classes), t_last, schedule)
  log_prior = log_onehot(jnp.full(x0.shape, schedule.vocab_size, jnp.int32), num_classes)
  return multinomial_kl(log_q, log_prior)


def x0_cross_entropy(x0: jax.Array, log_p_x0: jax.Array) -> jax.Array:
  """−log p(x_0) per token: KL(one-hot x_0 ‖ p(x_0|x_t)), VQ-Diffusion's auxiliary loss.

  Args:
    x0: [...] int data tokens in [0, K).
    log_p_x0: [..., K] (or K+1) predicted log-probabilities.

  Returns:
    [...] float32.
  """
  if log_p_x0.shape[:-1] != x0.shape:
    raise ValueError(f"x0 has shape {tuple(x0.shape)} but log_p_x0 has leading shape "
                     f"{tuple(log_p_x0.shape[:-1])}.")
  picked = jnp.take_along_axis(log_p_x0.astype(jnp.float32),
                               x0[..., None].astype(jnp.int32), axis=-1)
  return -picked[..., 0]


def adaptive_aux_weight(t, num_timesteps: int) -> jax.Array:
  """The released code's adaptive auxiliary weight 2 − t/T: early (cleaner) steps count more."""
  return 2.0 - jnp.asarray(t, jnp.float32) / num_timesteps


# ---------------------------------------------------------------- importance sampling


def timestep_probs(loss_sq: jax.Array, counts: jax.Array, *, min_count: int = 10) -> jax.Array:
  """p(t) for importance sampling: ∝ sqrt(E[L_t²]), uniform until every t is warm.

  As the released code: uniform until every t has been seen more than `min_count` times;
  then ∝ sqrt(E[L_t²] + 1e-10) + 1e-4, with t=0 (the decoder NLL, on a different scale)
  given t=1's weight.

  Args:
    loss_sq: [T] running mean of L_t² per timestep.
    counts: [T] how often each t has been trained on.
    min_count: warm-up threshold.

  Returns:
    [T] float32 probabilities summing to 1.
  """
  if loss_sq.ndim != 1 or loss_sq.shape != counts.shape:
    raise ValueError(f"loss_sq and counts must both be [T], got {tuple(loss_sq.shape)} and "
                     f"{tuple(counts.shape)}.")
  num_timesteps = loss_sq.shape[0]
  weight = jnp.sqrt(loss_sq.astype(jnp.float32) + 1e-10) + 1e-4
  weight = weight.at[0].set(weight[1])
  importance = weight / jnp.sum(weight)
  uniform = jnp.full((num_timesteps,), 1.0 / num_timesteps, jnp.float32)
  warm = jnp.all(counts > min_count)
  return jnp.where(warm, importance, uniform)


def sample_timesteps(key: jax.Array, batch_size: int, loss_sq: jax.Array, counts: jax.Array,
                     *, min_count: int = 10) -> tuple[jax.Array, jax.Array]:
  """Draws t ~ `timestep_probs` for each sample; L_t/p(t) is then unbiased for Σ_t L_t.

  Returns:
    (t [batch_size] int32, pt [batch_size] float32 = p(t) of each draw).
  """
  probs = timestep_probs(loss_sq, counts, min_count=min_count)
  t = jax.random.categorical(key, jnp.log(probs), shape=(batch_size,)).astype(jnp.int32)
  return t, probs[t]


def update_loss_history(loss_sq: jax.Array, counts: jax.Array, t: jax.Array,
                        loss_t: jax.Array, *, decay: float = 0.9
                        ) -> tuple[jax.Array, jax.Array]:
  """EMA update of E[L_t²] with a batch of per-sample losses at timesteps t.

  Each t seen in the batch moves once, towards the batch mean of L_t² at that t (the
  released code writes samples one by one, so with repeated t the last write wins).
  Sums over the batch are global under `jax.jit` with a sharded batch.

  Args:
    loss_sq: [T] running E[L_t²].
    counts: [T] samples seen per t.
    t: [B] int timesteps.
    loss_t: [B] per-sample losses L_t (not divided by p(t)).
    decay: EMA decay.

  Returns:
    (new loss_sq [T], new counts [T]), dtypes preserved.
  """
  num_timesteps = loss_sq.shape[0]
  hits = jax.nn.one_hot(t, num_timesteps, dtype=jnp.float32)  # [B, T]
  seen = jnp.sum(hits, axis=0)
  total = jnp.sum(hits * jax.lax.stop_gradient(loss_t.astype(jnp.float32))[:, None] ** 2,
                  axis=0)
  batch_mean = total / jnp.maximum(seen, 1.0)
  updated = decay * loss_sq.astype(jnp.float32) + (1.0 - decay) * batch_mean
  new_loss_sq = jnp.where(seen > 0, updated, loss_sq.astype(jnp.float32))
  return new_loss_sq.astype(loss_sq.dtype), counts + seen.astype(counts.dtype)


# ---------------------------------------------------------------- sampling


def truncate(log_probs: jax.Array, rate) -> jax.Array:
  """Keeps the most likely classes up to probability mass `rate`, renormalized.

  A class is kept when the mass of the classes ranked above it is below `rate`, so the
  top class is always kept and the kept mass is the smallest prefix reaching `rate`
  (the released code's "top{r}r"). Dropped classes get LOG_ZERO.

  Args:
    log_probs: [..., C] normalized log-probabilities.
    rate: in (0, 1]; 1 keeps everything. A Python number is checked (and 1 returns
      before any sort); an array (traced or not; a scalar or [..., 1]) is not checked,
      and rate >= 1 returns the input unchanged as the Python 1 does, so one program
      serves every rate.

  Returns:
    [..., C] float32 log-probabilities.
  """
  static = isinstance(rate, numbers.Real)
  if static:
    if not 0.0 < float(rate) <= 1.0:
      raise ValueError(f"truncation rate must lie in (0, 1], got {rate}.")
    if float(rate) == 1.0:
      return log_probs.astype(jnp.float32)
  else:
    rate = jnp.asarray(rate, jnp.float32)
  log_probs = log_probs.astype(jnp.float32)
  order = jnp.argsort(-log_probs, axis=-1)
  sorted_probs = jnp.exp(jnp.take_along_axis(log_probs, order, axis=-1))
  mass_above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep_sorted = mass_above < rate
  keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
  kept = jnp.where(keep, log_probs, -jnp.inf)
  truncated = jnp.where(keep, _clamp(jax.nn.log_softmax(kept, axis=-1)), LOG_ZERO)
  return truncated if static else jnp.where(rate >= 1.0, log_probs, truncated)


def sample_categorical(key: jax.Array, log_probs: jax.Array) -> jax.Array:
  """Gumbel-max sample of the last axis: [..., C] → [...] int32."""
  noise = jax.random.gumbel(key, log_probs.shape, jnp.float32)
  return jnp.argmax(log_probs.astype(jnp.float32) + noise, axis=-1).astype(jnp.int32)


def sampling_timesteps(num_timesteps: int, num_steps: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """The (t, s) pairs of a reverse pass with `num_steps` ≤ T network evaluations.

  t runs from T−1 down to 0, evenly spaced (rounded), and each step jumps to the next
  t (s = −1 after the last, i.e. to x_0). num_steps = T is the full chain.

  Returns:
    (t [num_steps] int32, s [num_steps] int32), static numpy arrays.
  """
  num_steps = num_timesteps if num_steps is None else int(num_steps)
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must lie in [1, T={num_timesteps}], got {num_steps}.")
  if num_steps == 1:
    t = np.array([num_timesteps - 1])
  else:
    t = np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int64)
  s = np.concatenate([t[1:], [-1]])
  return t.astype(np.int32), s.astype(np.int32)
