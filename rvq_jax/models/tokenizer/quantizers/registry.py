"""The quantizer registry: every kind the tokenizer can use, declared once.

A quantizer module declares a `QuantizerSpec`: its kind name, its options with their
defaults (the one place they are written), a builder, and what the tokenizer needs to
know of it (categorical or nearest-code, factorized or not). The run config's
`tokenizer.quantizer.<kind>` blocks, config validation, the `:kind` config variants and
the tokenizer's wiring all derive from the registered specs, so a new quantizer is one
module plus one `register(...)` line (see README, "Adding a quantizer").

The config a spec's builder receives (`tokenizer.quantizer`):

  kind       the registered name
  num_codes  K (per sub-codebook for factorized kinds)
  code_dim   D (per sub-codebook)
  <kind>     that kind's options, e.g. `tokenizer.quantizer.regvq.mask_ratio`
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from flax import nnx

# builder(options, num_codes=K, code_dim=D, in_features=…, rngs=…) -> nnx.Module
Builder = Callable[..., nnx.Module]
# check(options) -> problems, each naming the option ('' when all is well)
Check = Callable[[Mapping[str, Any]], list[str]]


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
  """One quantizer kind.

  Attributes:
    kind: the name configs and variants use ('regvq').
    build: makes the module from the kind's options and the shared sizes.
    options: the kind's options with their defaults; `tokenizer.quantizer.<kind>`.
    categorical: the quantizer predicts logits from the encoder's features (its input is
      the encoder width `z_channels`); False: it quantizes vectors of width `code_dim`.
    factorized: M sub-codebooks, tokens [..., M] (FQ); needs options['num_branches'].
    variant: shared settings the `:kind` config variant sets besides `kind` (e.g. FQ's
      code_dim 8), as `tokenizer.quantizer` keys.
    check: option checks run before anything compiles (constructors check again).
    summary: one line for docs and errors.
  """

  kind: str
  build: Builder
  options: Mapping[str, Any]
  categorical: bool
  factorized: bool = False
  variant: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Check = lambda options: []
  summary: str = ""

  def input_width(self, z_channels: int, code_dim: int) -> int:
    """Width of what the quantizer takes per position (per branch when factorized)."""
    return z_channels if self.categorical else code_dim

  def num_subtokens(self, options: Mapping[str, Any]) -> int:
    """M tokens per position (1 unless factorized)."""
    return int(options["num_branches"]) if self.factorized else 1


_REGISTRY: dict[str, QuantizerSpec] = {}


def register(spec: QuantizerSpec, *, replace: bool = False) -> QuantizerSpec:
  """Adds `spec` under `spec.kind`; configs built afterwards get its options block."""
  if not spec.kind.isidentifier():
    raise ValueError(f"quantizer kind {spec.kind!r} must be a Python identifier (it names a "
                     "config block).")
  if spec.kind in _REGISTRY and not replace and _REGISTRY[spec.kind] is not spec:
    raise ValueError(f"quantizer kind {spec.kind!r} is registered already.")
  if spec.factorized and "num_branches" not in spec.options:
    raise ValueError(f"factorized quantizer {spec.kind!r} needs a 'num_branches' option.")
  _REGISTRY[spec.kind] = spec
  return spec


def unregister(kind: str) -> None:
  """Removes a kind (tests that register a temporary quantizer clean up with this)."""
  _REGISTRY.pop(kind, None)


def kinds() -> tuple[str, ...]:
  """The registered kinds, in registration order."""
  return tuple(_REGISTRY)


def get(kind: str) -> QuantizerSpec:
  try:
    return _REGISTRY[kind]
  except KeyError:
    raise ValueError(f"unknown quantizer kind {kind!r}; choose one of {kinds()}, or register "
                     "one (rvq_jax.models.tokenizer.quantizers.registry.register).") from None


def options_of(config: Mapping[str, Any]) -> Mapping[str, Any]:
  """The chosen kind's options block of a `tokenizer.quantizer` config."""
  return config[config["kind"]]


def build_quantizer(config: Mapping[str, Any], *, in_features: int | None = None,
                    rngs: nnx.Rngs) -> nnx.Module:
  """The quantizer module `config` (`tokenizer.quantizer`) describes.

  `in_features` is the width of the input per position (per branch for factorized
  kinds); None means `code_dim`.
  """
  spec = get(config["kind"])
  return spec.build(options_of(config), num_codes=config["num_codes"],
                    code_dim=config["code_dim"], in_features=in_features, rngs=rngs)


def validate(config: Mapping[str, Any]) -> list[str]:
  """Problems with a `tokenizer.quantizer` config, each naming its key."""
  kind = config["kind"]
  if kind not in _REGISTRY:
    return [f"tokenizer.quantizer.kind={kind!r}: choose from {kinds()}"]
  problems = []
  for key in ("num_codes", "code_dim"):
    if not config[key] > 0:
      problems.append(f"tokenizer.quantizer.{key}={config[key]} must be > 0")
  problems += [f"tokenizer.quantizer.{kind}.{problem}"
               for problem in get(kind).check(options_of(config))]
  return problems
