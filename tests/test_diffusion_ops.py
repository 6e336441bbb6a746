"""VQ-Diffusion's mask-and-replace process: the log-space ops against explicit matrices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rvq_jax import ops
from rvq_jax.ops import diffusion

K, T = 4, 10


def _reference_schedule(num_timesteps, vocab):
  """float64 one-step (K+1)×(K+1) transition matrices straight from the method's formulas."""
  steps = np.arange(num_timesteps) / (num_timesteps - 1)
  cum_a = 0.99999 + steps * (9e-6 - 0.99999)
  cum_c = 9e-6 + steps * (0.99999 - 9e-6)
  prev_a = np.concatenate([[1.0], cum_a[:-1]])
  prev_c = np.concatenate([[0.0], cum_c[:-1]])
  a = cum_a / prev_a
  c = 1 - (1 - cum_c) / (1 - prev_c)
  b = (1 - a - c) / vocab
  matrices = []
  for t in range(num_timesteps):
    q = np.zeros((vocab + 1, vocab + 1))  # q[i, j] = q(x_t = j | x_{t-1} = i)
    q[:vocab, :vocab] = b[t]
    q[np.arange(vocab), np.arange(vocab)] += a[t]
    q[:vocab, vocab] = c[t]
    q[vocab, vocab] = 1.0
    matrices.append(q)
  return cum_a, cum_c, matrices


def _product(matrices, start, stop):
  """q(x_{stop-1} | x_{start-1}) = Q_start ⋯ Q_{stop-1} (identity when start == stop)."""
  out = np.eye(matrices[0].shape[0])
  for q in matrices[start:stop]:
    out = out @ q
  return out


# ---------------------------------------------------------------- schedule


def test_schedule_matches_the_method_and_composes_to_the_cumulative_one():
  schedule = ops.make_schedule(T, K)
  cum_a, cum_c, _ = _reference_schedule(T, K)
  np.testing.assert_allclose(np.exp(schedule.log_cum_a), cum_a, rtol=1e-5)
  np.testing.assert_allclose(np.exp(schedule.log_cum_c), cum_c, rtol=1e-5)
  assert np.isclose(np.exp(schedule.log_cum_a[0]), 0.99999) and np.isclose(
      np.exp(schedule.log_cum_a[-1]), 9e-6)
  assert np.isclose(np.exp(schedule.log_cum_c[0]), 9e-6) and np.isclose(
      np.exp(schedule.log_cum_c[-1]), 0.99999)
  # ā_t = Π_{u≤t} a_u and 1 − γ̄_t = Π (1 − c_u): the one-step schedule composes.
  np.testing.assert_allclose(np.cumsum(schedule.log_a), schedule.log_cum_a, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.cumsum(schedule.log_1m_c), schedule.log_1m_cum_c,
                             rtol=1e-5, atol=1e-6)
  # Rows of the one-step and cumulative transitions sum to 1; logs are complementary.
  for log_a, log_b, log_c in ((schedule.log_a, schedule.log_b, schedule.log_c),
                              (schedule.log_cum_a, schedule.log_cum_b, schedule.log_cum_c)):
    total = np.exp(np.float64(log_a)) + K * np.exp(np.float64(log_b)) + np.exp(
        np.float64(log_c))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
  np.testing.assert_allclose(np.exp(schedule.log_c) + np.exp(schedule.log_1m_c), 1, atol=1e-6)
  assert all(np.asarray(v).shape == (T,) for v in jax.tree.leaves(schedule))


def test_timestep_zero_is_the_first_noising_step_and_minus_one_is_the_data():
  schedule = ops.make_schedule(T, K)
  _, _, matrices = _reference_schedule(T, K)
  x0 = jnp.arange(K)[None]  # [1, K]
  log_x0 = diffusion.log_onehot(x0, K + 1)
  first = np.exp(ops.log_q_xt_given_x0(log_x0, jnp.array([0]), schedule))[0]
  np.testing.assert_allclose(first, matrices[0][:K], atol=1e-6)
  data = np.exp(ops.log_q_xt_given_x0(log_x0, jnp.array([-1]), schedule))[0]
  np.testing.assert_allclose(data, np.eye(K + 1)[:K], atol=1e-6)


def test_one_step_transitions_chained_reproduce_the_closed_form_marginal():
  schedule = ops.make_schedule(T, K)
  _, _, matrices = _reference_schedule(T, K)
  log_x = diffusion.log_onehot(jnp.arange(K + 1)[None], K + 1)  # every start, [MASK] too
  for t in range(T):
    log_x = ops.log_q_xt_given_xtm1(log_x, jnp.array([t]), schedule)
    np.testing.assert_allclose(np.exp(log_x[0]), _product(matrices, 0, t + 1), atol=2e-5)
    closed = ops.log_q_xt_given_x0(diffusion.log_onehot(jnp.arange(K)[None], K + 1),
                                   jnp.array([t]), schedule)
    np.testing.assert_allclose(np.exp(closed[0]), np.exp(log_x[0, :K]), atol=2e-5)


def test_marginal_of_a_distribution_is_the_mixture_of_marginals():
  schedule = ops.make_schedule(T, K)
  _, _, matrices = _reference_schedule(T, K)
  probs = np.asarray(jax.random.dirichlet(jax.random.key(0), jnp.ones(K), (3, 5)))
  for t in (0, 4, T - 1):
    got = np.exp(ops.log_q_xt_given_x0(jnp.log(probs), jnp.full((3,), t), schedule))
    want = probs @ _product(matrices, 0, t + 1)[:K]
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("t", [0, 3, T // 2, T - 1])
def test_q_sample_frequencies_match_the_closed_form_marginal(t):
  """Per-class binomial bound: |count − n·p| ≤ 5σ + 3 for every class and start token."""
  schedule = ops.make_schedule(T, K)
  n = 4000
  x0 = jnp.tile(jnp.arange(K), (n, 1))  # [n, K]: column k starts at token k
  x_t = np.asarray(ops.q_sample(jax.random.key(t), x0, jnp.full((n,), t), schedule))
  probs = np.exp(ops.log_q_xt_given_x0(diffusion.log_onehot(jnp.arange(K), K + 1),
                                       jnp.int32(t), schedule))
  for k in range(K):
    counts = np.bincount(x_t[:, k], minlength=K + 1)
    expected = n * np.float64(probs[k])
    sigma = np.sqrt(expected * (1 - np.float64(probs[k])))
    assert np.all(np.abs(counts - expected) <= 5 * sigma + 3), (t, k, counts, expected)


def test_at_the_last_step_every_token_is_masked():
  schedule = ops.make_schedule(100, 1024)
  x0 = jax.random.randint(jax.random.key(0), (64, 256), 0, 1024)
  x_t = ops.q_sample(jax.random.key(1), x0, jnp.full((64,), 99), schedule)
  assert np.mean(np.asarray(x_t) == 1024) > 0.999
  log_q = ops.log_q_xt_given_x0(diffusion.log_onehot(x0[:2, :3], 1025), jnp.int32(99),
                                schedule)
  assert np.all(np.exp(log_q[..., -1]) >= 0.99998)


# ---------------------------------------------------------------- posterior


@pytest.mark.parametrize("num_timesteps", [T, 100])
def test_posterior_equals_brute_force_bayes_for_predicted_x0(num_timesteps):
  """Σ_{x0} p(x0) q(x_t|x_s) q(x_s|x0) / q(x_t|x0) from explicit matrices, every s < t."""
  schedule = ops.make_schedule(num_timesteps, K)
  _, _, matrices = _reference_schedule(num_timesteps, K)
  # One row per value of x_t (every code and [MASK]), each with its own p(x0).
  p_x0 = np.asarray(jax.random.dirichlet(jax.random.key(1), jnp.ones(K), (1, K + 1)),
                    np.float64)
  x_t = jnp.arange(K + 1)[None]
  posterior = jax.jit(ops.log_q_posterior)
  times = range(num_timesteps) if num_timesteps <= T else (0, 1, 2, 50, 97, 98, 99)
  for t in times:
    for s in sorted({-1, t - 1, t // 2 - 1} & set(range(-1, t))):
      got = np.exp(np.float64(posterior(
          jnp.log(jnp.asarray(p_x0, jnp.float32)), x_t, jnp.array([t]), schedule,
          s=jnp.array([s]))))[0]
      q_t_given_s = _product(matrices, s + 1, t + 1)  # [x_s, x_t]
      q_s_given_0 = _product(matrices, 0, s + 1)[:K]  # [x0, x_s]
      q_t_given_0 = _product(matrices, 0, t + 1)[:K]  # [x0, x_t]
      for j in range(K + 1):
        want = sum(p_x0[0, j, k] * q_t_given_s[:, j] * q_s_given_0[k] / q_t_given_0[k, j]
                   for k in range(K))
        np.testing.assert_allclose(got[j], want, rtol=1e-3, atol=1e-6, err_msg=f"{t=} {s=} {j=}")
        np.testing.assert_allclose(got[j].sum(), 1.0, atol=1e-5)


def test_true_posterior_is_consistent_with_x_t_and_model_posterior_at_t0_is_p_x0():
  schedule = ops.make_schedule(T, K)
  x0 = jnp.array([[0, 1, 2, 3]])
  x_t = jnp.array([[0, K, 2, 1]])  # kept, masked, kept, replaced
  log_true = np.asarray(ops.log_q_posterior(diffusion.log_onehot(x0, K + 1), x_t,
                                            jnp.array([5]), schedule))
  probs = np.exp(log_true)[0]
  np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
  assert probs[0, 0] > 0.999 and probs[2, 2] > 0.999  # kept tokens stay put
  assert probs[1, [1, K]].sum() > 0.999  # a masked token was either x0 or [MASK] before
  # At t=0 the reverse step lands on the data: p_θ(x_{-1}|x_t) is p(x0|x_t) itself.
  log_p = jax.nn.log_softmax(jax.random.normal(jax.random.key(2), (1, 4, K)))
  got = ops.log_q_posterior(log_p, x_t, jnp.array([0]), schedule)
  np.testing.assert_allclose(np.exp(got[..., :K]), np.exp(log_p), atol=1e-5)


def _released_q_posterior(log_x0, x_t, u, num_timesteps, vocab):
  """VQ-Diffusion's released `q_posterior(log_x_start, log_x_t, t=u)` in float64 NumPy.

  An independent reading of microsoft/VQ-Diffusion's diffusion_transformer.py (l. 53-66
  `alpha_schedule`, l. 177-210 `q_pred_one_timestep`/`q_pred`, l. 235-267
  `q_posterior`), class axis last: log_x0 [N, K] log p(x_0), x_t [N] ints in [0, K],
  u in [0, T) → [N, K+1] log-probabilities over x_{u−1}.
  """
  steps = np.arange(num_timesteps) / (num_timesteps - 1)
  cum_a = 0.99999 + steps * (9e-6 - 0.99999)
  cum_c = 9e-6 + steps * (0.99999 - 9e-6)
  a = cum_a / np.concatenate([[1.0], cum_a[:-1]])
  c = 1 - (1 - cum_c) / (1 - np.concatenate([[0.0], cum_c[:-1]]))
  b = (1 - a - c) / vocab
  # Index T of the cumulative tables is "no noise": q_pred(·, −1) wraps around to it.
  cum_a, cum_c = np.append(cum_a, 1.0), np.append(cum_c, 0.0)
  cum_b = (1 - cum_a - cum_c) / vocab
  with np.errstate(divide="ignore"):
    log_cum_a, log_cum_b, log_cum_c = np.log(cum_a), np.log(cum_b), np.log(cum_c)
  log_1m_cum_c = np.log(1 - cum_c)
  log_zero = np.log(1e-30)

  def mix(log_x, keep, replace, mask, unmasked):
    return np.concatenate([np.logaddexp(log_x[:, :-1] + keep, replace),
                           np.logaddexp(log_x[:, -1:] + unmasked, mask)], axis=1)

  def q_pred(log_x, v):  # q(x_v | x), cumulative
    v = v % (num_timesteps + 1)
    return mix(log_x, log_cum_a[v], log_cum_b[v], log_cum_c[v], log_1m_cum_c[v])

  log_x_t = np.log(np.maximum(np.eye(vocab + 1)[x_t], 1e-30))
  is_mask = (x_t == vocab)[:, None]
  log_qt = np.where(is_mask, log_cum_c[u], q_pred(log_x_t, u)[:, :-1])
  one_step = mix(log_x_t, np.log(a[u]), np.log(b[u]), np.log(c[u]), np.log(1 - c[u]))
  one_step = np.concatenate([one_step[:, :-1], np.full((len(x_t), 1), log_zero)], axis=1)
  one_step = np.where(is_mask, np.append(np.full(vocab, np.log(c[u])), 0.0), one_step)
  q = np.concatenate([log_x0 - log_qt, np.full((len(x_t), 1), log_zero)], axis=1)
  q_norm = np.logaddexp.reduce(q, axis=1, keepdims=True)
  return np.clip(q_pred(q - q_norm, u - 1) + one_step + q_norm, -70, 0)


def test_strided_posterior_rules_coincide_without_a_skip_and_released_is_the_released_formula():
  schedule = ops.make_schedule(T, K)
  # One row per value of x_t (every code and [MASK]), each with its own p(x0).
  p_x0 = np.asarray(jax.random.dirichlet(jax.random.key(4), jnp.ones(K), (K + 1,)),
                    np.float64)
  log_p = jnp.log(jnp.asarray(p_x0, jnp.float32))[None]  # [1, K+1, K]
  x_t = jnp.arange(K + 1)[None]
  step = jax.jit(ops.log_strided_posterior, static_argnames="rule")
  for t in range(T):  # No skip: the same function, and the released formula.
    t_, s_ = jnp.array([t]), jnp.array([t - 1])
    exact = step(log_p, x_t, t_, s_, schedule, rule="exact")
    np.testing.assert_array_equal(step(log_p, x_t, t_, s_, schedule, rule="released"), exact)
    np.testing.assert_allclose(np.exp(exact[0]), np.exp(_released_q_posterior(
        np.log(p_x0), np.arange(K + 1), t, T, K)), rtol=1e-4, atol=1e-6, err_msg=f"{t=}")
  cum_c = np.exp(np.float64(schedule.log_cum_c))
  for t, s in ((9, 4), (7, 3), (5, 1), (2, 0), (5, -1)):  # Skips: the formula at s + 1.
    t_, s_ = jnp.array([t]), jnp.array([s])
    released = np.exp(np.float64(step(log_p, x_t, t_, s_, schedule, rule="released")[0]))
    exact = np.exp(np.float64(step(log_p, x_t, t_, s_, schedule, rule="exact")[0]))
    want = np.exp(_released_q_posterior(np.log(p_x0), np.arange(K + 1), s + 1, T, K))
    np.testing.assert_allclose(released, want, rtol=1e-4, atol=1e-6, err_msg=f"{t=} {s=}")
    if s >= 0:  # A jump to x_0 (s = −1) draws from p(x_0) under either rule.
      assert np.abs(released - exact).max() > 1e-2, (t, s)
    # A [MASK] stays [MASK] with γ̄_s/γ̄_{s+1} (released) against γ̄_s/γ̄_t (exact).
    stay = cum_c[s] if s >= 0 else 0.0
    np.testing.assert_allclose(released[K, K], stay / cum_c[s + 1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(exact[K, K], stay / cum_c[t], rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match=r"skip rule must be one of \('exact', 'released'\)"):
    ops.log_strided_posterior(log_p, x_t, jnp.array([3]), jnp.array([1]), schedule,
                              rule="ddim")


def test_sub_token_channels_broadcast_the_timestep():
  """[B, L, M] with t [B] equals the same tokens flattened to [B, L·M]."""
  schedule = ops.make_schedule(T, K)
  key = jax.random.key(3)
  x0 = jax.random.randint(key, (2, 6, 3), 0, K)
  t = jnp.array([2, 7])
  x_t = ops.q_sample(key, x0, t, schedule)
  log_p = jax.nn.log_softmax(jax.random.normal(key, (2, 6, 3, K)))
  vlb_terms = jax.jit(ops.vlb_terms)
  got = vlb_terms(x0, log_p, x_t, t, schedule)
  flat = vlb_terms(x0.reshape(2, 18), log_p.reshape(2, 18, K), x_t.reshape(2, 18), t,
                   schedule)
  np.testing.assert_allclose(got.reshape(2, 18), flat, rtol=1e-6)
  np.testing.assert_array_equal(x_t.reshape(2, 18),
                                ops.q_sample(key, x0.reshape(2, 18), t, schedule))


# ---------------------------------------------------------------- losses


def test_vlb_terms_are_finite_with_finite_gradients_at_every_t():
  schedule = ops.make_schedule(T, K)
  key = jax.random.key(4)
  x0 = jax.random.randint(key, (T, 16), 0, K)
  t = jnp.arange(T)  # one row per timestep, t = 0 and T−1 included
  x_t = ops.q_sample(key, x0, t, schedule)
  logits = jax.random.normal(key, (T, 16, K)) * 3

  def loss(logits):
    return jnp.sum(ops.vlb_terms(x0, jax.nn.log_softmax(logits), x_t, t, schedule))

  vlb_terms = jax.jit(ops.vlb_terms)
  terms = vlb_terms(x0, jax.nn.log_softmax(logits), x_t, t, schedule)
  assert np.isfinite(terms).all() and (np.asarray(terms) >= -1e-5).all()
  grad = jax.jit(jax.grad(loss))(logits)
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
  # A perfect prediction has zero KL at t > 0 and zero NLL at t = 0.
  perfect = vlb_terms(x0, diffusion.log_onehot(x0, K), x_t, t, schedule)
  np.testing.assert_allclose(perfect, 0, atol=1e-4)
  # The decoder term is the model's cross-entropy at t = 0.
  np.testing.assert_allclose(terms[0], diffusion.x0_cross_entropy(
      x0[0], jax.nn.log_softmax(logits[0])), rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(diffusion.prior_kl(x0, schedule)) < 1e-2)


# ---------------------------------------------------------------- importance sampling


def test_timestep_sampling_is_uniform_until_warm_then_proportional_to_rms_loss():
  loss_sq = jnp.arange(1.0, T + 1) ** 2
  counts = jnp.full((T,), 11, jnp.int32).at[3].set(10)  # one t not yet seen > 10 times
  probs = diffusion.timestep_probs(loss_sq, counts)
  np.testing.assert_allclose(probs, 1 / T, rtol=1e-6)
  t, pt = ops.sample_timesteps(jax.random.key(0), 64, loss_sq, counts)
  np.testing.assert_allclose(pt, 1 / T, rtol=1e-6)
  assert t.dtype == jnp.int32 and 0 <= int(t.min()) and int(t.max()) < T

  counts = counts.at[3].set(11)
  probs = np.asarray(diffusion.timestep_probs(loss_sq, counts))
  np.testing.assert_allclose(probs.sum(), 1, rtol=1e-6)
  weights = np.sqrt(np.asarray(loss_sq) + 1e-10) + 1e-4
  weights[0] = weights[1]  # the decoder term borrows t=1's weight
  np.testing.assert_allclose(probs, weights / weights.sum(), rtol=1e-5)
  t, pt = ops.sample_timesteps(jax.random.key(1), 20000, loss_sq, counts)
  np.testing.assert_allclose(pt, probs[np.asarray(t)], rtol=1e-6)
  frequencies = np.bincount(np.asarray(t), minlength=T) / 20000
  np.testing.assert_allclose(frequencies, probs, atol=0.015)


def test_loss_history_update_is_a_per_timestep_ema_and_the_same_sharded():
  loss_sq = jnp.arange(T, dtype=jnp.float32)
  counts = jnp.zeros((T,), jnp.int32)
  t = jnp.array([1, 1, 4, 9, 1, 4, 0, 0], jnp.int32)
  loss_t = jnp.arange(8, dtype=jnp.float32)
  new_sq, new_counts = ops.update_loss_history(loss_sq, counts, t, loss_t)
  want = np.arange(T, dtype=np.float64)
  for step in range(T):
    hit = np.asarray(t) == step
    if hit.any():
      want[step] = 0.9 * want[step] + 0.1 * np.mean(np.asarray(loss_t)[hit] ** 2)
  np.testing.assert_allclose(new_sq, want, rtol=1e-6)
  np.testing.assert_array_equal(new_counts, np.bincount(np.asarray(t), minlength=T))
  mesh = jax.make_mesh((8,), ("data",))
  shard = NamedSharding(mesh, P("data"))
  sharded = jax.jit(ops.update_loss_history)(loss_sq, counts, jax.device_put(t, shard),
                                             jax.device_put(loss_t, shard))
  np.testing.assert_allclose(sharded[0], new_sq, rtol=1e-6)
  np.testing.assert_array_equal(sharded[1], new_counts)


# ---------------------------------------------------------------- sampling helpers


def test_truncate_keeps_the_smallest_prefix_reaching_the_mass_and_renormalizes():
  probs = np.array([[0.1, 0.5, 0.04, 0.3, 0.06], [0.04, 0.06, 0.8, 0.05, 0.05]])
  log_p = jnp.log(jnp.asarray(probs, jnp.float32))
  out = np.exp(ops.truncate(log_p, 0.85))
  # Row 0: 0.5, 0.3 and 0.1 (0.8 above it < 0.85), not 0.06 (0.9 above it).
  np.testing.assert_allclose(out[0], [0.1 / 0.9, 0.5 / 0.9, 0, 0.3 / 0.9, 0], atol=1e-6)
  np.testing.assert_allclose(out[1], [0, 0.06 / 0.86, 0.8 / 0.86, 0, 0], atol=1e-6)
  out = np.exp(ops.truncate(log_p, 0.75))
  np.testing.assert_allclose(out[0], [0, 0.5 / 0.8, 0, 0.3 / 0.8, 0], atol=1e-6)
  np.testing.assert_allclose(ops.truncate(log_p, 1.0), log_p)
  assert np.exp(ops.truncate(log_p, 1e-3)).max(-1).tolist() == [1.0, 1.0]  # top-1 kept
  for bad in (0.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"truncation rate must lie in \(0, 1\]"):
      ops.truncate(log_p, bad)


def test_sampling_timesteps_full_and_strided():
  t, s = diffusion.sampling_timesteps(T)
  np.testing.assert_array_equal(t, np.arange(T - 1, -1, -1))
  np.testing.assert_array_equal(s, np.arange(T - 2, -2, -1))
  t, s = diffusion.sampling_timesteps(T, 4)
  assert t[0] == T - 1 and t[-1] == 0 and s[-1] == -1 and len(set(t.tolist())) == 4
  assert np.all(np.diff(t) < 0) and np.all(s < t)
  with pytest.raises(ValueError, match=r"num_steps must lie in \[1, T=10\]"):
    diffusion.sampling_timesteps(T, T + 1)


def test_bad_arguments_fail_early_with_clear_messages():
  schedule = ops.make_schedule(T, K)
  with pytest.raises(ValueError, match="num_timesteps must be >= 2"):
    ops.make_schedule(1, K)
  with pytest.raises(ValueError, match="K=4 or K\\+1=5 classes"):
    ops.log_q_xt_given_x0(jnp.zeros((2, 3, 7)), jnp.zeros((2,), jnp.int32), schedule)
  with pytest.raises(ValueError, match="x_t has shape"):
    ops.log_q_posterior(jnp.zeros((2, 3, K)), jnp.zeros((2, 4), jnp.int32),
                        jnp.zeros((2,), jnp.int32), schedule)
  with pytest.raises(ValueError, match="timesteps must be integers"):
    ops.q_sample(jax.random.key(0), jnp.zeros((2, 3), jnp.int32), jnp.zeros((2,)), schedule)
