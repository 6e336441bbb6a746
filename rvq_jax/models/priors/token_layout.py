"""The shape of what a prior models: L = h·w positions of one token, or of M sub-tokens
(a factorized FQ tokenizer), each from K codes."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """`grid_size` positions with `num_subtokens` tokens of `vocab_size` codes each."""

  vocab_size: int
  num_subtokens: int
  grid_size: tuple[int, int]

  def __post_init__(self):
    grid_size = tuple(self.grid_size)
    if len(grid_size) != 2 or any(not isinstance(g, int) or g < 1 for g in grid_size):
      raise ValueError(f"grid_size must be two positive ints, got {self.grid_size!r}.")
    object.__setattr__(self, "grid_size", grid_size)
    for name in ("vocab_size", "num_subtokens"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")

  @property
  def length(self) -> int:
    return self.grid_size[0] * self.grid_size[1]

  def token_shape(self) -> tuple[int, ...]:
    """A sequence's shape without the batch axis: (L,) or (L, M)."""
    return (self.length,) if self.num_subtokens == 1 else (self.length, self.num_subtokens)

  def grid_shape(self) -> tuple[int, ...]:
    """The tokenizer's token grid without the batch axis: (h, w) or (h, w, M)."""
    return self.grid_size + ((self.num_subtokens,) if self.num_subtokens > 1 else ())

  def check_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] or [B, L, M] → [B, L, M] int32; ValueError on a shape mismatch."""
    shape = jnp.shape(tokens)
    if len(shape) != 1 + len(self.token_shape()) or tuple(shape[1:]) != self.token_shape():
      raise ValueError(f"tokens must be [B, {', '.join(map(str, self.token_shape()))}] "
                       f"(grid {self.grid_size}, num_subtokens {self.num_subtokens}), "
                       f"got shape {tuple(shape)}.")
    if not jnp.issubdtype(jnp.asarray(tokens).dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids, got {jnp.asarray(tokens).dtype}.")
    return jnp.asarray(tokens, jnp.int32).reshape(shape[0], self.length, self.num_subtokens)


class TokenSequenceModel:
  """What both priors share about their input, from `self.layout` (a TokenLayout):
  vocab_size, num_subtokens, grid_size, length, token_shape() and the token check."""

  layout: TokenLayout

  @property
  def vocab_size(self) -> int:
    return self.layout.vocab_size

  @property
  def num_subtokens(self) -> int:
    return self.layout.num_subtokens

  @property
  def grid_size(self) -> tuple[int, int]:
    return self.layout.grid_size

  @property
  def length(self) -> int:
    return self.layout.length

  def token_shape(self) -> tuple[int, ...]:
    """One sequence's shape: (L,) or (L, M)."""
    return self.layout.token_shape()

  def _check_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [B, L] or [B, L, M] → [B, L, M] int32; ValueError on a shape mismatch."""
    return self.layout.check_tokens(tokens)
