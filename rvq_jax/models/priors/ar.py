"""Auto-regressive prior over tokenizer tokens: taming-transformers' Net2Net GPT in NNX.

Sequence (L = h·w positions in raster order, Lc condition prefix tokens):

  input   [c_1 … c_Lc, e(t_0), …, e(t_{L−2})] + position embedding   [B, Lc + L − 1, W]
  output  hidden states at positions Lc−1 … Lc+L−2 predict t_0 … t_{L−1}

c is `ConditionEmbedding`'s prefix (one SOS token, one class token, or the h·w semantic
label tokens). The trunk is a causal pre-LN `Transformer`.

Factorized tokens (FQ, M = `num_subtokens` > 1): position i holds M sub-tokens t_{i,m},
each from its own K-code sub-codebook. The trunk input embeds a position as the sum of
its M sub-token embeddings; a small causal sub-token transformer (`subtoken_depth`
blocks) then runs over M slots per position, [h_i, e'(t_{i,0}), …, e'(t_{i,M−2})] +
slot embedding, and slot m predicts t_{i,m} with its own output projection. So
log p(t) = Σ_i Σ_m log p(t_{i,m} | t_{<i}, t_{i,<m}, c).

Sampling draws positions in turn under `lax.fori_loop`; `use_cache=True` feeds one new
token per step through the trunk with a per-layer KV cache (O(L) per step), and
`use_cache=False` recomputes the whole sequence each step (O(L²)); both draw step i's
randomness from `fold_in(key, i)` (and `fold_in(·, m)` per sub-token), so they return
the same tokens. Classifier-free guidance (scale ≠ 1) runs the conditional and the
null-conditional rows as one batch of 2N and mixes their log-probabilities with
`ops.classifier_free_guidance`. Temperature, top-k, top-p and the guidance scale are
traced arguments of the compiled sampler (new values do not recompile); whether
guidance and each filter are on, and use_cache, are its static structure.

Logical axis names: token embeddings (None, 'vocab', 'embed') [M, K, W]; position
embeddings ('position', 'embed'); output projections ('embed', 'vocab') (per-slot
(None, 'embed', 'vocab')); the transformer's names as in `rvq_jax.models.layers.transformer`.
"""
from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax import ops
from rvq_jax.models.layers import partitioning
from rvq_jax.models.layers.transformer import Transformer
from rvq_jax.models.priors.base import Prior
from rvq_jax.models.priors.base import is_number
from rvq_jax.models.priors.base import run_time_value
from rvq_jax.models.priors.token_layout import TokenLayout


class ARPrior(Prior):
  """GPT prior p(tokens | condition) over raster-order (sub-)tokens.

  Training options: `condition_dropout` (rows trained with the null condition, for
  guidance) and taming's `pkeep` (input tokens kept with this probability, otherwise
  replaced by uniform random ids; the targets stay clean).
  """

  SAMPLE_OPTIONS = ("temperature", "top_k", "top_p", "guidance_scale")
  PROGRESS_KEYS = ("loss", "nll", "accuracy", "grad_norm")
  LOSS_OPTIONS = ("pkeep",)

  def __init__(self, *, vocab_size: int, num_subtokens: int = 1,
               grid_size: tuple[int, int], condition: str = "none", num_classes: int = 0,
               width: int = 512, depth: int = 12, num_heads: int = 8, mlp_ratio: int = 4,
               dropout: float = 0.0, subtoken_depth: int = 1, dtype: Any = "float32",
               remat: str = "none", condition_dropout: float = 0.0, pkeep: float = 1.0,
               rngs: nnx.Rngs):
    # Sizes, heads and dropout are checked by TokenLayout and the Transformer.
    if vocab_size < 2:
      raise ValueError(f"vocab_size must be >= 2, got {vocab_size}.")
    if not 0.0 < pkeep <= 1.0:
      raise ValueError(f"pkeep must be in (0, 1], got {pkeep}.")
    self.pkeep = float(pkeep)
    self.dropout = dropout
    kw, init = self._init_shared(
        TokenLayout(vocab_size, num_subtokens, grid_size), condition=condition,
        num_classes=num_classes, width=width, dtype=dtype,
        condition_dropout=condition_dropout, rngs=rngs)
    self.tok_embed = partitioning.param(
        init(rngs.params(), (num_subtokens, vocab_size, width)), None, "vocab", "embed")
    self.pos_embed = partitioning.param(
        init(rngs.params(), (self.prefix_length + self.length - 1, width)),
        "position", "embed")
    self.trunk = Transformer(width, depth, num_heads, mlp_ratio=mlp_ratio, causal=True,
                             dropout=dropout, remat=remat, **kw)
    if num_subtokens == 1:
      # GPT's N(0, 0.02) output init: the initial loss is about log K.
      self.head = nnx.Linear(width, vocab_size, kernel_init=init,
                             kernel_metadata=partitioning.logical("embed", "vocab"),
                             bias_metadata=partitioning.logical("vocab"), **kw)
    else:
      m = num_subtokens
      self.sub_embed = partitioning.param(init(rngs.params(), (m - 1, vocab_size, width)),
                                          None, "vocab", "embed")
      self.sub_pos = partitioning.param(init(rngs.params(), (m, width)), "position", "embed")
      self.sub_trunk = Transformer(width, subtoken_depth, num_heads, mlp_ratio=mlp_ratio,
                                   causal=True, dropout=dropout, remat=remat, **kw)
      self.sub_head = nnx.LinearGeneral(
          width, (m, vocab_size), kernel_init=init,
          kernel_metadata=partitioning.logical("embed", None, "vocab"),
          bias_metadata=partitioning.logical(None, "vocab"), **kw)

  # ------------------------------------------------------------------ network

  def _embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, T, M] → Σ_m tok_embed[m, t_m]: [B, T, W]."""
    table = self.tok_embed[...].astype(self.dtype)
    return sum(jnp.take(table[m], tokens[..., m], axis=0)
               for m in range(self.num_subtokens))

  def _positions(self, start: int | jax.Array, size: int) -> jax.Array:
    pos = self.pos_embed[...].astype(self.dtype)
    return jax.lax.dynamic_slice_in_dim(pos, start, size, axis=0)

  def _dropout_inputs(self, x, deterministic, rngs):
    if deterministic or self.dropout == 0.0:
      return x
    keep = jax.random.bernoulli(rngs.dropout(), 1.0 - self.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

  def _subtoken_logits(self, hidden: jax.Array, sub_inputs: jax.Array, *,
                       deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """hidden [N, W], sub_inputs [N, M] (slot m sees sub_inputs[:, :m]) → [N, M, K] f32."""
    m = self.num_subtokens
    table = self.sub_embed[...].astype(self.dtype)
    previous = [jnp.take(table[j], sub_inputs[:, j], axis=0) for j in range(m - 1)]
    seq = jnp.stack([hidden.astype(self.dtype)] + previous, axis=1)  # [N, M, W]
    seq = seq + self.sub_pos[...].astype(self.dtype)
    out = self.sub_trunk(seq, deterministic=deterministic, rngs=rngs)
    logits = self.sub_head(out)  # [N, M, M, K]: every slot through every slot's head
    # Slot m uses head m.
    return jnp.einsum("nmmk->nmk", logits).astype(jnp.float32)

  def _position_logits(self, hidden: jax.Array, sub_inputs: jax.Array, **drop) -> jax.Array:
    """hidden [..., W], sub_inputs [..., M] → logits [..., M, K] float32."""
    if self.num_subtokens == 1:
      return self.head(hidden).astype(jnp.float32)[..., None, :]
    lead = hidden.shape[:-1]
    logits = self._subtoken_logits(hidden.reshape(-1, self.width),
                                   sub_inputs.reshape(-1, self.num_subtokens), **drop)
    return logits.reshape(*lead, self.num_subtokens, self.vocab_size)

  def _prefix(self, condition, batch_size, drop):
    return self.cond(condition, batch_size=batch_size, drop=drop)

  def logits(self, tokens: jax.Array, condition: jax.Array | None = None, *,
             drop: jax.Array | None = None, deterministic: bool = True,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """Teacher-forced logits [B, L, M, K] float32 (M = 1 for plain tokens).

    tokens: [B, L] or [B, L, M] int; condition as `loss`; drop: [B] bool null condition.
    logits[:, i, m] depends on tokens[:, :i] and tokens[:, i, :m] only.
    """
    tokens = self._check_tokens(tokens)
    batch = tokens.shape[0]
    self.cond.check_condition(condition, batch)
    return self._logits(tokens, condition, drop=drop, deterministic=deterministic, rngs=rngs)

  def _logits(self, tokens, condition, *, drop, deterministic, rngs):
    batch = tokens.shape[0]
    drop_kw = dict(deterministic=deterministic, rngs=rngs)
    prefix = self._prefix(condition, batch, drop)
    x = jnp.concatenate([prefix, self._embed_tokens(tokens[:, :-1])], axis=1)
    x = self._dropout_inputs(x + self._positions(0, x.shape[1]), **drop_kw)
    hidden = self.trunk(x, **drop_kw)[:, self.prefix_length - 1:]  # [B, L, W]
    return self._position_logits(hidden, tokens, **drop_kw)

  # ------------------------------------------------------------------ training

  def loss(self, tokens: jax.Array, condition: jax.Array | None = None, *,
           key: jax.Array, deterministic: bool = False, condition_dropout: float | None = None,
           pkeep: float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-(sub-)token cross-entropy in nats, and metrics {'nll', 'accuracy'}.

    tokens: [B, L] int32 (M = 1) or [B, L, M]. condition: None ('none'), [B] int
    ('class') or [B, h, w] int ('semantic'). key: dropout, pkeep and condition-dropout
    randomness. condition_dropout: probability that a row's condition is replaced by the
    null condition. pkeep: each *input* token is kept with probability pkeep and
    otherwise replaced by a uniform random id (taming); the targets stay the clean ones.
    Both default to the prior's own (`self.condition_dropout`, `self.pkeep`).
    """
    targets = self._check_tokens(tokens)
    batch = targets.shape[0]
    self.cond.check_condition(condition, batch)
    pkeep = self.pkeep if pkeep is None else pkeep
    if not 0.0 < pkeep <= 1.0:
      raise ValueError(f"pkeep must be in (0, 1], got {pkeep}.")
    condition_dropout = self._check_condition_dropout(condition_dropout)
    dropout_key, keep_key, random_key, drop_key = jax.random.split(key, 4)
    inputs = targets
    if pkeep < 1.0:
      keep = jax.random.bernoulli(keep_key, pkeep, targets.shape)
      random = jax.random.randint(random_key, targets.shape, 0, self.vocab_size, jnp.int32)
      inputs = jnp.where(keep, targets, random)
    drop = self._drop_conditions(drop_key, condition_dropout, batch)
    logits = self._logits(inputs, condition, drop=drop, deterministic=deterministic,
                          rngs=nnx.Rngs(dropout=dropout_key))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    loss = jnp.mean(nll)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return loss, {"nll": loss, "accuracy": accuracy}

  def log_likelihood(self, tokens: jax.Array, condition: jax.Array | None = None
                     ) -> jax.Array:
    """Σ log p(tokens | condition) in nats per sequence: [B] float32 (deterministic)."""
    targets = self._check_tokens(tokens)
    self.cond.check_condition(condition, targets.shape[0])
    logits = self._logits(targets, condition, drop=None, deterministic=True, rngs=None)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(picked, axis=(1, 2))

  def heldout_nll(self, tokens: jax.Array, condition: jax.Array | None = None, *,
                  key: jax.Array) -> jax.Array:
    """Exact −log p(tokens | condition) in nats per sequence, [B] (`key` is unused)."""
    del key
    return -self.log_likelihood(tokens, condition)

  # ------------------------------------------------------------------ sampling

  def _checked_sample_options(self, *, temperature: Any = 1.0, top_k: Any = 0,
                              top_p: Any = 1.0, guidance_scale: Any = 1.0,
                              use_cache: bool = True, max_top_k: int | None = None
                              ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable the filters
    (`ops.sample_logits`); guidance_scale ≠ 1 applies classifier-free guidance against the
    learned null condition; use_cache=False recomputes the prefix at every position (the
    reference the KV cache is tested against).

    Run-time (traced) values: temperature (greedy or not is a `jnp.where` on its value,
    not a recompile), top_k, top_p, guidance_scale. Static structure (`base.Prior.sample`):
    use_cache (another loop); `guided` (guidance_scale ≠ 1 runs the null-condition rows
    too, doubling the batch); `top_k_on` (0 < top_k < K) and `top_p_on` (top_p < 1), so
    that sampling without a filter never sorts; `max_top_k` (default K), the static
    bound of the top-k sort (`ops.top_k_filter`): a traced k above it acts as max_top_k,
    so a smaller bound (a cheaper sort for a large K) must be >= every k used. Python
    numbers are checked and set the flags from their values; arrays (traced) are not
    checked and turn their feature on (guided, filter on; k <= 0 / p >= 1 then keep
    everything, guidance scale 1 gives the conditional distribution).
    """
    if is_number(temperature) and float(temperature) < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}.")
    if isinstance(top_k, numbers.Number) and (not isinstance(top_k, numbers.Integral)
                                              or top_k < 0):
      raise ValueError(f"top_k must be a non-negative int, got {top_k!r}.")
    if is_number(top_p) and not 0.0 < float(top_p) <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    bound = self.vocab_size if max_top_k is None else max_top_k
    if not isinstance(bound, int) or not 1 <= bound <= self.vocab_size:
      raise ValueError(f"max_top_k must be an int in [1, K={self.vocab_size}] (or None "
                       f"for K), got {max_top_k!r}.")
    top_k_on = not is_number(top_k) or 0 < top_k < self.vocab_size
    if is_number(top_k) and top_k_on and top_k > bound:
      raise ValueError(f"top_k={top_k} exceeds max_top_k={bound}.")
    static = dict(use_cache=bool(use_cache),
                  guided=not is_number(guidance_scale) or float(guidance_scale) != 1.0,
                  top_k_on=top_k_on, top_p_on=not is_number(top_p) or float(top_p) < 1.0,
                  max_top_k=bound if top_k_on else None)
    values = dict(temperature=run_time_value("temperature", temperature, jnp.float32),
                  top_k=run_time_value("top_k", top_k, jnp.int32),
                  top_p=run_time_value("top_p", top_p, jnp.float32),
                  guidance_scale=run_time_value("guidance_scale", guidance_scale,
                                                jnp.float32))
    return static, values

  def _sample_impl(self, key, condition, *, num_samples, use_cache, guided, top_k_on,
                   top_p_on, max_top_k, temperature, top_k, top_p, guidance_scale):
    n, m, length, lc = num_samples, self.num_subtokens, self.length, self.prefix_length
    condition, drop, batch = self._guidance_batch(condition, n, guided)
    prefix = self._prefix(condition, batch, drop)  # [batch, Lc, W]
    # A filter that is off is the Python default, so `ops` compiles no sort for it.
    top_k = top_k if top_k_on else 0
    top_p = top_p if top_p_on else 1.0

    def both(x):  # rows of the n samples → rows of the batch
      return jnp.concatenate([x, x], axis=0) if guided else x

    def draw(step_key, logits):  # logits [batch, K] → ids [n]
      if guided:
        logits = ops.classifier_free_guidance(logits[:n], logits[n:], guidance_scale)
      return ops.sample_logits(step_key, logits, temperature=temperature, top_k=top_k,
                               top_p=top_p, max_top_k=max_top_k)

    def pick(step_key, hidden):  # hidden [batch, W] → ids [n, M]
      if m == 1:
        return draw(step_key, self.head(hidden).astype(jnp.float32))[:, None]
      subs = jnp.zeros((n, m), jnp.int32)
      for j in range(m):
        logits = self._subtoken_logits(hidden, both(subs))[:, j]
        subs = subs.at[:, j].set(draw(jax.random.fold_in(step_key, j), logits))
      return subs

    tokens = jnp.zeros((n, length, m), jnp.int32)
    if use_cache:
      cache = self.trunk.init_cache(batch, lc + length - 1)
      hidden, cache = self.trunk(prefix + self._positions(0, lc), cache=cache)
      tokens = tokens.at[:, 0].set(pick(jax.random.fold_in(key, 0), hidden[:, -1]))

      def step(i, carry):
        tokens, cache = carry
        previous = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1)  # [n, 1, M]
        x = self._embed_tokens(both(previous)) + self._positions(lc + i - 1, 1)
        hidden, cache = self.trunk(x, cache=cache)
        ids = pick(jax.random.fold_in(key, i), hidden[:, 0])
        return jax.lax.dynamic_update_index_in_dim(tokens, ids, i, axis=1), cache

      tokens, _ = jax.lax.fori_loop(1, length, step, (tokens, cache))
    else:

      def step(i, tokens):
        x = jnp.concatenate([prefix, self._embed_tokens(both(tokens[:, :-1]))], axis=1)
        hidden = self.trunk(x + self._positions(0, x.shape[1]))
        hidden = jax.lax.dynamic_index_in_dim(hidden, lc - 1 + i, axis=1, keepdims=False)
        ids = pick(jax.random.fold_in(key, i), hidden)
        return jax.lax.dynamic_update_index_in_dim(tokens, ids, i, axis=1)

      tokens = jax.lax.fori_loop(0, length, step, tokens)
    return tokens[..., 0] if m == 1 else tokens

