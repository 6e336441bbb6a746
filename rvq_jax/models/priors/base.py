"""The interface both priors implement, and the pieces they share.

A prior models the tokens of a frozen tokenizer, a raster sequence of L = h·w positions
each holding one token or M sub-tokens (`TokenLayout`), given an optional condition:

  loss(tokens, condition, *, key, deterministic)  → (scalar loss, metrics)  training
  heldout_nll(tokens, condition, *, key)          → [B] nats per sequence   evaluation
  sample(key, condition, *, num_samples, **opts)  → tokens                  generation

Training options (condition dropout, AR's pkeep, diffusion's auxiliary weight) are the
prior's attributes, set from `<prior>.loss` at construction, so a training loop calls
every prior the same way. `SAMPLE_OPTIONS` names the keyword options `sample` takes
(read from `<prior>.sample`), and `PROGRESS_KEYS` the metrics a progress line shows.

Sampling compiles once per static structure (the number of samples, whether guidance
doubles the batch, which filters are on, the diffusion's step count and skip rule); the
option values themselves (temperature, top-k, top-p, guidance scale, truncation rate)
are traced arguments of the jitted sampler, so changing them does not recompile.
"""
from __future__ import annotations

import functools
import numbers
from collections.abc import Mapping
from typing import Any
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from rvq_jax.models.layers import dtypes
from rvq_jax.models.priors.conditioning import ConditionEmbedding
from rvq_jax.models.priors.token_layout import TokenLayout
from rvq_jax.models.priors.token_layout import TokenSequenceModel


class Prior(TokenSequenceModel, nnx.Module):
  """Base of the AR and diffusion priors (see the module docstring)."""

  # Subclasses fill these in.
  SAMPLE_OPTIONS: ClassVar[tuple[str, ...]] = ()
  PROGRESS_KEYS: ClassVar[tuple[str, ...]] = ("loss", "grad_norm")
  # Keys of `<prior>.loss` the constructor takes (beyond condition_dropout).
  LOSS_OPTIONS: ClassVar[tuple[str, ...]] = ()
  # Keys of `<prior>.model` the constructor takes (beyond the shared transformer sizes).
  MODEL_OPTIONS: ClassVar[tuple[str, ...]] = ()

  layout: TokenLayout
  cond: ConditionEmbedding
  condition_dropout: float

  @classmethod
  def from_config(cls, settings: Mapping[str, Any], layout: TokenLayout, *, condition: str,
                  num_classes: int, rngs: nnx.Rngs) -> Prior:
    """The prior `settings` (`config.<prior>`) describes, for tokens laid out as `layout`."""
    model, loss = settings["model"], settings["loss"]
    return cls(
        vocab_size=layout.vocab_size, num_subtokens=layout.num_subtokens,
        grid_size=layout.grid_size, condition=condition, num_classes=num_classes,
        width=model["width"], depth=model["depth"], num_heads=model["num_heads"],
        mlp_ratio=model["mlp_ratio"], dropout=model["dropout"], dtype=model["dtype"],
        # Exports written before the option existed have no 'remat': 'none'.
        remat=model["remat"] if "remat" in model else "none",
        condition_dropout=loss["condition_dropout"],
        **{name: model[name] for name in cls.MODEL_OPTIONS},
        **{name: loss[name] for name in cls.LOSS_OPTIONS}, rngs=rngs)

  @classmethod
  def sample_options(cls, sample: Mapping[str, Any], **overrides) -> dict[str, Any]:
    """The keyword options of `sample` from `config.<prior>.sample`, then `overrides`."""
    options = {name: sample[name] for name in cls.SAMPLE_OPTIONS}
    unknown = set(overrides) - set(cls.SAMPLE_OPTIONS)
    if unknown:
      raise ValueError(f"{cls.__name__}.sample takes no option(s) {sorted(unknown)}; it takes "
                       f"{cls.SAMPLE_OPTIONS}.")
    options.update(overrides)
    return options

  @property
  def condition_kind(self) -> str:
    return self.cond.kind

  # ------------------------------------------------------------------ the interface

  def loss(self, tokens: jax.Array, condition: jax.Array | None = None, *, key: jax.Array,
           deterministic: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    raise NotImplementedError

  def heldout_nll(self, tokens: jax.Array, condition: jax.Array | None = None, *,
                  key: jax.Array) -> jax.Array:
    """−log p(tokens | condition) in nats per sequence, [B] (or an unbiased estimate)."""
    raise NotImplementedError

  def sample(self, key: jax.Array, condition: jax.Array | None = None, *, num_samples: int,
             **options) -> jax.Array:
    """Samples tokens [num_samples, L] int32 (or [num_samples, L, M]).

    condition: None ('none'), [num_samples] int ('class'), [num_samples, h, w] int
    ('semantic'). Options are Python numbers, checked before anything compiles, or
    scalar arrays (e.g. traced inside a caller's `jit`), taken as run-time values and
    not checked. Sampling is jitted (and traceable inside an outer `jit`) with the
    option *values* (temperature, top-k, top-p, guidance scale, truncation rate) as
    traced arguments, so changing a value reuses the compiled sampler; only the static
    structure compiles anew: num_samples and `_checked_sample_options`'s static part
    (whether guidance doubles the batch, which filters are on, the loop's shape; see
    each prior). A Python number picks the cheapest structure for its value (guidance
    scale 1: no null-condition rows; top_k 0, top_p 1, truncation rate 1: no filter);
    an array always compiles the feature in, so one program serves all of its values.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
      raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    self.cond.check_condition(condition, num_samples)
    static, values = self._checked_sample_options(**options)
    if static.get("guided") and self.cond.kind == "none":
      raise ValueError("classifier-free guidance (guidance_scale != 1) needs a class or "
                       "semantic condition; this prior is unconditional.")
    graphdef, state = nnx.split(self)
    return _sample_jit(graphdef, state, key, condition, values, num_samples=num_samples,
                       options=tuple(sorted(static.items())))

  def _checked_sample_options(self, **options) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """Validated options split into (static structure: hashable Python values that
    select the program, run-time values: float32/int32 scalar arrays it takes)."""
    raise NotImplementedError

  def _sample_impl(self, key: jax.Array, condition: jax.Array | None, *, num_samples: int,
                   **options) -> jax.Array:
    """Traced body of `sample`: `options` are the static structure and the run-time
    values of `_checked_sample_options` together."""
    raise NotImplementedError

  # ------------------------------------------------------------------ shared pieces

  def _init_shared(self, layout: TokenLayout, *, condition: str, num_classes: int,
                   width: int, dtype: Any, condition_dropout: float, rngs: nnx.Rngs
                   ) -> tuple[dict[str, Any], Any]:
    """Sets what every prior has (layout, width, compute dtype, condition embedding and
    dropout rate); returns the layers' keyword arguments and the embedding initializer."""
    self.condition_dropout = float(condition_dropout)
    self._check_condition_dropout(None)
    self.layout = layout
    self.width = width
    self.dtype = dtypes.compute_dtype(dtype)
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32, rngs=rngs)
    self.cond = ConditionEmbedding(condition, width, num_classes=num_classes,
                                   grid_size=self.grid_size, **kw)
    self.prefix_length = self.cond.prefix_length
    return kw, nnx.initializers.normal(dtypes.EMBED_STDDEV)

  def _check_condition_dropout(self, condition_dropout: float | None) -> Any:
    """The rate a training call uses: its override, else the prior's own."""
    rate = self.condition_dropout if condition_dropout is None else condition_dropout
    if isinstance(rate, (int, float)) and not 0.0 <= rate <= 1.0:
      raise ValueError(f"condition_dropout must be in [0, 1], got {rate}.")
    return rate

  def _drop_conditions(self, key: jax.Array, rate: Any, batch: int) -> jax.Array | None:
    """[B] bool: rows whose condition becomes the learned null one (None: no dropout)."""
    if self.cond.kind == "none" or (isinstance(rate, (int, float)) and rate == 0.0):
      return None
    return jax.random.bernoulli(key, rate, (batch,))

  @staticmethod
  def _guidance_batch(condition: jax.Array | None, num_samples: int, guided: bool
                      ) -> tuple[jax.Array | None, jax.Array | None, int]:
    """Classifier-free guidance runs the conditional and null rows in one batch.

    guided (static): whether guidance is on. Returns (condition for the batch, drop
    [batch] bool or None, batch size): rows num_samples.. are the null-condition branch.
    """
    if not guided:
      return condition, None, num_samples
    batch = 2 * num_samples
    return (jnp.concatenate([condition, condition], axis=0), jnp.arange(batch) >= num_samples,
            batch)


def is_number(value: Any) -> bool:
  """Whether a sampling option is a Python (or NumPy scalar) number, checked and used to
  pick the static structure, rather than an array taken as a run-time value."""
  return isinstance(value, numbers.Real)


def run_time_value(name: str, value: Any, dtype: Any) -> jax.Array:
  """A sampling option as the 0-d `dtype` array the jitted sampler takes."""
  if not is_number(value):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
    if jnp.issubdtype(dtype, jnp.integer) and not jnp.issubdtype(jnp.result_type(value),
                                                                  jnp.integer):
      raise ValueError(f"{name} must be an int, got an array of {jnp.result_type(value)}.")
  return jnp.asarray(value, dtype)


# `options`: the static structure, sorted (name, value) items; `values`: the run-time
# option values, {name: 0-d array}, traced, so new values reuse the compiled program.
@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "options"))
def _sample_jit(graphdef, state, key, condition, values, *, num_samples, options):
  return nnx.merge(graphdef, state)._sample_impl(key, condition, num_samples=num_samples,
                                                 **dict(options), **values)
