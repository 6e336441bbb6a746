"""VQ-Diffusion prior over tokenizer tokens: mask-and-replace discrete diffusion in NNX.

The forward process and every loss term are the pure ops in `rvq_jax.ops.diffusion`
(K+1 classes, [MASK] = K, 0-based timesteps t ∈ [0, T) with t=0 the first noising step).
This module is the denoiser and the three things a training stage calls:

  loss           importance-sampled VLB (nats per token) + aux_weight × the auxiliary
                 −log p(x_0|x_t) term, both divided by p(t) as the released code does.
  negative_elbo  an unbiased estimate of −ELBO (nats per sequence) for held-out NLL.
  sample         from all-[MASK], T or fewer (strided) reverse steps under `lax.scan`,
                 with truncation, temperature and classifier-free guidance; a strided
                 step follows `skip_rule` ('exact' posterior, or the 'released' code's).
                 Truncation rate, temperature and guidance scale are traced arguments
                 of the compiled sampler (new values do not recompile).

Denoiser (bidirectional, x_0-parameterization):

  input   [c_1 … c_Lc, e(x_t,0) + p_0, …, e(x_t,L−1) + p_{L−1}]        [B, Lc + L, W]
  output  hidden states at the L token positions → log p(x_0 | x_t)     [B, L, M, K]

c is `ConditionEmbedding`'s prefix; e sums the M sub-token embeddings of a position
(tables of K+1 rows: the codes and [MASK]); p is a learned position embedding. The
timestep enters every block through AdaLN-Zero: sinusoidal(t) → MLP → `conditioning`.
Each sub-token channel m has its own output head over the K codes (never [MASK]); the M
channels diffuse independently.

Importance sampling keeps E[L_t²] and per-t counts in `DiffusionLossHistory` variables
(not `nnx.Param`: optimizers built with `wrt=nnx.Param` skip them, checkpoints keep them),
updated in place by `loss` in training mode from batch-global sums.

Logical axis names: token embeddings (None, 'vocab', 'embed') [M, K+1, W]; position
embeddings ('position', 'embed'); timestep MLP ('embed', 'mlp') / ('mlp', 'embed');
output heads ('embed', None, 'vocab') [W, M, K]; the transformer's as in
`rvq_jax.models.layers.transformer`.
"""
from __future__ import annotations

import math
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
from rvq_jax.ops import diffusion

# Importance sampling stays uniform until every t has been trained on more than this.
_WARMUP_COUNT = 10


def timestep_embedding(t: jax.Array, width: int, *, max_period: float = 10000.0) -> jax.Array:
  """Transformer sinusoids of integer timesteps: t [B] → [B, width] float32."""
  half = width // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = t.astype(jnp.float32)[:, None] * freqs[None]
  out = jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)
  return jnp.pad(out, ((0, 0), (0, width - 2 * half)))


class DiffusionLossHistory(nnx.Variable):
  """Importance-sampling statistics (E[L_t²], counts per t): state, not a parameter."""


class DiffusionPrior(Prior):
  """VQ-Diffusion prior p(tokens | condition) (see the module docstring).

  Training options: `condition_dropout` (rows trained with the null condition, for
  guidance) and `aux_weight` (the auxiliary x_0 loss's weight).
  """

  SAMPLE_OPTIONS = ("num_steps", "truncation_rate", "temperature", "guidance_scale",
                    "skip_rule")
  PROGRESS_KEYS = ("loss", "vlb_bits", "aux", "accuracy", "grad_norm")
  LOSS_OPTIONS = ("aux_weight",)
  MODEL_OPTIONS = ("num_timesteps",)

  def __init__(self, *, vocab_size: int, num_subtokens: int = 1,
               grid_size: tuple[int, int], condition: str = "none", num_classes: int = 0,
               num_timesteps: int = 100, width: int = 512, depth: int = 12,
               num_heads: int = 8, mlp_ratio: int = 4, dropout: float = 0.0,
               aux_weight: float = 5e-4, adaptive_aux_weight: bool = True,
               dtype: Any = "float32", remat: str = "none", condition_dropout: float = 0.0,
               rngs: nnx.Rngs):
    # Sizes, heads and dropout are checked by TokenLayout and the Transformer.
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
      raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}.")
    if not aux_weight >= 0.0:
      raise ValueError(f"aux_weight must be >= 0, got {aux_weight}.")
    self.num_timesteps = num_timesteps
    self.aux_weight = float(aux_weight)
    self.adaptive_aux_weight = bool(adaptive_aux_weight)
    kw, init = self._init_shared(
        TokenLayout(vocab_size, num_subtokens, grid_size), condition=condition,
        num_classes=num_classes, width=width, dtype=dtype,
        condition_dropout=condition_dropout, rngs=rngs)
    # K + 1 rows per sub-token: the codes and [MASK].
    self.tok_embed = partitioning.param(
        init(rngs.params(), (num_subtokens, vocab_size + 1, width)), None, "vocab", "embed")
    self.pos_embed = partitioning.param(init(rngs.params(), (self.length, width)),
                                        "position", "embed")
    self.time_fc = nnx.Linear(width, width, kernel_metadata=partitioning.logical("embed", "mlp"),
                              bias_metadata=partitioning.logical("mlp"), **kw)
    self.time_proj = nnx.Linear(width, width,
                                kernel_metadata=partitioning.logical("mlp", "embed"),
                                bias_metadata=partitioning.logical("embed"), **kw)
    self.trunk = Transformer(width, depth, num_heads, mlp_ratio=mlp_ratio,
                             adaptive_norm_width=width, dropout=dropout, remat=remat, **kw)
    self.head = nnx.LinearGeneral(
        width, (num_subtokens, vocab_size), kernel_init=init,
        kernel_metadata=partitioning.logical("embed", None, "vocab"),
        bias_metadata=partitioning.logical(None, "vocab"), **kw)
    self.loss_sq = DiffusionLossHistory(jnp.zeros((num_timesteps,), jnp.float32))
    self.loss_count = DiffusionLossHistory(jnp.zeros((num_timesteps,), jnp.int32))

  # ------------------------------------------------------------------ checks

  @property
  def schedule(self) -> diffusion.DiffusionSchedule:
    """The forward process (constants; rebuilt per trace, folded into the program)."""
    return ops.make_schedule(self.num_timesteps, self.vocab_size)

  def _output(self, tokens: jax.Array) -> jax.Array:
    """[B, L, M] → the caller's layout, [B, L] when M = 1."""
    return tokens[..., 0] if self.num_subtokens == 1 else tokens

  # ------------------------------------------------------------------ network

  def _time_conditioning(self, t: jax.Array) -> jax.Array:
    """t [B] int → the AdaLN conditioning vector [B, W]."""
    emb = timestep_embedding(t, self.width).astype(self.dtype)
    return self.time_proj(jax.nn.silu(self.time_fc(emb)))

  def predict_x0(self, x_t: jax.Array, t: jax.Array, prefix: jax.Array, *,
                 deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
    """log p(x_0 | x_t): x_t [B, L, M] int in [0, K], t [B], prefix [B, Lc, W] →
    [B, L, M, K] float32, clamped to [LOG_ZERO, 0]."""
    table = self.tok_embed[...].astype(self.dtype)
    x = sum(jnp.take(table[m], x_t[..., m], axis=0) for m in range(self.num_subtokens))
    x = x + self.pos_embed[...].astype(self.dtype)
    seq = jnp.concatenate([prefix.astype(self.dtype), x], axis=1)
    hidden = self.trunk(seq, conditioning=self._time_conditioning(t),
                        deterministic=deterministic, rngs=rngs)[:, self.prefix_length:]
    logits = self.head(hidden).astype(jnp.float32)  # [B, L, M, K]
    return jnp.maximum(jax.nn.log_softmax(logits, axis=-1), diffusion.LOG_ZERO)

  # ------------------------------------------------------------------ training

  def loss(self, tokens: jax.Array, condition: jax.Array | None = None, *,
           key: jax.Array, deterministic: bool = False, condition_dropout: float | None = None,
           timesteps: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Importance-sampled VLB + aux_weight × aux, in nats per token; and metrics.

    tokens: [B, L] int (M = 1) or [B, L, M]. condition: None ('none'), [B] int ('class')
    or [B, h, w] int ('semantic'). key: timestep, noise, dropout and condition-dropout
    randomness. deterministic: no dropout, and the importance-sampling history is left
    alone (it is updated in place only in training mode). condition_dropout: probability
    that a row's condition is replaced by the learned null condition (default: the prior's
    own `condition_dropout`). timesteps: [B] int
    in [0, T) to use instead of drawing t (for tests and per-t diagnostics); p(t) is still
    the current sampling probability of each t.

    Per sample, L_t = Σ_tokens vlb term (KL of posteriors; decoder NLL at t=0) and
    aux = Σ_tokens −log p(x_0|x_t) (L_t at t=0), weighted by 2 − t/T when
    `adaptive_aux_weight`; both are divided by p(t) and by the B·L·M tokens, so 'vlb' is
    an unbiased estimate of the per-token VLB without its (≈ 0) prior term.

    Returns:
      (loss, metrics): 'loss', 'vlb' (nats/token), 'vlb_bits' (bits/token), 'aux',
      'accuracy' (argmax p(x_0|x_t) at [MASK] positions), 'mask_rate', 'warm' (1 once
      importance sampling has left its uniform warm-up).
    """
    x0 = self._check_tokens(tokens)
    batch = x0.shape[0]
    self.cond.check_condition(condition, batch)
    condition_dropout = self._check_condition_dropout(condition_dropout)
    schedule = self.schedule
    t_key, noise_key, drop_key, dropout_key = jax.random.split(key, 4)
    loss_sq, counts = self.loss_sq[...], self.loss_count[...]
    t, pt = ops.sample_timesteps(t_key, batch, loss_sq, counts, min_count=_WARMUP_COUNT)
    if timesteps is not None:
      if jnp.shape(timesteps) != (batch,):
        raise ValueError(f"timesteps must be [B={batch}], got shape {jnp.shape(timesteps)}.")
      t = jnp.asarray(timesteps, jnp.int32)
      pt = diffusion.timestep_probs(loss_sq, counts, min_count=_WARMUP_COUNT)[t]
    x_t = ops.q_sample(noise_key, x0, t, schedule)
    drop = self._drop_conditions(drop_key, condition_dropout, batch)
    prefix = self.cond(condition, batch_size=batch, drop=drop)
    log_p = self.predict_x0(x_t, t, prefix, deterministic=deterministic,
                            rngs=nnx.Rngs(dropout=dropout_key))

    terms = ops.vlb_terms(x0, log_p, x_t, t, schedule)  # [B, L, M]
    loss_t = jnp.sum(terms, axis=(1, 2))  # [B]
    aux_t = jnp.sum(diffusion.x0_cross_entropy(x0, log_p), axis=(1, 2))
    aux_t = jnp.where(t == 0, loss_t, aux_t)
    if self.adaptive_aux_weight:
      aux_t = aux_t * diffusion.adaptive_aux_weight(t, self.num_timesteps)
    num_tokens = self.length * self.num_subtokens
    vlb = jnp.mean(loss_t / pt) / num_tokens
    aux = jnp.mean(aux_t / pt) / num_tokens
    loss = vlb + self.aux_weight * aux

    if not deterministic:
      new_sq, new_counts = ops.update_loss_history(loss_sq, counts, t, loss_t)
      self.loss_sq[...] = new_sq
      self.loss_count[...] = new_counts

    masked = x_t == self.vocab_size
    correct = (jnp.argmax(log_p, axis=-1) == x0) & masked
    num_masked = jnp.sum(masked.astype(jnp.float32))
    metrics = {
        "loss": loss,
        "vlb": vlb,
        "vlb_bits": vlb / math.log(2.0),
        "aux": aux,
        "accuracy": jnp.sum(correct.astype(jnp.float32)) / jnp.maximum(num_masked, 1.0),
        "mask_rate": num_masked / masked.size,
        "warm": jnp.all(counts > _WARMUP_COUNT).astype(jnp.float32),
    }
    return loss, metrics

  def negative_elbo(self, tokens: jax.Array, condition: jax.Array | None = None, *,
                    key: jax.Array, exact: bool = False) -> jax.Array:
    """−ELBO in nats per sequence: [B] float32 (deterministic network, no dropout).

    −ELBO = Σ_{t<T} E_q[L_t] + KL(q(x_{T−1}|x_0) ‖ all-[MASK]). Default: one uniform t per
    sample, T·L_t + prior (unbiased, one network call). `exact=True` sums L_t over every
    t (T network calls, each on its own x_t draw): exact in t, still a sample over x_t.
    """
    x0 = self._check_tokens(tokens)
    batch = x0.shape[0]
    self.cond.check_condition(condition, batch)
    schedule = self.schedule
    prefix = self.cond(condition, batch_size=batch)
    prior = jnp.sum(diffusion.prior_kl(x0, schedule), axis=(1, 2))

    def term(t, noise_key):  # t [B] → Σ_tokens L_t [B]
      x_t = ops.q_sample(noise_key, x0, t, schedule)
      log_p = self.predict_x0(x_t, t, prefix, deterministic=True)
      return jnp.sum(ops.vlb_terms(x0, log_p, x_t, t, schedule), axis=(1, 2))

    t_key, noise_key = jax.random.split(key)
    if not exact:
      t = jax.random.randint(t_key, (batch,), 0, self.num_timesteps, jnp.int32)
      return self.num_timesteps * term(t, noise_key) + prior

    def step(total, step_t):
      t = jnp.full((batch,), step_t, jnp.int32)
      return total + term(t, jax.random.fold_in(noise_key, step_t)), None

    total, _ = jax.lax.scan(step, jnp.zeros((batch,), jnp.float32),
                            jnp.arange(self.num_timesteps, dtype=jnp.int32))
    return total + prior

  def heldout_nll(self, tokens: jax.Array, condition: jax.Array | None = None, *,
                  key: jax.Array) -> jax.Array:
    """−ELBO ≥ −log p in nats per sequence, [B]: the unbiased one-t estimate."""
    return self.negative_elbo(tokens, condition, key=key)

  # ------------------------------------------------------------------ sampling

  def _checked_sample_options(self, *, num_steps: int | None = None,
                              truncation_rate: Any = 1.0, temperature: Any = 1.0,
                              guidance_scale: Any = 1.0, skip_rule: str = "exact"
                              ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """Starts from all-[MASK] and runs `num_steps` reverse steps (None or 0: all T). With
    fewer steps the timesteps are evenly spaced from T−1 down to 0 and each step draws
    x_s at the next one by `skip_rule` (`ops.log_strided_posterior`): 'exact' (default)
    the strided posterior q(x_s|x_t, p(x_0|x_t)), 'released' VQ-Diffusion's released
    `sample_fast`, the one-step posterior of step s+1 with x_t in place of x_{s+1}. With
    all T steps the rules coincide and share one compile. The last
    step draws x_0 and never [MASK]. Per step, p(x_0|x_t) is guided (classifier-free,
    against the learned null condition, conditional and null rows in one batch), then
    tempered (log p / temperature, renormalized), then truncated to `truncation_rate` of
    its mass (`ops.truncate`).

    Run-time (traced) values: temperature (1 leaves p unchanged, by a `jnp.where`),
    truncation_rate, guidance_scale. Static structure (one compile each,
    `base.Prior.sample`): num_steps and skip_rule (the scan's length and step function);
    `guided` (guidance_scale ≠ 1 runs the null-condition rows too, doubling the batch);
    `truncated` (truncation_rate < 1), so that sampling without truncation never sorts.
    Python numbers are checked and set the flags from their values; arrays (traced) are
    not checked and turn their feature on (a rate >= 1 then keeps everything, a guidance
    scale of 1 gives the conditional distribution).
    """
    steps = self.num_timesteps if num_steps in (None, 0) else num_steps
    if not isinstance(steps, int) or not 1 <= steps <= self.num_timesteps:
      raise ValueError(f"num_steps must be an int in [1, T={self.num_timesteps}] (or None "
                       f"for all), got {num_steps!r}.")
    if is_number(truncation_rate) and not 0.0 < float(truncation_rate) <= 1.0:
      raise ValueError(f"truncation_rate must lie in (0, 1], got {truncation_rate}.")
    if is_number(temperature) and not float(temperature) > 0.0:
      raise ValueError(f"temperature must be > 0, got {temperature}.")
    if skip_rule not in diffusion.SKIP_RULES:
      raise ValueError(f"skip_rule must be one of {diffusion.SKIP_RULES}, got {skip_rule!r}.")
    if steps == self.num_timesteps:
      skip_rule = "exact"  # no step is skipped: the rules are the same function
    static = dict(num_steps=steps, skip_rule=skip_rule,
                  guided=not is_number(guidance_scale) or float(guidance_scale) != 1.0,
                  truncated=not is_number(truncation_rate) or float(truncation_rate) < 1.0)
    values = dict(
        truncation_rate=run_time_value("truncation_rate", truncation_rate, jnp.float32),
        temperature=run_time_value("temperature", temperature, jnp.float32),
        guidance_scale=run_time_value("guidance_scale", guidance_scale, jnp.float32))
    return static, values

  def _sample_impl(self, key, condition, *, num_samples, num_steps, skip_rule, guided,
                   truncated, truncation_rate, temperature, guidance_scale):
    n, vocab = num_samples, self.vocab_size
    schedule = self.schedule
    condition, drop, batch = self._guidance_batch(condition, n, guided)
    prefix = self.cond(condition, batch_size=batch, drop=drop)  # same at every step
    times, targets = diffusion.sampling_timesteps(self.num_timesteps, num_steps)

    def step(x, inputs):
      index, t, s = inputs
      x_in = jnp.concatenate([x, x], axis=0) if guided else x
      log_p = self.predict_x0(x_in, jnp.full((batch,), t), prefix)
      if guided:
        log_p = jax.nn.log_softmax(
            ops.classifier_free_guidance(log_p[:n], log_p[n:], guidance_scale), axis=-1)
      # Temperature 1 leaves log p as it is (exactly, not renormalized again).
      log_p = jnp.where(temperature == 1.0, log_p,
                        jax.nn.log_softmax(log_p / temperature, axis=-1))
      log_p = ops.truncate(jnp.maximum(log_p, diffusion.LOG_ZERO),
                           truncation_rate if truncated else 1.0)
      log_post = ops.log_strided_posterior(log_p, x, jnp.full((n,), t), jnp.full((n,), s),
                                           schedule, rule=skip_rule)  # [n, L, M, K+1]
      # The last step lands on x_0, which is never [MASK].
      is_mask_class = jnp.arange(vocab + 1) == vocab
      log_post = jnp.where((s < 0) & is_mask_class, -jnp.inf, log_post)
      return diffusion.sample_categorical(jax.random.fold_in(key, index), log_post), None

    x = jnp.full((n, self.length, self.num_subtokens), vocab, jnp.int32)
    steps = (jnp.arange(len(times), dtype=jnp.int32), jnp.asarray(times), jnp.asarray(targets))
    x, _ = jax.lax.scan(step, x, steps)
    return self._output(x)

