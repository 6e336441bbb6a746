"""Reg-VQ's and Gumbel-VQ's categorical quantization as one op with a hand-written gradient.

The definition (method.md §1) has two branches per position: a deterministic one,
one-hot(argmax ℓ) forward with the gradient of softmax(ℓ/τ), and a stochastic one,
one-hot(argmax(ℓ + g)) forward with the gradient of softmax((ℓ + g)/τ), g ~ Gumbel(0, 1);
then z_q = one-hot × codebook, and the prior KL on the batch mean p̄ of softmax(ℓ/τ).
Written that way, autodiff materializes about fifteen [N, K] arrays (noise over all
N × K, two softmaxes, a one-hot, their cotangents). This op computes the same values and
gradients from what the formulas need:

* one max and one Σ exp per position, shared by the argmax, the deterministic
  straight-through softmax and p̄ (forward and backward);
* Gumbel noise only at the stochastic positions: a static count per sample
  (`ops.stochastic_positions`), so their rows of ℓ are gathered and noise is drawn for
  those rows only;
* the per-position KL(softmax(ℓ_i) ‖ uniform) from a log-sum-exp,
  log K + Σ_k p_ik (ℓ_ik − m_i) − log Σ_k e^{ℓ_ik − m_i}, not a second softmax pass;
* no one-hot: z_q = codebook[indices] (a gather); backward, the one-hot's cotangent is
  ∂L/∂z_q · codebookᵀ and the codebook's the scatter-add of ∂L/∂z_q;
* a bias of the logits (the projection's) is added inside, never as an [N, K] pass;
* the backward pass recomputes the softmaxes from ℓ and per-position maxima and sums;
  it reads ℓ + g of Reg-VQ's stochastic rows kept by the forward pass ([B, S, K]), and
  draws Gumbel-VQ's noise (every position) again rather than keep a new [N, K] array.

On the CPU an [N, K] pass through memory costs a sizeable fraction of a D = 256 matmul
(memory traffic and page faults; docs/results/quantizer_profile.md), so there the work
runs over blocks of positions small enough to stay in cache (`block_entries`): forward,
one pass over ℓ and one over its gathered stochastic rows; backward, one pass that forms
∂L/∂z_q · codebookᵀ block by block (never whole) and writes ∂L/∂ℓ over ℓ in place.
Other backends take all positions in one block.

Statistics over positions (p̄) are sums over the whole array, so under `jax.jit` with a
batch-sharded input they span the global batch.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from rvq_jax.ops import _checks
from rvq_jax.ops.gumbel import gumbel_rows

# On the CPU, positions are processed in blocks of about this many [.., K] entries
# (float32: 1 MiB), so a block's intermediates stay in cache ...
CPU_BLOCK_ENTRIES = 1 << 18
# ... but of at least this many positions (all samples together): the backward pass
# multiplies a block's [rows, D] cotangent by the [K, D] codebook, which is bound by
# reading the codebook below ~100 rows.
MIN_BLOCK_ROWS = 128


class CategoricalQuantized(NamedTuple):
  """What `categorical_quantize` returns.

  Attributes:
    quantized: [B, L, D] codebook[indices] in the logits' dtype; its gradient reaches the
      logits through the straight-through softmaxes and the codebook through a scatter-add.
    indices: [B, L] int32 tokens: the Gumbel sample at stochastic positions, the argmax
      elsewhere.
    argmax_indices: [B, L] int32 argmax of ℓ everywhere (ties to the lowest index).
    mean_probs: [K] float32 p̄, the mean of softmax(ℓ_i/τ) over all B · L positions
      (differentiable: Reg-VQ's prior KL is KL(p̄ ‖ uniform)).
    per_position_kl: float32 scalar, the mean over positions of KL(softmax(ℓ_i) ‖ uniform),
      τ-free (Gumbel-VQ's term; differentiable); 0 unless asked for.
  """

  quantized: jax.Array
  indices: jax.Array
  argmax_indices: jax.Array
  mean_probs: jax.Array
  per_position_kl: jax.Array


class GumbelSource(NamedTuple):
  """Where `categorical_quantize` takes the Gumbel noise of its stochastic rows from.

  Exactly one of: `key`, a threefry key (noise row (b, s) = `gumbel_rows(key, b · S + s,
  K)`, i.e. `ops.gumbel_noise(key, (B, S, K))`, drawn block by block where it is used),
  or `noise`, [B, S, K] float drawn by the caller.
  """

  key: jax.Array | None = None
  noise: jax.Array | None = None


# ------------------------------------------------------------------------ the op


def categorical_quantize(
    logits: jax.Array,
    codebook: jax.Array,
    *,
    bias: jax.Array | None = None,
    tau: float | jax.Array = 1.0,
    gumbel: GumbelSource | None = None,
    positions: jax.Array | None = None,
    per_position_kl: bool = False,
    block_entries: int | None = None,
) -> CategoricalQuantized:
  """Straight-through categorical quantization, deterministic or Gumbel-sampled per position.

  Equal in value and gradient to the two-branch definition: at a stochastic position the
  token is argmax(ℓ + g) with the gradient of softmax((ℓ + g)/τ) (a hard Gumbel-softmax,
  `ops.gumbel_softmax`), elsewhere argmax ℓ with the gradient of softmax(ℓ/τ)
  (`ops.straight_through_argmax`); the one-hot multiplies the codebook. The sample
  argmax(ℓ + g) follows softmax(ℓ) whatever τ: τ shapes only the gradient. The Gumbel
  noise is a PRNG draw and gets no gradient.

  Args:
    logits: [B, L, K] token logits ℓ, without `bias` (any float dtype; float32 inside).
    codebook: [K, D].
    bias: optional [K] added to every row of `logits` (a projection's bias).
    tau: softmax temperature τ > 0 of the straight-through gradients and of p̄.
    gumbel: the noise of the stochastic positions (`GumbelSource`); None: every
      position is deterministic.
    positions: [B, S] int32 distinct positions per row that take the Gumbel sample
      (`ops.stochastic_positions`); None with `gumbel` given: every position (Gumbel-VQ).
    per_position_kl: compute `per_position_kl` (it costs a pass over the logits).
    block_entries: positions per block × K; None: `CPU_BLOCK_ENTRIES` on the CPU (but
      at least `MIN_BLOCK_ROWS` positions), all positions in one block elsewhere.

  Returns:
    CategoricalQuantized (quantized [B, L, D], indices and argmax_indices [B, L],
    mean_probs [K], per_position_kl scalar).
  """
  if logits.ndim != 3:
    raise ValueError(f"logits must be [B, L, K], got shape {tuple(logits.shape)}.")
  _checks.check_codebook(codebook)
  batch, length, num_codes = logits.shape
  if codebook.shape[0] != num_codes:
    raise ValueError(f"logits have {num_codes} classes but the codebook has "
                     f"{codebook.shape[0]} codes.")
  if bias is None:
    bias = jnp.zeros((num_codes,), jnp.float32)
  elif bias.shape != (num_codes,):
    raise ValueError(f"bias must be [K={num_codes}], got shape {tuple(bias.shape)}.")
  if positions is not None and gumbel is None:
    raise ValueError("positions need a Gumbel noise source (gumbel=GumbelSource(...)).")
  if gumbel is None:
    sampled = 0
    positions = jnp.zeros((batch, 0), jnp.int32)
  else:
    if positions is None:
      sampled = length
    else:
      if positions.ndim != 2 or positions.shape[0] != batch:
        raise ValueError(f"positions must be [B={batch}, S], got {tuple(positions.shape)}.")
      sampled = positions.shape[1]
    if (gumbel.key is None) == (gumbel.noise is None):
      raise ValueError("GumbelSource takes exactly one of key= and noise=.")
    if gumbel.noise is not None and gumbel.noise.shape != (batch, sampled, num_codes):
      raise ValueError(f"noise must be [B, S, K] = {(batch, sampled, num_codes)}, got "
                       f"{tuple(gumbel.noise.shape)}.")
    if positions is None:
      positions = jnp.zeros((batch, 0), jnp.int32)
  if gumbel is None or sampled == 0:
    gumbel_key, noise = None, jnp.zeros((batch, 0, num_codes), jnp.float32)
    sampled = 0
  elif gumbel.key is not None:
    gumbel_key, noise = gumbel.key, jnp.zeros((batch, 0, num_codes), jnp.float32)
  else:
    gumbel_key, noise = None, gumbel.noise
  tau = jnp.asarray(tau, jnp.float32)
  if tau.ndim != 0:
    raise ValueError(f"tau must be a scalar, got shape {tuple(tau.shape)}.")
  if block_entries is not None:
    block = max(1, block_entries // (batch * num_codes))
  elif jax.default_backend() == "cpu":
    block = max(CPU_BLOCK_ENTRIES // (batch * num_codes), -(-MIN_BLOCK_ROWS // batch))
  else:
    block = length
  # Key data travels as an array (a custom_vjp input); a typed key is rebuilt inside.
  key_data = (jnp.zeros((0,), jnp.uint32) if gumbel_key is None
              else jax.random.key_data(gumbel_key))
  key_impl = None if gumbel_key is None else jax.random.key_impl(gumbel_key)
  config = _Config(sampled=sampled, all_sampled=sampled == length and sampled > 0,
                   per_position_kl=per_position_kl, block=_block_for(length, block),
                   key_impl=key_impl)
  # Jitted so that eager calls run one program, not one dispatch per operation.
  return CategoricalQuantized(*_quantize_jit(config, logits, bias, codebook, noise, key_data,
                                             positions.astype(jnp.int32), tau))


class _Config(NamedTuple):
  """Static settings of one `categorical_quantize` call."""

  sampled: int            # S, stochastic positions per row (0: none)
  all_sampled: bool       # S == L: no gather, every position sampled
  per_position_kl: bool
  block: int              # positions per block
  key_impl: object        # the Gumbel key's PRNG implementation, or None (noise array)


def _block_for(total: int, target: int) -> int:
  """Block size for `total` positions near `target`: a divisor of `total` when one is at
  least half the target (every block then runs in the loop), else `target`."""
  target = max(1, min(target, total))
  for size in range(target, max(1, target // 2) - 1, -1):
    if total % size == 0:
      return size
  return target


def _for_blocks(total: int, block: int, body, carry):
  """carry = body(start, size, carry) over [0, total) in blocks of `block` (a loop on the
  CPU; one call when a single block covers everything). `size` is static."""
  full, rest = divmod(total, block)
  if full == 1 and rest == 0:
    return body(0, block, carry)
  if full:
    carry = jax.lax.fori_loop(0, full, lambda i, c: body(i * block, block, c), carry)
  if rest:
    carry = body(full * block, rest, carry)
  return carry


def _rows(x: jax.Array, start, size: int) -> jax.Array:
  """x[:, start:start + size] (dynamic start, static size)."""
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _set_rows(x: jax.Array, update: jax.Array, start) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis=1)


def _gather(x: jax.Array, positions: jax.Array) -> jax.Array:
  """[B, L, ...] rows at [B, S] positions → [B, S, ...]."""
  index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _max_and_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """([..., 1] max, [...] first index of it): a max and a min over positions (XLA's CPU
  backend runs a value-and-index argmax as a scalar loop)."""
  best = jnp.max(x, axis=-1, keepdims=True)
  positions = jnp.arange(x.shape[-1], dtype=jnp.int32)
  index = jnp.min(jnp.where(x == best, positions, x.shape[-1]), axis=-1)
  return best, jnp.minimum(index, x.shape[-1] - 1)  # A NaN row: keep the index in range.


def _tempered(x: jax.Array, best: jax.Array, tau: jax.Array) -> jax.Array:
  """x/τ − max(x)/τ, the exponent of softmax(x/τ), rounded as `jax.nn.softmax` rounds it
  (division is monotonic, so max(x/τ) = max(x)/τ; (x − max)/τ would round differently,
  which shows in log K − H(p̄), a difference of nearly equal numbers)."""
  return x / tau - best / tau


def _noise_rows(config: _Config, key_data, noise, start, size: int, num_codes: int):
  """Gumbel noise of stochastic rows start … start + size − 1 of every sample: [B, size, K]."""
  if config.key_impl is None:
    return _rows(noise, start, size).astype(jnp.float32)
  key = jax.random.wrap_key_data(key_data, impl=config.key_impl)
  batch = noise.shape[0]
  ids = (jnp.arange(batch, dtype=jnp.int32)[:, None] * config.sampled
         + start + jnp.arange(size, dtype=jnp.int32))
  return gumbel_rows(key, ids, num_codes)


def _stores_perturbed(config: _Config) -> bool:
  """Whether the forward pass keeps ℓ + g of the stochastic rows for the backward pass.

  Noise drawn from a key for a subset of rows: kept ([B, S, K]), since drawing it again
  block by block would draw it for every position of a block. Every position sampled:
  drawn again (a kept copy would be a whole new [N, K] array). A noise array: read again.
  """
  return config.key_impl is not None and not config.all_sampled


def _forward(config: _Config, logits, bias, codebook, noise, key_data, positions, tau):
  batch, length, num_codes = logits.shape
  bias32 = bias.astype(jnp.float32)

  def sample_stats(perturbed):
    best, index = _max_and_argmax(perturbed)
    return best[..., 0], index, jnp.sum(jnp.exp(_tempered(perturbed, best, tau)), axis=-1)

  def block_stats(start, size, carry):
    """Per position: max, argmax, Σ exp of ℓ/τ (and of ℓ + g when every position is
    sampled), accumulating p̄ and the per-position KL."""
    rows, prob_sum, kl_sum = carry
    x = _rows(logits, start, size).astype(jnp.float32) + bias32
    best, argmax = _max_and_argmax(x)
    exp = jnp.exp(_tempered(x, best, tau))
    sum_exp = jnp.sum(exp, axis=-1, keepdims=True)
    prob_sum = prob_sum + jnp.sum(exp / sum_exp, axis=1)
    new = {"best": best[..., 0], "argmax": argmax, "sum_exp": sum_exp[..., 0]}
    if config.per_position_kl:
      # Σ_k p_k log p_k = Σ_k e_k (ℓ_k − m) / Σ_k e_k − log Σ_k e_k, e = exp(ℓ − m): one
      # exp per entry, with the argmax's row max.
      centered = x - best
      exp1 = jnp.exp(centered)
      sum1 = jnp.sum(exp1, axis=-1)
      log_sum1 = jnp.log(sum1)
      kl_sum = kl_sum + jnp.sum(jnp.sum(exp1 * centered, axis=-1) / sum1 - log_sum1, axis=1)
      new["log_sum1"] = log_sum1
    if config.all_sampled:
      perturbed = x + _noise_rows(config, key_data, noise, start, size, num_codes)
      new["sample_best"], new["sample_index"], new["sample_sum"] = sample_stats(perturbed)
    rows = {name: _set_rows(rows[name], value, start) for name, value in new.items()}
    return rows, prob_sum, kl_sum

  floats = jnp.zeros((batch, length), jnp.float32)
  ints = jnp.zeros((batch, length), jnp.int32)
  rows = {"best": floats, "argmax": ints, "sum_exp": floats}
  if config.per_position_kl:
    rows["log_sum1"] = floats
  if config.all_sampled:
    rows.update(sample_best=floats, sample_index=ints, sample_sum=floats)
  rows, prob_sum, kl_sum = _for_blocks(
      length, config.block, block_stats,
      (rows, jnp.zeros((batch, num_codes), jnp.float32), jnp.zeros((batch,), jnp.float32)))
  # Per-sample partial sums first, then over the batch: one reduction across devices.
  mean_probs = jnp.sum(prob_sum, axis=0) / (batch * length)
  kl = (jnp.log(jnp.float32(num_codes)) + jnp.sum(kl_sum) / (batch * length)
        if config.per_position_kl else jnp.zeros((), jnp.float32))
  argmax_indices = rows["argmax"]
  indices = argmax_indices
  empty = jnp.zeros((batch, 0), jnp.float32)
  sample_best = rows.get("sample_best", empty)
  sample_sum = rows.get("sample_sum", empty)
  perturbed_rows = jnp.zeros((batch, 0, num_codes), jnp.float32)
  if config.all_sampled:
    indices = rows["sample_index"]
  elif config.sampled:
    store = _stores_perturbed(config)

    def sampled_block(start, size, carry):
      best_s, index_s, sum_s, perturbed_all = carry
      where = _rows(positions, start, size)
      x = _gather(logits, where).astype(jnp.float32) + bias32
      perturbed = x + _noise_rows(config, key_data, noise, start, size, num_codes)
      best, index, sum_exp = sample_stats(perturbed)
      if store:
        perturbed_all = _set_rows(perturbed_all, perturbed, start)
      return (_set_rows(best_s, best, start), _set_rows(index_s, index, start),
              _set_rows(sum_s, sum_exp, start), perturbed_all)

    block = _block_for(config.sampled, config.block * length // config.sampled)
    floats = jnp.zeros((batch, config.sampled), jnp.float32)
    if store:
      perturbed_rows = jnp.zeros((batch, config.sampled, num_codes), jnp.float32)
    sample_best, sample_index, sample_sum, perturbed_rows = _for_blocks(
        config.sampled, block, sampled_block,
        (floats, jnp.zeros((batch, config.sampled), jnp.int32), floats, perturbed_rows))
    batch_rows = jnp.arange(batch)[:, None]
    indices = argmax_indices.at[batch_rows, positions].set(sample_index, unique_indices=True)
  quantized = jnp.take(codebook, indices, axis=0).astype(logits.dtype)
  outputs = (quantized, indices, argmax_indices, mean_probs, kl)
  residuals = (logits, bias, codebook, noise, key_data, positions, tau, rows["best"],
               rows["sum_exp"], rows.get("log_sum1", empty), sample_best, sample_sum,
               perturbed_rows, indices)
  return outputs, residuals


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _quantize(config, logits, bias, codebook, noise, key_data, positions, tau):
  return _forward(config, logits, bias, codebook, noise, key_data, positions, tau)[0]


def _quantize_fwd(config, logits, bias, codebook, noise, key_data, positions, tau):
  # symbolic_zeros=True: the inputs come wrapped, saying which are differentiated.
  perturbed = (logits.perturbed, bias.perturbed, codebook.perturbed, tau.perturbed)
  outputs, residuals = _forward(config, logits.value, bias.value, codebook.value, noise.value,
                                key_data.value, positions.value, tau.value)
  return outputs, (perturbed, residuals)


def _softmax_backward(tempered, sum_exp, cotangent, tau):
  """For s = softmax(x/τ), `tempered` = x/τ − max(x)/τ: (∂L/∂x, its part of ∂L/∂τ).

  ∂L/∂x = s ⊙ (c − ⟨s, c⟩)/τ and ∂L/∂τ = −Σ (∂L/∂x) ⊙ x/τ; x may be shifted by its row
  max there, since the rows of ∂L/∂x sum to 0.
  """
  probs = jnp.exp(tempered) / sum_exp
  weighted = probs * (cotangent - jnp.sum(probs * cotangent, axis=-1, keepdims=True))
  return weighted / tau, -jnp.sum(weighted * tempered) / tau


def _quantize_bwd(config: _Config, saved, cotangents):
  (logits_perturbed, bias_perturbed, codebook_perturbed, tau_perturbed), residuals = saved
  (logits, bias, codebook, noise, key_data, positions, tau, best, sum_exp, log_sum1,
   sample_best, sample_sum, perturbed_rows, indices) = residuals
  grad_quantized, _, _, grad_mean, grad_kl = cotangents
  batch, length, num_codes = logits.shape
  count = batch * length
  with_quantized = not isinstance(grad_quantized, SymbolicZero)
  with_mean = not isinstance(grad_mean, SymbolicZero)
  with_kl = config.per_position_kl and not isinstance(grad_kl, SymbolicZero)

  grad_codebook = None
  if codebook_perturbed and with_quantized:
    # The gather's transpose: each code receives the sum of its positions' cotangents.
    flat = grad_quantized.astype(jnp.float32).reshape(-1, codebook.shape[-1])
    grad_codebook = jnp.zeros(codebook.shape, jnp.float32).at[indices.reshape(-1)].add(
        flat).astype(codebook.dtype)
  none = (None,) * 4
  if not (logits_perturbed or bias_perturbed or tau_perturbed) or not (
      with_quantized or with_mean or with_kl):
    return (None, None, grad_codebook) + none

  bias32 = bias.astype(jnp.float32)
  codebook32 = codebook.astype(jnp.float32)
  grad_quantized32 = grad_quantized.astype(jnp.float32) if with_quantized else None
  mean_cotangent = grad_mean.astype(jnp.float32) / count if with_mean else None
  kl_cotangent = grad_kl.astype(jnp.float32) / count if with_kl else None
  sampled = config.sampled and with_quantized
  if sampled and not config.all_sampled:
    # Per position: its row among the stochastic ones (the stored ℓ + g), or −1.
    batch_rows = jnp.arange(batch)[:, None]
    rank = jnp.full((batch, length), -1, jnp.int32).at[batch_rows, positions].set(
        jnp.broadcast_to(jnp.arange(config.sampled, dtype=jnp.int32), positions.shape),
        unique_indices=True)
    # The sampled rows' statistics, moved to their positions.
    sample_best = jnp.zeros((batch, length), jnp.float32).at[batch_rows, positions].set(
        sample_best, unique_indices=True)
    sample_sum = jnp.ones((batch, length), jnp.float32).at[batch_rows, positions].set(
        sample_sum, unique_indices=True)

  def block_gradient(start, size, carry):
    """∂L/∂ℓ of positions start … start + size − 1, written over their ℓ in `buffer`."""
    buffer, grad_bias, grad_tau = carry
    x = _rows(buffer, start, size).astype(jnp.float32) + bias32
    grad = jnp.zeros(x.shape, jnp.float32)
    # ∂L/∂one-hot = ∂L/∂z_q · codebookᵀ, the straight-through softmaxes' cotangent,
    # formed for this block only.
    one_hot_cotangent = None
    if with_quantized:
      one_hot_cotangent = jnp.einsum("bld,kd->blk", _rows(grad_quantized32, start, size),
                                     codebook32, preferred_element_type=jnp.float32)
    is_sampled = None
    if sampled and not config.all_sampled:
      block_rank = _rows(rank, start, size)
      is_sampled = (block_rank >= 0)[..., None]

    # Deterministic positions and p̄ share softmax(ℓ/τ): one softmax backward for both.
    cotangent = None
    if with_quantized and not config.all_sampled:
      cotangent = (one_hot_cotangent if is_sampled is None
                   else jnp.where(is_sampled, 0.0, one_hot_cotangent))
    if mean_cotangent is not None:
      cotangent = mean_cotangent if cotangent is None else cotangent + mean_cotangent
    if cotangent is not None:
      row_best = _rows(best, start, size)[..., None]
      grad_x, grad_t = _softmax_backward(
          _tempered(x, row_best, tau), _rows(sum_exp, start, size)[..., None],
          jnp.broadcast_to(cotangent, x.shape), tau)
      grad, grad_tau = grad + grad_x, grad_tau + grad_t
    if kl_cotangent is not None:
      # ∂KL_i/∂ℓ_i = p_i ⊙ (log p_i − Σ_k p_ik log p_ik), p_i = softmax(ℓ_i).
      log_probs1 = (x - _rows(best, start, size)[..., None]
                    - _rows(log_sum1, start, size)[..., None])
      probs1 = jnp.exp(log_probs1)
      neg_entropy = jnp.sum(probs1 * log_probs1, axis=-1, keepdims=True)
      grad = grad + kl_cotangent * probs1 * (log_probs1 - neg_entropy)

    if sampled:
      # Stochastic positions: the gradient of softmax((ℓ + g)/τ).
      if config.all_sampled:
        perturbed = x + _noise_rows(config, key_data, noise, start, size, num_codes)
        cotangent = one_hot_cotangent
      else:
        rows_here = jnp.maximum(block_rank, 0)
        if _stores_perturbed(config):
          perturbed = _gather(perturbed_rows, rows_here)
        else:
          perturbed = x + _gather(noise, rows_here).astype(jnp.float32)
        cotangent = jnp.where(is_sampled, one_hot_cotangent, 0.0)
      grad_x, grad_t = _softmax_backward(
          _tempered(perturbed, _rows(sample_best, start, size)[..., None], tau),
          _rows(sample_sum, start, size)[..., None], cotangent, tau)
      grad, grad_tau = grad + grad_x, grad_tau + grad_t
    # In place: this block's ℓ has been read and is not needed again.
    buffer = _set_rows(buffer, grad.astype(buffer.dtype), start)
    return buffer, grad_bias + jnp.sum(grad, axis=1), grad_tau

  grad_logits, grad_bias, grad_tau = _for_blocks(
      length, config.block, block_gradient,
      (logits, jnp.zeros((batch, num_codes), jnp.float32), jnp.zeros((), jnp.float32)))
  return (grad_logits if logits_perturbed else None,
          jnp.sum(grad_bias, axis=0).astype(bias.dtype) if bias_perturbed else None,
          grad_codebook, None, None, None, grad_tau if tau_perturbed else None)


_quantize.defvjp(_quantize_fwd, _quantize_bwd, symbolic_zeros=True)
_quantize_jit = jax.jit(_quantize, static_argnums=0)

