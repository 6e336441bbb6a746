"""Properties of the pure quantizer ops, each against an independent reference."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from rvq_jax import ops


def _np_entropy(p):
  p = np.asarray(p, np.float64)
  nz = p[p > 0]
  return -np.sum(nz * np.log(nz))


def _mesh8():
  return jax.make_mesh((8,), ("data",))


def _shard_rows(x, mesh):
  return jax.device_put(x, NamedSharding(mesh, P("data")))


# ---------------------------------------------------------------- nearest code


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
@pytest.mark.parametrize("num_vectors", [17, 700])  # 700 rows: several CPU row blocks.
def test_nearest_code_equals_brute_force_argmin(chunk_size, num_vectors, monkeypatch):
  monkeypatch.setattr(ops.distances, "CPU_BLOCK_ENTRIES", 4096)
  z = np.asarray(jax.random.normal(jax.random.key(0), (3, num_vectors, 8)))
  codebook = np.asarray(jax.random.normal(jax.random.key(1), (100, 8)))
  brute = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  got = ops.nearest_code(jnp.asarray(z), jnp.asarray(codebook), chunk_size=chunk_size)
  assert got.dtype == jnp.int32 and got.shape == (3, num_vectors)
  np.testing.assert_array_equal(np.asarray(got), brute)


@pytest.mark.parametrize("chunk_size", [None, 3, 4])
def test_nearest_code_ties_go_to_lowest_index(chunk_size):
  codebook = jnp.array([[5.0, 5.0], [1.0, 0.0], [9.0, 9.0], [1.0, 0.0], [1.0, 0.0]])
  z = jnp.array([[1.0, 0.1], [0.9, -0.2]])
  np.testing.assert_array_equal(ops.nearest_code(z, codebook, chunk_size=chunk_size), [1, 1])


def test_nearest_code_memory_is_bounded_for_a_huge_codebook():
  """K = 262144, N = 4096, D = 8: an unchunked search needs 4 GiB of scores; ours < 2 GiB."""
  z = jax.ShapeDtypeStruct((4096, 8), jnp.float32)
  codebook = jax.ShapeDtypeStruct((262144, 8), jnp.float32)

  def temp_bytes(fn):
    return jax.jit(fn).lower(z, codebook).compile().memory_analysis().temp_size_in_bytes

  def naive(z, codebook):
    return jnp.argmin(ops.code_distances(z, codebook), axis=-1)

  ours = temp_bytes(ops.nearest_code)
  assert temp_bytes(naive) >= 4 * 2**30  # The measurement sees a full [N, K] matrix.
  assert ours < 2 * 2**30 / 4, f"nearest_code needs {ours / 2**30:.2f} GiB of scratch"


@pytest.mark.parametrize("blocks", [False, True])
def test_nearest_code_approximate_search_meets_its_recall_target(blocks, monkeypatch):
  """approx_min_k's recall against the brute-force argmin (on TPUs the search is
  approximate; other backends run it exactly, so there it must find every code)."""
  if blocks:  # Several row blocks (lax.map), with padding.
    monkeypatch.setattr(ops.distances, "DEFAULT_MAX_DISTANCE_ENTRIES", 300 * 256)
  z = np.asarray(jax.random.normal(jax.random.key(2), (2, 500, 16)))
  codebook = np.asarray(jax.random.normal(jax.random.key(3), (256, 16)))
  brute = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  got = jax.jit(functools.partial(ops.nearest_code, recall_target=0.9))(z, codebook)
  assert got.shape == brute.shape and got.dtype == jnp.int32
  recall = float(np.mean(np.asarray(got) == brute))
  # 1000 rows: 3 standard deviations below the target is a failure.
  assert recall >= 0.9 - 3 * math.sqrt(0.9 * 0.1 / brute.size), recall
  if jax.default_backend() != "tpu":
    assert recall == 1.0
  with pytest.raises(ValueError, match=r"recall_target must lie in \(0, 1\]"):
    ops.nearest_code(z, codebook, recall_target=0.0)


def test_code_distances_match_direct_differences_in_bfloat16_inputs():
  z = jax.random.normal(jax.random.key(2), (4, 6, 16)).astype(jnp.bfloat16)
  codebook = jax.random.normal(jax.random.key(3), (32, 16)).astype(jnp.bfloat16)
  got = ops.code_distances(z, codebook)
  z64 = np.asarray(z, np.float64)
  c64 = np.asarray(codebook, np.float64)
  want = ((z64[..., None, :] - c64) ** 2).sum(-1)
  assert got.shape == (4, 6, 32) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-3)


def test_distance_ops_reject_mismatched_feature_dims_and_ranks():
  with pytest.raises(ValueError, match="feature dimension 7 .* D=8"):
    ops.nearest_code(jnp.zeros((2, 7)), jnp.zeros((4, 8)))
  with pytest.raises(ValueError, match=r"codebook must be \[K, D\]"):
    ops.code_distances(jnp.zeros((2, 8)), jnp.zeros((2, 4, 8)))
  with pytest.raises(ValueError, match="chunk_size must be positive"):
    ops.nearest_code(jnp.zeros((2, 8)), jnp.zeros((4, 8)), chunk_size=0)


# ---------------------------------------------------------------- straight-through


def test_straight_through_forward_is_hard_and_gradient_is_soft():
  soft = jnp.array([0.2, 0.5, 0.3])
  hard = jnp.array([0.0, 1.0, 0.0])
  weights = jnp.array([1.0, 2.0, 3.0])
  value = ops.straight_through(hard, soft)
  np.testing.assert_array_equal(value, hard)
  grad = jax.grad(lambda s: jnp.sum(weights * ops.straight_through(hard, s)))(soft)
  np.testing.assert_allclose(grad, weights)


def test_straight_through_argmax_gradient_is_the_tempered_softmax_gradient():
  logits = jax.random.normal(jax.random.key(4), (5, 7))
  weights = jax.random.normal(jax.random.key(5), (5, 7))
  tau = 0.7
  one_hot, indices = ops.straight_through_argmax(logits, tau=tau)
  np.testing.assert_array_equal(one_hot, jax.nn.one_hot(jnp.argmax(logits, -1), 7))
  np.testing.assert_array_equal(indices, jnp.argmax(logits, -1))
  got = jax.grad(lambda l: jnp.sum(weights * ops.straight_through_argmax(l, tau=tau)[0]))(logits)
  want = jax.grad(lambda l: jnp.sum(weights * jax.nn.softmax(l / tau)))(logits)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- Gumbel


def test_hard_gumbel_is_one_hot_with_the_soft_sample_gradient():
  key = jax.random.key(6)
  logits = jax.random.normal(jax.random.key(7), (4, 3, 9))
  weights = jax.random.normal(jax.random.key(8), (4, 3, 9))
  sample, indices = ops.gumbel_softmax(key, logits, tau=0.5, hard=True)
  np.testing.assert_array_equal(sample, jax.nn.one_hot(indices, 9))
  soft, soft_indices = ops.gumbel_softmax(key, logits, tau=0.5, hard=False)
  np.testing.assert_array_equal(indices, soft_indices)
  np.testing.assert_array_equal(indices, jnp.argmax(soft, -1))
  grad_hard = jax.grad(lambda l: jnp.sum(weights * ops.gumbel_softmax(key, l, tau=0.5)[0]))(logits)
  grad_soft = jax.grad(
      lambda l: jnp.sum(weights * ops.gumbel_softmax(key, l, tau=0.5, hard=False)[0]))(logits)
  np.testing.assert_allclose(grad_hard, grad_soft, rtol=1e-5, atol=1e-7)
  assert float(jnp.max(jnp.abs(grad_hard))) > 0


def test_gumbel_samples_follow_softmax_of_logits():
  logits = jnp.array([1.0, 0.0, -1.0, 2.0, 0.5, -3.0])
  num_samples = 60_000
  _, indices = ops.gumbel_softmax(
      jax.random.key(9), jnp.broadcast_to(logits, (num_samples, 6)))
  observed = np.bincount(np.asarray(indices), minlength=6)
  expected = np.asarray(jax.nn.softmax(logits), np.float64) * num_samples
  chi_square = np.sum((observed - expected) ** 2 / expected)
  assert chi_square < stats.chi2.ppf(1 - 1e-4, df=5), (observed, expected)


def test_gumbel_is_deterministic_given_key_and_preserves_bfloat16():
  logits = jax.random.normal(jax.random.key(10), (8, 16)).astype(jnp.bfloat16)
  a, ia = ops.gumbel_softmax(jax.random.key(11), logits)
  b, ib = ops.gumbel_softmax(jax.random.key(11), logits)
  assert a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(ia, ib)
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ---------------------------------------------------------------- stochastic mask


@pytest.mark.parametrize("length,ratio", [(256, 0.4), (16, 0.5), (5, 0.5), (7, 0.0), (7, 1.0),
                                          (100, 0.33)])
def test_stochastic_mask_sets_exactly_round_ratio_length_per_row(length, ratio):
  mask = ops.stochastic_mask(jax.random.key(12), 32, length, ratio)
  assert mask.shape == (32, length) and mask.dtype == jnp.bool_
  expected = math.floor(ratio * length + 0.5)
  np.testing.assert_array_equal(np.asarray(mask).sum(-1), expected)


def test_stochastic_mask_edges_and_traced_ratio():
  key = jax.random.key(13)
  assert not np.asarray(ops.stochastic_mask(key, 4, 10, 0.0)).any()
  assert np.asarray(ops.stochastic_mask(key, 4, 10, 1.0)).all()
  traced = jax.jit(lambda r: ops.stochastic_mask(key, 4, 10, r))(0.3)
  np.testing.assert_array_equal(np.asarray(traced).sum(-1), 3)


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_stochastic_mask_rejects_ratios_outside_unit_interval(ratio):
  with pytest.raises(ValueError, match=r"mask ratio must lie in \[0, 1\]"):
    ops.stochastic_mask(jax.random.key(0), 2, 8, ratio)


def test_stochastic_mask_positions_are_equally_likely():
  rows, length, ratio = 20_000, 16, 0.25  # 4 of 16 per row.
  mask = np.asarray(ops.stochastic_mask(jax.random.key(14), rows, length, ratio))
  counts = mask.sum(0)
  expected = rows * 4 / length
  chi_square = np.sum((counts - expected) ** 2 / expected)
  assert chi_square < stats.chi2.ppf(1 - 1e-4, df=length - 1), counts
  # Pairs are uniform too (a sampler that picked contiguous blocks would fail here).
  pair = (mask[:, 0] & mask[:, 1]).mean()
  want = (4 / 16) * (3 / 15)
  assert abs(pair - want) < 5 * math.sqrt(want * (1 - want) / rows)


def test_masked_select_broadcasts_and_routes_gradients():
  mask = jnp.array([[True, False, True]])
  stochastic = jnp.ones((1, 3, 2))
  deterministic = jnp.zeros((1, 3, 2))
  np.testing.assert_array_equal(
      ops.masked_select(mask, stochastic, deterministic)[..., 0], [[1, 0, 1]])
  grad = jax.grad(lambda s: jnp.sum(ops.masked_select(mask, s, deterministic)))(stochastic)
  np.testing.assert_array_equal(grad[..., 1], [[1, 0, 1]])
  with pytest.raises(ValueError, match="prefix"):
    ops.masked_select(jnp.ones((3,), bool), stochastic, deterministic)


def test_stochastic_positions_are_the_mask_of_the_same_key():
  key = jax.random.key(15)
  positions = np.asarray(ops.stochastic_positions(key, 6, 20, 0.4))
  assert positions.shape == (6, 8) and positions.dtype == np.int32
  assert all(len(set(row)) == 8 for row in positions)
  mask = np.asarray(ops.stochastic_mask(key, 6, 20, 0.4))
  np.testing.assert_array_equal(np.asarray(ops.positions_to_mask(positions, 20)), mask)
  with pytest.raises(TypeError, match="static count"):
    jax.jit(lambda r: ops.stochastic_positions(key, 2, 8, r))(0.5)


# ---------------------------------------------------------------- categorical quantization


def _two_branch(logits, codebook, tau, noise, mask):
  """method.md's definition, branch by branch, from the unfused ops."""
  sampled, _ = ops.gumbel_softmax(None, logits, tau=tau, noise=noise)
  argmax, _ = ops.straight_through_argmax(logits, tau=tau)
  one_hot = ops.masked_select(mask, sampled, argmax)
  prior_kl = ops.kl_to_uniform(jax.nn.softmax(logits / tau))
  per_position_kl = ops.per_position_kl_to_uniform(jax.nn.softmax(logits))
  return one_hot @ codebook, jnp.argmax(one_hot, -1), prior_kl, per_position_kl


@pytest.mark.parametrize("mode,source,blocks", [
    ("none", None, None), ("rows", "key", 2), ("rows", "noise", None), ("all", "key", 4)])
def test_categorical_quantize_equals_the_two_branch_definition(mode, source, blocks):
  """Value and gradient (logits, bias, codebook, τ) of every output against the unfused
  ops with the same Gumbel noise: the op's rows of noise scattered into a full array.
  `blocks` positions per block run the block loops (L = 7: 4 leaves a remainder)."""
  batch, length, num_codes, dim = 3, 7, 11, 4
  logits = 2.0 * jax.random.normal(jax.random.key(50), (batch, length, num_codes))
  bias = jax.random.normal(jax.random.key(49), (num_codes,))
  codebook = jax.random.normal(jax.random.key(51), (num_codes, dim))
  weights = jax.random.normal(jax.random.key(52), (batch, length, dim))
  tau = jnp.float32(0.7)
  key = jax.random.key(54)
  positions = gumbel = None
  full_noise = jnp.zeros(logits.shape)
  mask = jnp.zeros((batch, length), bool)
  if mode == "rows":
    positions = ops.stochastic_positions(jax.random.key(53), batch, length, 0.5)
    noise = ops.gumbel_noise(key, (batch, 4, num_codes))
    full_noise = full_noise.at[jnp.arange(batch)[:, None], positions].set(noise)
    mask = ops.positions_to_mask(positions, length)
  elif mode == "all":
    noise = full_noise = ops.gumbel_noise(key, logits.shape)
    mask = jnp.ones((batch, length), bool)
  if source == "key":
    gumbel = ops.GumbelSource(key=key)
  elif source == "noise":
    gumbel = ops.GumbelSource(noise=noise)
  block_entries = None if blocks is None else blocks * batch * num_codes

  def fused(logits, bias, codebook, tau):
    out = ops.categorical_quantize(logits, codebook, bias=bias, tau=tau, gumbel=gumbel,
                                   positions=positions, per_position_kl=True,
                                   block_entries=block_entries)
    losses = (jnp.sum(weights * out.quantized), ops.kl_to_uniform(out.mean_probs),
              out.per_position_kl)
    return losses, (out.indices, out.argmax_indices)

  def reference(logits, bias, codebook, tau):
    quantized, indices, prior_kl, per_position_kl = _two_branch(
        logits + bias, codebook, tau, full_noise, mask)
    losses = (jnp.sum(weights * quantized), prior_kl, per_position_kl)
    return losses, (indices, jnp.argmax(logits + bias, -1))

  @functools.partial(jax.jit, static_argnums=0)
  def evaluate(fn, *args):
    """Values, and the gradients (logits, bias, codebook, τ) of the quantized output alone
    (p̄ and the KL get symbolic-zero cotangents) and of all three losses."""
    def total(weights, *args):
      return sum(w * v for w, v in zip(weights, fn(*args)[0]) if w)
    grads = [jax.grad(functools.partial(total, w), argnums=(0, 1, 2, 3))(*args)
             for w in ((1.0, 0.0, 0.0), (1.0, 0.3, 0.2))]
    return fn(*args), grads

  args = (logits, bias, codebook, tau)
  ((got, got_indices), got_grads), ((want, want_indices), want_grads) = (
      evaluate(fused, *args), evaluate(reference, *args))
  np.testing.assert_array_equal(got_indices[0], want_indices[0])
  np.testing.assert_array_equal(got_indices[1], want_indices[1])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if mode != "none":
    assert (np.asarray(got_indices[0]) != np.asarray(got_indices[1])).any()
  for grads, wants in zip(got_grads, want_grads):
    for g, w in zip(grads, wants):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_categorical_quantize_samples_follow_softmax_at_stochastic_positions_only():
  """χ² of the tokens at stochastic positions against softmax(ℓ) (= softmax(ℓ/τ) at the
  default τ = 1; the hard sample argmax(ℓ + g) does not depend on τ), and the argmax at
  every other position. The noise is drawn inside the op, block by block."""
  base = jnp.array([1.0, 0.0, -1.0, 2.0, 0.5, -3.0])
  batch, length = 2000, 10
  logits = jnp.broadcast_to(base, (batch, length, 6))
  positions = ops.stochastic_positions(jax.random.key(55), batch, length, 0.3)
  out = jax.jit(functools.partial(
      ops.categorical_quantize, gumbel=ops.GumbelSource(key=jax.random.key(56)),
      block_entries=6 * 4 * batch))(logits, jnp.eye(6), positions=positions)
  mask = np.asarray(ops.positions_to_mask(positions, length))
  indices = np.asarray(out.indices)
  np.testing.assert_array_equal(indices[~mask], 3)
  observed = np.bincount(indices[mask], minlength=6)
  expected = np.asarray(jax.nn.softmax(base), np.float64) * mask.sum()
  chi_square = np.sum((observed - expected) ** 2 / expected)
  assert chi_square < stats.chi2.ppf(1 - 1e-4, df=5), (observed, expected)


@pytest.mark.parametrize("prng", ops.PRNG_IMPLS)
def test_gumbel_noise_is_gumbel_for_every_prng(prng):
  draw = jax.jit(functools.partial(ops.gumbel_noise, shape=(20, 2500), prng=prng))
  noise = np.asarray(draw(jax.random.key(57)))
  assert noise.dtype == np.float32
  # Kolmogorov-Smirnov against Gumbel(0, 1); rows independent of each other.
  assert stats.kstest(noise.reshape(-1), stats.gumbel_r.cdf).pvalue > 1e-4
  assert abs(np.corrcoef(noise[0], noise[1])[0, 1]) < 0.1
  np.testing.assert_array_equal(noise, draw(jax.random.key(57)))
  if prng == "threefry":
    # Any rows, in any order: what the op draws block by block.
    np.testing.assert_array_equal(ops.gumbel_rows(jax.random.key(57), jnp.array([7, 2]), 2500),
                                  noise[[7, 2]])
  with pytest.raises(ValueError, match="prng must be one of"):
    ops.gumbel_noise(jax.random.key(0), (2,), prng="philox")


def test_threefry_and_gumbel_rows_are_jax_threefry_bit_for_bit():
  from jax.extend.random import threefry_2x32
  words = jax.random.bits(jax.random.key(58), (4, 64), jnp.uint32)
  got = jnp.concatenate(ops.gumbel.threefry2x32(words[0, :1], words[1, :1], words[2], words[3]))
  np.testing.assert_array_equal(got, threefry_2x32(words[:2, 0], jnp.concatenate(words[2:])))

  @functools.partial(jax.jit, static_argnums=1)
  def jax_gumbel_row(key, num_codes):
    bits = threefry_2x32(jax.random.key_data(jax.random.fold_in(key, 5)),
                         jnp.arange(num_codes, dtype=jnp.uint32))
    uniform = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000),
                                           jnp.float32) - 1.0
    tiny = jnp.finfo(jnp.float32).tiny
    return -jnp.log(-jnp.log(jnp.maximum(tiny, uniform * (1 - tiny) + tiny)))

  key = jax.random.key(59)
  rows = jax.jit(ops.gumbel_rows, static_argnums=2)
  for num_codes in (7, 16):  # Odd K pads the counters, as JAX does.
    np.testing.assert_array_equal(rows(key, jnp.array([5]), num_codes)[0],
                                  jax_gumbel_row(key, num_codes))


def test_categorical_quantize_rejects_bad_arguments():
  logits = jnp.zeros((2, 4, 5))
  codebook = jnp.zeros((5, 3))
  source = ops.GumbelSource(key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"logits must be \[B, L, K\]"):
    ops.categorical_quantize(logits[0], codebook)
  with pytest.raises(ValueError, match="classes but the codebook has"):
    ops.categorical_quantize(logits, codebook[:4])
  with pytest.raises(ValueError, match="need a Gumbel noise source"):
    ops.categorical_quantize(logits, codebook, positions=jnp.zeros((2, 1), jnp.int32))
  with pytest.raises(ValueError, match=r"noise must be \[B, S, K\]"):
    ops.categorical_quantize(logits, codebook, gumbel=ops.GumbelSource(noise=jnp.zeros((2, 2, 5))),
                             positions=jnp.zeros((2, 1), jnp.int32))
  with pytest.raises(ValueError, match="exactly one of key= and noise="):
    ops.categorical_quantize(logits, codebook, gumbel=ops.GumbelSource())
  with pytest.raises(ValueError, match=r"bias must be \[K=5\]"):
    ops.categorical_quantize(logits, codebook, bias=jnp.zeros(4), gumbel=source)


# ---------------------------------------------------------------- KL and entropy


def test_kl_to_uniform_is_log_k_minus_entropy_of_mean():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(15), (4, 5, 12)) * 2)
  mean = np.asarray(probs, np.float64).reshape(-1, 12).mean(0)
  want = math.log(12) - _np_entropy(mean)
  np.testing.assert_allclose(float(ops.kl_to_uniform(probs)), want, rtol=1e-5)


def test_kl_to_uniform_extremes_and_bfloat16():
  k = 16
  uniform_use = jax.nn.one_hot(jnp.arange(64) % k, k)
  collapsed = jax.nn.one_hot(jnp.zeros(64, jnp.int32), k)
  assert abs(float(ops.kl_to_uniform(uniform_use))) < 1e-6
  np.testing.assert_allclose(float(ops.kl_to_uniform(collapsed)), math.log(k), rtol=1e-6)
  value = ops.kl_to_uniform(collapsed.astype(jnp.bfloat16))
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), math.log(k), rtol=1e-6)


def test_kl_to_uniform_is_global_across_devices():
  """Each device's positions all pick one code (its own): per-device KL is log K, global is
  log K − log 8. Both shard_map with axis_name and sharded jit must give the global value."""
  k, per_device = 16, 4
  indices = jnp.repeat(jnp.arange(8), per_device)
  probs = jax.nn.one_hot(indices, k)
  want = math.log(k) - math.log(8)
  mesh = _mesh8()
  mapped = jax.jit(jax.shard_map(
      lambda p: ops.kl_to_uniform(p, axis_name="data"),
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  sharded = _shard_rows(probs, mesh)
  np.testing.assert_allclose(float(mapped(sharded)), want, rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(ops.kl_to_uniform)(sharded)), want, rtol=1e-6)
  local_only = jax.jit(jax.shard_map(
      lambda p: ops.kl_to_uniform(p)[None], mesh=mesh, in_specs=P("data"), out_specs=P("data")))
  np.testing.assert_allclose(np.asarray(local_only(sharded)), math.log(k), rtol=1e-6)


def test_per_position_kl_is_mean_of_positionwise_kls():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(16), (3, 7, 10)))
  p = np.asarray(probs, np.float64).reshape(-1, 10)
  want = np.mean([math.log(10) - _np_entropy(row) for row in p])
  np.testing.assert_allclose(float(ops.per_position_kl_to_uniform(probs)), want, rtol=1e-5)


def test_entropy_loss_matches_formula_and_is_global_under_shard_map():
  logits = jax.random.normal(jax.random.key(17), (8, 6, 20)) * 3
  temperature = 0.5
  p = np.asarray(jax.nn.softmax(logits / temperature), np.float64).reshape(-1, 20)
  want = np.mean([_np_entropy(row) for row in p]) - _np_entropy(p.mean(0))
  got = ops.entropy_loss(logits, temperature=temperature)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  mesh = _mesh8()
  mapped = jax.jit(jax.shard_map(
      lambda l: ops.entropy_loss(l, temperature=temperature, axis_name="data"),
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  np.testing.assert_allclose(float(mapped(_shard_rows(logits, mesh))), want, rtol=1e-5)


def test_entropy_terms_have_finite_gradients_when_probabilities_underflow():
  """A softmax at temperature 0.01 puts exact zeros in p and p̄; gradients must stay finite."""
  logits = jax.random.normal(jax.random.key(40), (4, 8, 64)) * 10
  for loss in (lambda l: ops.entropy_loss(l, temperature=0.01),
               lambda l: ops.kl_to_uniform(jax.nn.softmax(l / 0.01)),
               lambda l: ops.per_position_kl_to_uniform(jax.nn.softmax(l / 0.01))):
    probs = jax.nn.softmax(logits / 0.01)
    assert float(jnp.min(probs)) == 0.0  # The case under test really occurs.
    grad = jax.grad(loss)(logits)
    assert np.isfinite(np.asarray(grad)).all()


# ---------------------------------------------------------------- PCL


def _np_pcl(feat_x, feat_y, weights, tau, eps, active):
  """The method.md formula, evaluated directly (float64, explicit sums)."""
  total = 0.0
  batch, num_locations, _ = feat_x.shape
  for b in range(batch):
    x = feat_x[b] / np.linalg.norm(feat_x[b], axis=-1, keepdims=True)
    y = feat_y[b] / np.linalg.norm(feat_y[b], axis=-1, keepdims=True)
    for i in range(num_locations):
      if not active[b, i]:
        continue
      positive = (weights[b, i] + eps) * np.exp(x[i] @ y[i] / tau)
      negatives = sum(np.exp(x[i] @ y[j] / tau) for j in range(num_locations) if j != i)
      total += -np.log(positive / (positive + negatives / num_locations))
  return total / batch


def test_pcl_equals_direct_evaluation_of_the_formula():
  feat_x = np.asarray(jax.random.normal(jax.random.key(18), (2, 6, 5)), np.float64)
  feat_y = np.asarray(jax.random.normal(jax.random.key(19), (2, 6, 5)), np.float64)
  raw = np.asarray(jax.random.uniform(jax.random.key(20), (2, 6)), np.float64)
  raw[0, :2] = 0.0
  weights = raw / raw.sum(-1, keepdims=True)
  active = weights > 0
  for tau, use_active in [(0.07, False), (0.5, True)]:
    got = ops.probabilistic_contrastive_loss(
        jnp.asarray(feat_x, jnp.float32), jnp.asarray(feat_y, jnp.float32),
        jnp.asarray(weights, jnp.float32), tau=tau, eps=1e-3,
        active=jnp.asarray(active) if use_active else None)
    want = _np_pcl(feat_x, feat_y, weights, tau, 1e-3,
                   active if use_active else np.ones_like(active))
    np.testing.assert_allclose(float(got), want, rtol=2e-4)


def test_pcl_mean_reduction_is_the_sum_over_the_number_of_active_anchors():
  feat_x = np.asarray(jax.random.normal(jax.random.key(24), (3, 7, 5)), np.float64)
  feat_y = np.asarray(jax.random.normal(jax.random.key(25), (3, 7, 5)), np.float64)
  weights = np.asarray(jax.random.dirichlet(jax.random.key(26), jnp.ones(7), (3,)))
  active = np.array(jax.random.bernoulli(jax.random.key(27), 0.5, (3, 7)))
  active[2] = False  # An image with no active anchor adds nothing to either count.
  got = ops.probabilistic_contrastive_loss(
      jnp.asarray(feat_x, jnp.float32), jnp.asarray(feat_y, jnp.float32),
      jnp.asarray(weights, jnp.float32), tau=0.2, eps=1e-3, active=jnp.asarray(active),
      reduction="mean")
  # _np_pcl divides the anchor sum by the batch size; undo that, divide by the anchors.
  want = _np_pcl(feat_x, feat_y, weights, 0.2, 1e-3, active) * 3 / active.sum()
  np.testing.assert_allclose(float(got), want, rtol=2e-4)
  none_active = ops.probabilistic_contrastive_loss(
      jnp.asarray(feat_x, jnp.float32), jnp.asarray(feat_y, jnp.float32),
      jnp.asarray(weights, jnp.float32), active=jnp.zeros((3, 7), bool), reduction="mean")
  assert float(none_active) == 0.0
  with pytest.raises(ValueError, match="reduction must be"):
    ops.probabilistic_contrastive_loss(feat_x, feat_y, weights, reduction="max")


def test_pcl_gradient_is_finite_with_zero_weights_and_larger_weight_pulls_less():
  feat_x = jax.random.normal(jax.random.key(21), (1, 8, 4))
  feat_y = jax.random.normal(jax.random.key(22), (1, 8, 4))
  weights = jnp.zeros((1, 8)).at[0, 3].set(1.0)
  grad = jax.grad(lambda y: ops.probabilistic_contrastive_loss(feat_x, y, weights))(feat_y)
  assert np.isfinite(np.asarray(grad)).all()
  # The derivative of one anchor's term w.r.t. its positive similarity is −(1 − σ_i):
  # it shrinks as the weight grows.
  def positive_pull(weight):
    w = jnp.full((1, 8), 1e-3).at[0, 0].set(weight)
    only_first = jnp.zeros((1, 8), bool).at[0, 0].set(True)
    loss = lambda y: ops.probabilistic_contrastive_loss(feat_x, y, w, active=only_first)
    return float(jnp.linalg.norm(jax.grad(loss)(feat_y)[0, 0]))
  assert positive_pull(0.9) < positive_pull(0.01)


def test_pcl_weights_are_normalized_squared_perturbations():
  argmax_codes = jax.random.normal(jax.random.key(23), (2, 4, 4, 3))
  sampled = argmax_codes.at[0, 1, 2].add(2.0).at[0, 3, 0].add(1.0)
  weights = ops.pcl_weights(sampled, argmax_codes)
  assert weights.shape == (2, 4, 4)
  np.testing.assert_allclose(float(weights[0, 1, 2]), 12 / 15, rtol=1e-6)
  np.testing.assert_allclose(float(weights[0, 3, 0]), 3 / 15, rtol=1e-6)
  np.testing.assert_allclose(float(jnp.sum(weights[0])), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(weights[1], 0.0)  # Nothing perturbed: all zero, not NaN.


def test_pcl_rejects_bad_shapes_and_eps():
  feats = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match=r"weights must be \[B, S\]"):
    ops.probabilistic_contrastive_loss(feats, feats, jnp.zeros((2, 5)))
  with pytest.raises(ValueError, match="eps must be > 0"):
    ops.probabilistic_contrastive_loss(feats, feats, jnp.zeros((2, 4)), eps=0.0)
  with pytest.raises(ValueError, match=r"features must be \[B, S, C\]"):
    ops.probabilistic_contrastive_loss(feats[0], feats[0], jnp.zeros((2, 4)))


# ---------------------------------------------------------------- VQ losses, FQ, EMA, stats


def test_beta_weights_the_encoder_commitment_term():
  z = jax.random.normal(jax.random.key(24), (6, 4))
  z_q = jax.random.normal(jax.random.key(25), (6, 4))
  beta = 0.25

  def total(z, z_q):
    codebook_loss, commitment_loss = ops.vq_losses(z, z_q, beta=beta)
    return codebook_loss + commitment_loss

  grad_z, grad_zq = jax.grad(total, argnums=(0, 1))(z, z_q)
  n = z.size
  np.testing.assert_allclose(grad_z, beta * 2 * (z - z_q) / n, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad_zq, 2 * (z_q - z) / n, rtol=1e-5, atol=1e-7)
  codebook_loss, commitment_loss = ops.vq_losses(z, z_q, beta=beta)
  np.testing.assert_allclose(float(commitment_loss), beta * float(codebook_loss), rtol=1e-6)


def test_disentanglement_loss_matches_pairwise_formula():
  codes = [jax.random.normal(jax.random.key(k), (3, 5, 8)) for k in (26, 27, 28)]
  unit = [np.asarray(c, np.float64) / np.linalg.norm(np.asarray(c, np.float64), axis=-1,
                                                      keepdims=True) for c in codes]
  pairs = [(0, 1), (0, 2), (1, 2)]
  want = np.mean([np.mean(np.sum(unit[a] * unit[b], -1) ** 2) for a, b in pairs])
  np.testing.assert_allclose(float(ops.disentanglement_loss(codes)), want, rtol=1e-5)
  orthogonal = [jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 3.0]])]
  assert float(ops.disentanglement_loss(orthogonal)) == 0.0
  with pytest.raises(ValueError, match="at least 2"):
    ops.disentanglement_loss(codes[:1])


def test_ema_update_matches_running_averages():
  k, d, decay, eps = 5, 3, 0.9, 1e-5
  cluster_size = np.array([1.0, 2.0, 0.0, 4.0, 1.0])
  embed_sum = np.arange(k * d, dtype=np.float64).reshape(k, d)
  z = np.asarray(jax.random.normal(jax.random.key(29), (2, 4, d)), np.float64)
  indices = np.array([[0, 1, 1, 3], [3, 3, 0, 4]])
  new_size, new_sum, codebook = ops.ema_codebook_update(
      jnp.asarray(cluster_size), jnp.asarray(embed_sum), jnp.asarray(z), jnp.asarray(indices),
      decay=decay, eps=eps)
  counts = np.bincount(indices.ravel(), minlength=k)
  sums = np.zeros((k, d))
  np.add.at(sums, indices.ravel(), z.reshape(-1, d))
  want_size = decay * cluster_size + (1 - decay) * counts
  want_sum = decay * embed_sum + (1 - decay) * sums
  smoothed = (want_size + eps) / (want_size.sum() + k * eps) * want_size.sum()
  np.testing.assert_allclose(new_size, want_size, rtol=1e-5)
  np.testing.assert_allclose(new_sum, want_sum, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(codebook, want_sum / smoothed[:, None], rtol=1e-5, atol=1e-6)


def test_codebook_stats_match_numpy_and_are_global():
  indices = jnp.array([0, 0, 1, 3, 3, 3, 7, 7] * 4)
  result = ops.codebook_stats(indices, 10)
  counts = np.bincount(np.asarray(indices), minlength=10)
  np.testing.assert_allclose(float(result["usage"]), 4 / 10)
  np.testing.assert_allclose(float(result["dead_codes"]), 6)
  np.testing.assert_allclose(float(result["perplexity"]),
                             math.exp(_np_entropy(counts / counts.sum())), rtol=1e-5)
  mesh = _mesh8()
  mapped = jax.jit(jax.shard_map(
      lambda i: ops.codebook_stats(i, 10, axis_name="data"),
      mesh=mesh, in_specs=P("data"), out_specs=P()))
  for name, value in mapped(_shard_rows(indices, mesh)).items():
    np.testing.assert_allclose(float(value), float(result[name]), rtol=1e-6, err_msg=name)


def test_ops_compose_under_jit_vmap_and_grad():
  """A Reg-VQ-like forward through the ops, vmapped over an extra leading axis."""
  codebook = jax.random.normal(jax.random.key(30), (16, 4))
  logits = jax.random.normal(jax.random.key(31), (3, 2, 8, 16))

  def quantize(logits, key):
    mask = ops.stochastic_mask(key, logits.shape[0], logits.shape[1], 0.5)
    sampled, _ = ops.gumbel_softmax(key, logits)
    argmax, _ = ops.straight_through_argmax(logits)
    one_hot = ops.masked_select(mask, sampled, argmax)
    probs = jax.nn.softmax(logits)
    return jnp.sum((one_hot @ codebook) ** 2) + ops.kl_to_uniform(probs)

  keys = jax.random.split(jax.random.key(32), 3)
  values = jax.jit(jax.vmap(quantize))(logits, keys)
  grads = jax.jit(jax.vmap(jax.grad(quantize)))(logits, keys)
  assert values.shape == (3,) and grads.shape == logits.shape
  assert np.isfinite(np.asarray(grads)).all()
  np.testing.assert_allclose(values[1], quantize(logits[1], keys[1]), rtol=1e-5)


def test_argmax_last_equals_argmax_with_ties_to_the_lowest_index():
  x = jax.random.randint(jax.random.key(41), (6, 50, 33), 0, 4).astype(jnp.float32)
  np.testing.assert_array_equal(ops.argmax_last(x), jnp.argmax(x, axis=-1))


def test_one_hot_lookup_matches_the_one_hot_matmul_and_its_gradients():
  logits = jax.random.normal(jax.random.key(42), (3, 5, 12))
  codebook = jax.random.normal(jax.random.key(43), (12, 4))
  weights = jax.random.normal(jax.random.key(44), (3, 5, 4))

  def loss(logits, codebook, lookup):
    one_hot, indices = ops.straight_through_argmax(logits, tau=0.5)
    quantized = (ops.one_hot_lookup(one_hot, indices, codebook) if lookup
                 else one_hot @ codebook)
    return jnp.sum(weights * quantized)

  np.testing.assert_allclose(loss(logits, codebook, True), loss(logits, codebook, False),
                             rtol=1e-5)
  fast = jax.grad(loss, argnums=(0, 1))(logits, codebook, True)
  reference = jax.grad(loss, argnums=(0, 1))(logits, codebook, False)
  for got, want in zip(fast, reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
