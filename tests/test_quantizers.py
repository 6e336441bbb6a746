"""Quantizer modules: each against an independent reference, sharded, jitted, bfloat16."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvq_jax import ops
from rvq_jax import parallel
from rvq_jax.models.tokenizer.quantizers import EMAState
from rvq_jax.models.tokenizer.quantizers import FactorizedQuantizer
from rvq_jax.models.tokenizer.quantizers import GumbelQuantizer
from rvq_jax.models.tokenizer.quantizers import RegularizedQuantizer
from rvq_jax.models.tokenizer.quantizers import TemperatureSchedule
from rvq_jax.models.tokenizer.quantizers import VectorQuantizer
from rvq_jax.models.tokenizer.quantizers import build_quantizer
from rvq_jax.models.tokenizer.quantizers import registry

QUANTIZER_KINDS = ("vq", "gumbel", "regvq", "fq", "regfq")

K, D, C = 32, 8, 12


def _features(kind, shape=(4, 4, 4), key=1, dtype=jnp.float32):
  width = {"vq": D, "fq": 2 * D, "gumbel": C, "regvq": C, "regfq": 2 * C}[kind]
  return jax.random.normal(jax.random.key(key), shape + (width,)).astype(dtype)


def _build(kind, **overrides):
  # The kind's registered options (unknown kinds fail in build_quantizer), then overrides.
  options = dict(registry.get(kind).options) if kind in registry.kinds() else {}
  config = {"kind": kind, "num_codes": K, "code_dim": D, kind: {**options, **overrides}}
  in_features = None if kind in ("vq", "fq") else C
  return build_quantizer(config, in_features=in_features, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------- VQ


def test_vq_picks_nearest_codes_with_straight_through_gradient():
  quantizer = VectorQuantizer(K, D, rngs=nnx.Rngs(0))
  z = _features("vq")
  out = quantizer(z)
  codebook = np.asarray(quantizer.codebook[...])
  brute = np.argmin(((np.asarray(z)[..., None, :] - codebook) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(out.indices, brute)
  np.testing.assert_allclose(out.quantized, codebook[brute], rtol=1e-6, atol=1e-6)
  weights = jax.random.normal(jax.random.key(3), z.shape)
  grad = jax.grad(lambda z: jnp.sum(weights * quantizer(z).quantized))(z)
  np.testing.assert_allclose(grad, weights, rtol=1e-6)


def test_vq_and_fq_approximate_nearest_code_option():
  z = _features("vq", shape=(8, 8, 8))
  exact = VectorQuantizer(K, D, rngs=nnx.Rngs(0))
  approximate = VectorQuantizer(K, D, approx_recall=0.9, rngs=nnx.Rngs(0))
  recall = float(jnp.mean(approximate(z).indices == exact(z).indices))
  assert recall >= 0.9 - 3 * math.sqrt(0.09 / 512), recall
  fq = _build("fq", approx_recall=0.9)
  assert all(sub.approx_recall == 0.9 for sub in fq.quantizers)
  problems = registry.get("vq").check({**registry.get("vq").options, "approx_recall": 1.5})
  assert problems == ["approx_recall=1.5 must lie in (0, 1] (1 = exact)"]
  with pytest.raises(ValueError, match=r"approx_recall must lie in \(0, 1\]"):
    VectorQuantizer(K, D, approx_recall=0.0, rngs=nnx.Rngs(0))


def test_vq_commitment_gradient_reaches_encoder_with_beta_and_codebook_without():
  quantizer = VectorQuantizer(K, D, beta=0.25, rngs=nnx.Rngs(0))
  z = _features("vq")
  graphdef, params = nnx.split(quantizer, nnx.Param)

  def losses(params, z):
    out = nnx.merge(graphdef, params)(z)
    return out.losses["commitment"] + out.losses["codebook"]

  grad_params, grad_z = jax.grad(losses, argnums=(0, 1))(params, z)
  out = quantizer(z)
  z_q = quantizer.codebook[...][out.indices]
  np.testing.assert_allclose(grad_z, 0.25 * 2 * (z - z_q) / z.size, rtol=1e-5, atol=1e-8)
  # The codebook's gradient is the plain codebook term: 2 Σ_{i→k} (c_k − z_i) / n.
  want = np.zeros((K, D))
  np.add.at(want, np.asarray(out.indices).ravel(),
            2 * np.asarray(z_q - z).reshape(-1, D) / z.size)
  np.testing.assert_allclose(grad_params["codebook"][...], want, rtol=1e-5, atol=1e-8)


def test_vq_normalized_is_cosine_nearest_neighbour():
  quantizer = VectorQuantizer(K, D, normalize=True, rngs=nnx.Rngs(0))
  z = _features("vq") * 5.0
  out = quantizer(z)
  codebook = np.asarray(quantizer.codes())
  cosine = np.einsum("...d,kd->...k", np.asarray(z) / np.linalg.norm(z, axis=-1, keepdims=True),
                     codebook / np.linalg.norm(codebook, axis=-1, keepdims=True))
  np.testing.assert_array_equal(out.indices, cosine.argmax(-1))
  np.testing.assert_allclose(jnp.linalg.norm(out.quantized, axis=-1), 1.0, rtol=1e-5)


def test_vq_ema_updates_in_training_only_and_is_not_a_param():
  quantizer = VectorQuantizer(K, D, use_ema=True, ema_decay=0.9, rngs=nnx.Rngs(0))
  assert not nnx.state(quantizer, nnx.Param)  # The optimizer must never see EMA codes.
  assert set(nnx.state(quantizer, EMAState).keys()) == {"codebook", "cluster_size", "embed_sum"}
  z = _features("vq")
  before = {k: np.asarray(v[...]) for k, v in nnx.state(quantizer, EMAState).items()}
  out = quantizer(z, deterministic=True)
  assert "codebook" not in out.losses
  np.testing.assert_array_equal(quantizer.codebook[...], before["codebook"])
  out = quantizer(z)
  _, _, want = ops.ema_codebook_update(before["cluster_size"], before["embed_sum"], z,
                                       out.indices, decay=0.9)
  np.testing.assert_allclose(quantizer.codebook[...], want, rtol=1e-6)


def test_vq_entropy_loss_matches_op_on_negative_distances():
  quantizer = VectorQuantizer(K, D, entropy_weight=0.03, entropy_temperature=0.5,
                              rngs=nnx.Rngs(0))
  z = _features("vq")
  out = quantizer(z)
  want = 0.03 * ops.entropy_loss(-ops.code_distances(z, quantizer.codebook[...]),
                                 temperature=0.5)
  np.testing.assert_allclose(float(out.losses["entropy"]), float(want), rtol=1e-6)


# ---------------------------------------------------------------- Reg-VQ and Gumbel-VQ


def _tempered_probs(quantizer, z, tau=1.0):
  logits = quantizer.logits(z, quantizer.codebook[...])
  return np.asarray(jax.nn.softmax(logits / tau), np.float64), np.asarray(logits)


def test_regvq_masks_exactly_round_rL_positions_and_argmaxes_the_rest():
  quantizer = RegularizedQuantizer(K, D, in_features=C, mask_ratio=0.4, rngs=nnx.Rngs(0))
  z = _features("regvq", shape=(6, 4, 4))
  out = quantizer(z, key=jax.random.key(5))
  mask = np.asarray(out.aux["mask"]).reshape(6, -1)
  np.testing.assert_array_equal(mask.sum(-1), math.floor(0.4 * 16 + 0.5))
  _, logits = _tempered_probs(quantizer, z)
  argmax = logits.argmax(-1)
  indices = np.asarray(out.indices)
  deterministic = ~np.asarray(out.aux["mask"])
  np.testing.assert_array_equal(indices[deterministic], argmax[deterministic])
  # Gumbel samples differ from the argmax at some masked positions (K=32, 36 samples).
  assert (indices != argmax).any()
  np.testing.assert_array_equal(out.aux["deterministic_region"], indices == argmax)
  np.testing.assert_allclose(out.quantized, np.asarray(quantizer.codebook[...])[indices],
                             rtol=1e-6, atol=1e-6)
  weights = np.asarray(out.aux["pcl_weights"])
  assert (weights[np.asarray(out.aux["deterministic_region"])] == 0).all()
  np.testing.assert_allclose(weights.reshape(6, -1).sum(-1)[(indices != argmax).reshape(6, -1)
                                                           .any(-1)], 1.0, rtol=1e-5)


def test_regvq_eval_is_argmax_everywhere_and_training_needs_a_key():
  quantizer = RegularizedQuantizer(K, D, in_features=C, rngs=nnx.Rngs(0))
  z = _features("regvq")
  quantizer.eval()
  out = quantizer(z)
  _, logits = _tempered_probs(quantizer, z)
  np.testing.assert_array_equal(out.indices, logits.argmax(-1))
  assert not np.asarray(out.aux["mask"]).any()
  quantizer.train()
  with pytest.raises(ValueError, match="pass key="):
    quantizer(z)


def test_regvq_prior_kl_is_the_marginal_kl_of_the_tempered_softmax():
  schedule = TemperatureSchedule(2.0, 0.5, 10)
  quantizer = RegularizedQuantizer(K, D, in_features=C, prior_kl_weight=0.3,
                                   temperature=schedule, rngs=nnx.Rngs(0))
  z = _features("regvq")
  out = quantizer(z, key=jax.random.key(6), step=5)  # Half-way: τ = 1.25.
  np.testing.assert_allclose(float(out.stats["temperature"]), 1.25, rtol=1e-6)
  probs, _ = _tempered_probs(quantizer, z, tau=1.25)
  mean = probs.reshape(-1, K).mean(0)
  want = math.log(K) + np.sum(mean * np.log(mean))
  np.testing.assert_allclose(float(out.losses["prior_kl"]), 0.3 * want, rtol=1e-5)


def test_regvq_beyond_paper_options_kl_temperature_and_position_entropy():
  """The prior KL on p̄ of a sharper softmax, and FQGAN's per-position entropy term, each
  checked against NumPy on the module's own logits; the gradient of the entropy term
  lowers the entropy (a step along it sharpens p_i)."""
  quantizer = RegularizedQuantizer(K, D, in_features=C, prior_kl_weight=0.3,
                                   prior_kl_temperature=0.25, position_entropy_weight=0.2,
                                   position_entropy_temperature=0.5, rngs=nnx.Rngs(0))
  z = _features("regvq")
  out = quantizer(z, key=jax.random.key(6), step=0)
  sharp, _ = _tempered_probs(quantizer, z, tau=0.25)
  mean = np.asarray(sharp, np.float64).reshape(-1, K).mean(0)
  np.testing.assert_allclose(float(out.losses["prior_kl"]),
                             0.3 * (math.log(K) + np.sum(mean * np.log(mean))), rtol=1e-5)
  # The logged KL statistic is the one the loss uses.
  np.testing.assert_allclose(float(out.stats["kl_to_uniform"]),
                             float(out.losses["prior_kl"]) / 0.3, rtol=1e-6)
  half, _ = _tempered_probs(quantizer, z, tau=0.5)
  half = np.asarray(half, np.float64).reshape(-1, K)
  entropy = -np.sum(half * np.log(half), axis=-1).mean()
  np.testing.assert_allclose(float(out.losses["position_entropy"]), 0.2 * entropy, rtol=1e-5)
  # Without the options the losses are the paper's (τ = 1 KL, no entropy term).
  plain = RegularizedQuantizer(K, D, in_features=C, prior_kl_weight=0.3, rngs=nnx.Rngs(0))
  plain_out = plain(z, key=jax.random.key(6), step=0)
  assert "position_entropy" not in plain_out.losses
  assert abs(float(plain_out.losses["prior_kl"]) - float(out.losses["prior_kl"])) > 1e-3
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(64, K)), jnp.float32)
  grad = jax.grad(lambda x: ops.mean_position_entropy(x, temperature=0.5))(logits)
  assert float(ops.mean_position_entropy(logits - 0.5 * grad, temperature=0.5)) < float(
      ops.mean_position_entropy(logits, temperature=0.5))


def test_regvq_distance_logits_argmax_is_the_nearest_code():
  quantizer = RegularizedQuantizer(K, D, logits="distance", rngs=nnx.Rngs(0))
  z = _features("vq")
  out = quantizer(z, deterministic=True)
  np.testing.assert_array_equal(out.indices, ops.nearest_code(z, quantizer.codebook[...]))


def test_gumbel_samples_every_position_with_per_position_kl():
  quantizer = GumbelQuantizer(K, D, in_features=C, kl_weight=5e-4, rngs=nnx.Rngs(0))
  z = _features("gumbel")
  out = quantizer(z, key=jax.random.key(7), step=0)
  assert np.asarray(out.aux["mask"]).all()
  # Taming's full L1: every position counts as reconstructed, sampled or not.
  assert np.asarray(out.aux["deterministic_region"]).all()
  np.testing.assert_allclose(float(out.stats["temperature"]), 0.9, rtol=1e-6)
  # Taming's KL is on softmax(ℓ), whatever τ (qy = softmax(logits)).
  probs, _ = _tempered_probs(quantizer, z, tau=1.0)
  per_position = math.log(K) + np.sum(probs * np.log(probs), -1)
  np.testing.assert_allclose(float(out.losses["per_position_kl"]), 5e-4 * per_position.mean(),
                             rtol=1e-5)
  assert "prior_kl" not in out.losses
  np.testing.assert_allclose(float(quantizer.temperature(1_000_000)), 1e-6, rtol=1e-3)


def test_temperature_schedule_is_cosine():
  schedule = TemperatureSchedule(1.0, 0.2, 100)
  for step in (0, 25, 50, 100, 400):
    progress = min(step / 100, 1.0)
    want = 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress))
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-6)
  with pytest.raises(ValueError, match="temperatures must be > 0"):
    TemperatureSchedule(0.0, 1.0, 10)


# ---------------------------------------------------------------- FQ and Reg-FQ


def test_fq_is_the_concatenation_of_its_sub_quantizers():
  quantizer = _build("fq", normalize=True)
  z = _features("fq")
  out = quantizer(z, key=jax.random.key(8))
  branches = jnp.split(z, 2, axis=-1)
  subs = [q(b) for q, b in zip(quantizer.quantizers, branches)]
  np.testing.assert_array_equal(out.indices, jnp.stack([s.indices for s in subs], -1))
  np.testing.assert_allclose(out.quantized, jnp.concatenate([s.quantized for s in subs], -1))
  np.testing.assert_allclose(quantizer.decode_indices(out.indices), out.quantized, atol=1e-6)
  want = 0.1 * ops.disentanglement_loss([s.quantized for s in subs])
  np.testing.assert_allclose(float(out.losses["disentanglement"]), float(want), rtol=1e-6)
  assert {"commitment_0", "codebook_1"} <= set(out.losses)
  assert out.indices.shape == (4, 4, 4, 2)


def test_regfq_masks_each_sub_codebook_independently():
  quantizer = _build("regfq", mask_ratio=0.5)
  z = _features("regfq", shape=(8, 4, 4))
  key = jax.random.key(9)
  out = quantizer(z, key=key)
  keys = jax.random.split(key, 2)
  branches = jnp.split(z, 2, axis=-1)
  masks = [np.asarray(q(b, key=k).aux["mask"]) for q, b, k in
           zip(quantizer.quantizers, branches, keys)]
  for mask in masks:
    np.testing.assert_array_equal(mask.reshape(8, -1).sum(-1), 8)
  assert (masks[0] != masks[1]).any()
  np.testing.assert_array_equal(out.aux["mask"], masks[0] | masks[1])
  assert {"prior_kl_0", "prior_kl_1", "disentanglement"} <= set(out.losses)


# ---------------------------------------------------------------- every kind


@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
def test_every_quantizer_is_the_same_sharded_over_8_devices(kind):
  quantizer = _build(kind)
  z = _features(kind, shape=(8, 4, 4))
  key = jax.random.key(10)
  graphdef, state = nnx.split(quantizer)

  def apply(state, z, key):
    model = nnx.merge(graphdef, state)
    out = model(z, key=key, step=7)
    return out, nnx.state(model)

  single = jax.jit(apply)(state, z, key)
  mesh = parallel.make_mesh((4, 2, 1))
  rules = (("vocab", "fsdp"), ("embed", "model"))
  state_sharding = parallel.state_shardings(state, mesh, rules)
  z_sharded = jax.device_put(z, parallel.batch_sharding(mesh, z.ndim))
  sharded = jax.jit(apply)(jax.device_put(state, state_sharding), z_sharded, key)
  assert len(z_sharded.sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5, atol=1e-5), single, sharded)


@pytest.mark.parametrize("kind", QUANTIZER_KINDS)
def test_every_quantizer_runs_in_bfloat16_under_jit(kind):
  quantizer = _build(kind)
  z = _features(kind, dtype=jnp.bfloat16)

  @nnx.jit
  def train_call(model, z, key):
    out = model(z, key=key, step=1)
    return out.quantized, out.total_loss, out.stats["usage"]

  quantized, loss, usage = train_call(quantizer, z, jax.random.key(11))
  assert quantized.dtype == jnp.bfloat16
  assert quantized.shape[:-1] == z.shape[:-1]
  assert np.isfinite(np.asarray(quantized, np.float32)).all() and np.isfinite(float(loss))
  assert 0 < float(usage) <= 1


def test_regvq_prng_option_draws_from_another_generator():
  """The same key through XLA's RngBitGenerator: other samples, the same mask and rules."""
  z = _features("regvq", shape=(6, 4, 4))
  default = _build("regvq")(z, key=jax.random.key(5))
  other = _build("regvq", prng="rbg")(z, key=jax.random.key(5))
  np.testing.assert_array_equal(default.aux["mask"], other.aux["mask"])
  unmasked = ~np.asarray(other.aux["mask"])
  np.testing.assert_array_equal(np.asarray(other.indices)[unmasked],
                                np.asarray(default.indices)[unmasked])
  assert (np.asarray(other.indices) != np.asarray(default.indices)).any()
  options = {**registry.get("gumbel").options, "prng": "philox"}
  assert registry.get("gumbel").check(options) == [
      "prng='philox': one of threefry, rbg, unsafe_rbg"]


def test_bad_configurations_fail_early_with_clear_messages():
  with pytest.raises(ValueError, match=r"mask_ratio must lie in \[0, 1\]"):
    _build("regvq", mask_ratio=1.2)
  with pytest.raises(ValueError, match="unknown quantizer kind"):
    _build("rvq")
  with pytest.raises(ValueError, match="num_branches >= 2"):
    _build("fq", num_branches=1)
  with pytest.raises(ValueError, match="in_features .* must equal code_dim"):
    RegularizedQuantizer(K, D, in_features=C, logits="distance", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="logits must be one of"):
    RegularizedQuantizer(K, D, logits="cosine", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="equal sub-code widths"):
    FactorizedQuantizer([VectorQuantizer(K, 4, rngs=nnx.Rngs(0)),
                         VectorQuantizer(K, 8, rngs=nnx.Rngs(0))])
  with pytest.raises(ValueError, match="num_codes and code_dim must be positive"):
    VectorQuantizer(0, D, rngs=nnx.Rngs(0))
  quantizer = VectorQuantizer(K, D, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="expects 8 input features"):
    jax.jit(lambda z: quantizer(z).quantized)(jnp.zeros((2, 4, 4, 7)))
  with pytest.raises(ValueError, match=r"rank >= 2"):
    quantizer(jnp.zeros((8,)))
  with pytest.raises(ValueError, match="a single FQ input must have 16"):
    _build("fq")(jnp.zeros((2, 4, 4, 20)))


@pytest.mark.parametrize("kind", ["regvq", "gumbel"])
def test_regvq_equals_the_two_branch_definition_in_value_and_gradient(kind):
  """Reg-VQ (and Gumbel-VQ, all positions sampled) as method.md writes it — argmax
  straight-through at unmasked positions, hard Gumbel at masked ones, one-hot × codebook,
  prior and per-position KL — built from the unfused ops, against the module. The module
  draws Gumbel noise only for its stochastic rows; the reference gets the same noise
  there (its other rows are never used: the argmax branch takes them)."""
  if kind == "regvq":
    quantizer = RegularizedQuantizer(K, D, in_features=C, mask_ratio=0.5, prior_kl_weight=0.3,
                                     per_position_kl_weight=0.2,
                                     temperature=TemperatureSchedule(0.7), rngs=nnx.Rngs(0))
  else:
    quantizer = GumbelQuantizer(K, D, in_features=C, kl_weight=0.2,
                                temperature=TemperatureSchedule(0.7), rngs=nnx.Rngs(0))
  z = _features("regvq", shape=(4, 4, 4))
  key = jax.random.key(12)
  weights = jax.random.normal(jax.random.key(13), z.shape[:-1] + (D,))
  graphdef, params = nnx.split(quantizer)

  def module_loss(params, z):
    out = nnx.merge(graphdef, params)(z, key=key)
    return jnp.sum(weights * out.quantized) + out.total_loss, out.indices

  def reference_loss(params, z):
    model = nnx.merge(graphdef, params)
    codebook = model.codebook[...]
    logits = model.logits(z, codebook)
    mask_key, gumbel_key = jax.random.split(key)
    if kind == "regvq":
      positions = ops.stochastic_positions(mask_key, 4, 16, 0.5)
      rows = ops.gumbel_noise(gumbel_key, (4, 8, K))
      noise = jnp.zeros((4, 16, K)).at[jnp.arange(4)[:, None], positions].set(rows)
      mask = ops.stochastic_mask(mask_key, 4, 16, 0.5).reshape(4, 4, 4)
    else:
      noise = ops.gumbel_noise(gumbel_key, (4, 16, K))
      mask = jnp.ones((4, 4, 4), bool)
    sampled, _ = ops.gumbel_softmax(None, logits, tau=0.7, noise=noise.reshape(logits.shape))
    argmax, _ = ops.straight_through_argmax(logits, tau=0.7)
    one_hot = ops.masked_select(mask, sampled, argmax)
    loss = (jnp.sum(weights * (one_hot @ codebook))
            + model.per_position_kl_weight * ops.per_position_kl_to_uniform(
                jax.nn.softmax(logits)))
    if model.prior_kl_weight:
      loss += model.prior_kl_weight * ops.kl_to_uniform(jax.nn.softmax(logits / 0.7))
    return loss, jnp.argmax(one_hot, -1)

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grad(loss, params, z):
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, z)

  ((got, got_indices), got_grads) = value_and_grad(module_loss, params, z)
  ((want, want_indices), want_grads) = value_and_grad(reference_loss, params, z)
  np.testing.assert_array_equal(got_indices, want_indices)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  got, want = got_grads, want_grads
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)
