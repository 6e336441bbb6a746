"""Params-only exports of trained tokenizers and priors, and the public API that uses them.

A stage's export (`<workdir>/<stage>/export/`, written when the stage finishes) holds
what inference needs and nothing else — no discriminator, optimizer state or
pretrained networks:

  export.json   {"format": "rvq_jax.export", "format_version": 1, "kind": "tokenizer" |
                "ar" | "diffusion", "step": N, …the settings that rebuild the module}
  params/       the module's variables (its parameters, and buffers such as the
                diffusion prior's loss history) as one orbax `StandardCheckpointer` pytree

A tokenizer's settings are `tokenizer.model`, `tokenizer.quantizer`, `data.image_size`
and which weights were exported ('ema' when `tokenizer.train.ema_decay > 0`, else
'model'); a prior's are `<kind>.model`, `.loss` and `.sample`, its condition, its token
layout and the tokenizer export it was trained on. Paths go through `etils.epath`, so an
export lives on a local disk or on gs:// alike. export.json is written last: a folder
without it is an incomplete export.

    tokenizer = rvq_jax.Tokenizer.load("runs/demo/tokenizer/export")
    tokens = tokenizer.encode(images)         # [B, S, S, 3] → int32 [B, h, w]
    images = tokenizer.decode(tokens)         # → float32 [B, S, S, 3] in [-1, 1]
    prior = rvq_jax.Prior.load("runs/demo/ar/export")
    samples = prior.sample(16, seed=0)        # .tokens [16, h, w], .images [16, S, S, 3]

This module sits above the models (it builds them) and below `rvq_jax.train`, whose
stages write the exports (`rvq_jax.train.exporting`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rvq_jax import parallel
from rvq_jax.models.priors import TokenLayout
from rvq_jax.models.priors import build_prior
from rvq_jax.models.priors import prior_class
from rvq_jax.models.priors.factory import PRIORS
from rvq_jax.models.tokenizer import Tokenizer as TokenizerModule

FORMAT = "rvq_jax.export"
FORMAT_VERSION = 1
METADATA_FILE = "export.json"
PARAMS_DIR = "params"
# A stage's export folder inside the stage's directory (`<workdir>/<stage>/export`).
EXPORT_DIR = "export"
TOKENIZER_KIND = "tokenizer"

PathLike = str | os.PathLike


# ---------------------------------------------------------------------- the format


def as_path(path: PathLike) -> epath.Path:
  """`path` as an epath.Path, absolute (orbax takes only absolute paths; gs:// ones are)."""
  path = epath.Path(path)
  return path if path.is_absolute() else path.absolute()


def export_directory(path: PathLike) -> epath.Path:
  """The export at `path`: `path` itself, or `path/export` (a stage's directory).

  Raises:
    FileNotFoundError: neither holds an export.json; for a stage directory with
      checkpoints but no export (a run from before exports, or one that has not
      finished), the message says how to write one.
  """
  path = as_path(path)
  for candidate in (path, path / EXPORT_DIR):
    if (candidate / METADATA_FILE).exists():
      return candidate
  stage_dir = path.parent if path.name == EXPORT_DIR else path
  if (stage_dir / "checkpoints").exists():
    raise FileNotFoundError(
        f"no export in {stage_dir} (no {METADATA_FILE}), only checkpoints: the stage has "
        "not finished, or the run predates exports. Write one from the latest checkpoint: "
        "python -m rvq_jax.main --config=<the run's config> --workdir=<the run's workdir> "
        "--mode=export")
  raise FileNotFoundError(f"no rvq_jax export at {path} (no {path / METADATA_FILE}).")


def read_metadata(path: PathLike) -> dict[str, Any]:
  """export.json of the export at `path` (see `export_directory`), its format checked."""
  file = export_directory(path) / METADATA_FILE
  try:
    metadata = json.loads(file.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{file} is not valid JSON ({error}); write the export again "
                     "(--mode=export).") from None
  if metadata.get("format") != FORMAT:
    raise ValueError(f"{file} is not an rvq_jax export (format {metadata.get('format')!r}).")
  if int(metadata.get("format_version", 0)) > FORMAT_VERSION:
    raise ValueError(f"{file} has format version {metadata['format_version']}; this rvq_jax "
                     f"reads versions up to {FORMAT_VERSION}: upgrade rvq_jax.")
  return metadata


def write(directory: PathLike, variables: Mapping[str, Any],
          metadata: Mapping[str, Any]) -> epath.Path:
  """Writes an export: `variables` (a pure dict of arrays) and `metadata` → `directory`.

  Replaces an export already there. Collective: every process calls it with its (global)
  arrays; process 0 writes export.json, after the arrays, so a reader never finds
  export.json next to half-written weights.
  """
  directory = as_path(directory)
  metadata_file = directory / METADATA_FILE
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    if metadata_file.exists():
      metadata_file.unlink()  # Until the new weights are complete, no export is there.
  _sync("rvq_jax_export_begin")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / PARAMS_DIR, dict(variables), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    temporary = directory / (METADATA_FILE + ".tmp")
    temporary.write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                                     **metadata}, indent=2, sort_keys=True))
    temporary.rename(metadata_file)
  _sync("rvq_jax_export_end")  # Other processes may read the export next.
  return directory


def restore_module(directory: PathLike, abstract_module: nnx.Module, mesh: Mesh,
                   sharding_rules=parallel.DEFAULT_RULES) -> nnx.Module:
  """The module `abstract_module` (from `nnx.eval_shape`) with the export's variables,
  placed on `mesh` by the parameters' logical axes and `sharding_rules`."""
  directory = as_path(directory)
  graphdef, abstract_state = nnx.split(abstract_module)
  target = abstract_with_shardings(
      abstract_state, parallel.state_shardings(abstract_state, mesh, sharding_rules))
  try:
    checkpointer = ocp.StandardCheckpointer()
    restored = checkpointer.restore(directory / PARAMS_DIR, target)
    checkpointer.close()
  except (ValueError, KeyError) as error:
    raise ValueError(f"the weights in {directory / PARAMS_DIR} do not fit the module "
                     f"{directory / METADATA_FILE} describes (written by another rvq_jax "
                     f"version?): {error}") from None
  state = jax.tree.map(lambda leaf: leaf, abstract_state)  # A copy to fill.
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state)


def abstract_with_shardings(abstract_state: nnx.State, shardings: nnx.State) -> dict:
  """A pure dict of ShapeDtypeStructs carrying `shardings`: what a restore should make."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def json_to_config(value: Any) -> Any:
  """A config block read from JSON: its lists back to the tuples configs hold (ch_mult)."""
  if isinstance(value, Mapping):
    return {key: json_to_config(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(json_to_config(item) for item in value)
  return value


def _fingerprint(fields: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def default_mesh() -> Mesh:
  """All of this process's devices on the 'data' axis (axes ('data', 'fsdp', 'model'))."""
  return parallel.make_mesh((-1, 1, 1), parallel.DEFAULT_MESH_AXES,
                            devices=jax.local_devices())


# ---------------------------------------------------------------------- tokenizers


def tokenizer_metadata(*, model: Mapping[str, Any], quantizer: Mapping[str, Any],
                       image_size: int, step: int, weights: str,
                       layout: TokenLayout) -> dict[str, Any]:
  """export.json's fields for a tokenizer (`model`/`quantizer`: `tokenizer.model` and
  `tokenizer.quantizer` as dicts; `weights`: 'ema' or 'model')."""
  fields = {
      "kind": TOKENIZER_KIND, "step": int(step), "weights": weights,
      "image_size": int(image_size), "image_range": [-1.0, 1.0],
      "model": json.loads(json.dumps(dict(model))),
      "quantizer": json.loads(json.dumps(dict(quantizer))),
      "tokens": _layout_fields(layout)}
  fields["fingerprint"] = _fingerprint(fields)  # Which tokenizer a prior's tokens are of.
  return fields


def tokenizer_module(metadata: Mapping[str, Any], *, rngs: nnx.Rngs) -> TokenizerModule:
  """The tokenizer module export.json describes (without the representation head, which
  only FQGAN's training loss uses)."""
  return TokenizerModule(json_to_config(metadata["model"]),
                         json_to_config(metadata["quantizer"]),
                         image_size=int(metadata["image_size"]), representation_head=False,
                         rngs=rngs)


def _layout_fields(layout: TokenLayout) -> dict[str, Any]:
  return {"vocab_size": layout.vocab_size, "num_subtokens": layout.num_subtokens,
          "grid_size": list(layout.grid_size)}


def layout_of(metadata: Mapping[str, Any]) -> TokenLayout:
  """The token layout an export's metadata records."""
  tokens = metadata["tokens"]
  return TokenLayout(vocab_size=int(tokens["vocab_size"]),
                     num_subtokens=int(tokens["num_subtokens"]),
                     grid_size=tuple(int(g) for g in tokens["grid_size"]))


class Tokenizer:
  """A trained tokenizer from its export: jitted, batched encode/decode on a mesh.

  Images are [B, S, S, 3] with S = `image_size`, either float in [-1, 1] (the training
  data's convention, `rvq_jax.data.preprocess.normalize_image`) or uint8 in [0, 255],
  which is mapped to [-1, 1] the same way (x / 127.5 − 1). Tokens are int32 [B, h, w]
  ([B, h, w, M] for a factorized tokenizer; `token_shape` is one image's) with values in
  [0, vocab_size). Outputs are jax.Arrays; images come back clipped to [-1, 1] (or as
  uint8 with `uint8=True`).

  Any batch size B works: rows are padded to a multiple of the mesh's batch axes
  ('data' × 'fsdp'), the padded rows dropped from the result, and each function compiles
  once per padded shape (with `batch_size`, inputs run in chunks of that many rows, so
  one compile serves every B). The weights sit on `mesh` (default: this process's
  devices on 'data'), sharded by their logical axes and `sharding_rules`. The methods
  take this process's arrays, so their mesh must be this process's devices; on a
  multi-process mesh, call `module` (the `rvq_jax.models.tokenizer.Tokenizer`) inside
  your own `jax.jit` with global arrays, as `--mode=encode` does.

  Attributes:
    module: the NNX tokenizer holding the exported weights.
    metadata: export.json.
    mesh: where the weights are.
    path: the export's folder.
  """

  def __init__(self, module: TokenizerModule, metadata: Mapping[str, Any], mesh: Mesh, *,
               batch_size: int | None = None, path: PathLike | None = None):
    if batch_size is not None and batch_size < 1:
      raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
    self.module, self.metadata, self.mesh = module, dict(metadata), mesh
    self.batch_size = batch_size
    self.path = None if path is None else as_path(path)
    graphdef, self._state = nnx.split(module)

    def encode(state, images):
      return nnx.merge(graphdef, state).tokenize(_as_float_images(images))

    def decode(state, tokens, uint8):
      return _output_images(nnx.merge(graphdef, state).decode_indices(tokens), uint8)

    def reconstruct(state, images, uint8):
      model = nnx.merge(graphdef, state)
      return _output_images(model(_as_float_images(images), deterministic=True)[0], uint8)

    self._encode = jax.jit(encode)
    self._decode = jax.jit(decode, static_argnums=2)
    self._reconstruct = jax.jit(reconstruct, static_argnums=2)

  @classmethod
  def load(cls, path: PathLike, *, mesh: Mesh | None = None,
           sharding_rules=parallel.DEFAULT_RULES, batch_size: int | None = None) -> Tokenizer:
    """The tokenizer exported at `path` (the export folder, or its stage's directory
    `<workdir>/tokenizer`), on `mesh`. Call it outside `jax.set_mesh`."""
    directory = export_directory(path)
    metadata = read_metadata(directory)
    if metadata["kind"] != TOKENIZER_KIND:
      raise ValueError(f"{directory} holds a {metadata['kind']!r} export, not a tokenizer's; "
                       "load it with rvq_jax.Prior.load.")
    mesh = default_mesh() if mesh is None else mesh
    abstract = nnx.eval_shape(lambda: tokenizer_module(metadata, rngs=nnx.Rngs(0)))
    module = restore_module(directory, abstract, mesh, sharding_rules)
    return cls(module, metadata, mesh, batch_size=batch_size, path=directory)

  # ------------------------------------------------------------------ what it is

  @property
  def image_size(self) -> int:
    return int(self.metadata["image_size"])

  @property
  def layout(self) -> TokenLayout:
    return layout_of(self.metadata)

  @property
  def token_shape(self) -> tuple[int, ...]:
    """One image's tokens: (h, w), or (h, w, M) for a factorized tokenizer."""
    return self.layout.grid_shape()

  @property
  def vocab_size(self) -> int:
    return self.layout.vocab_size

  @property
  def step(self) -> int:
    return int(self.metadata["step"])

  # ------------------------------------------------------------------ the API

  def encode(self, images) -> jax.Array:
    """images [B, S, S, 3] (float in [-1, 1], or uint8) → tokens int32 [B, *token_shape],
    the deterministic (argmax) tokens the priors are trained on."""
    images = self._check_images(images)
    return self._batched(self._encode, images)

  def decode(self, tokens, *, uint8: bool = False) -> jax.Array:
    """tokens [B, *token_shape] → images [B, S, S, 3], float32 in [-1, 1] (or uint8)."""
    tokens = self._check_tokens(tokens)
    return self._batched(lambda state, batch: self._decode(state, batch, uint8), tokens)

  def reconstruct(self, images, *, uint8: bool = False) -> jax.Array:
    """images → their reconstructions, in one pass (equal to decode(encode(images)) up to
    float rounding), float32 in [-1, 1] (or uint8)."""
    images = self._check_images(images)
    return self._batched(lambda state, batch: self._reconstruct(state, batch, uint8), images)

  # ------------------------------------------------------------------ internals

  def _check_images(self, images):
    images = images if isinstance(images, jax.Array) else np.asarray(images)
    size = self.image_size
    if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
      raise ValueError(f"images must be [B, {size}, {size}, 3] (this tokenizer's image "
                       f"size), got shape {tuple(images.shape)}.")
    if images.dtype != np.uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be float in [-1, 1] or uint8 in [0, 255], got "
                       f"{images.dtype}.")
    return images

  def _check_tokens(self, tokens):
    tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens)
    if tokens.ndim != 1 + len(self.token_shape) or tuple(tokens.shape[1:]) != self.token_shape:
      raise ValueError(f"tokens must be [B, {', '.join(map(str, self.token_shape))}], got "
                       f"shape {tuple(tokens.shape)}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids, got {tokens.dtype}.")
    if tokens.size:
      low, high = int(tokens.min()), int(tokens.max())
      if low < 0 or high >= self.vocab_size:
        raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got values in "
                         f"[{low}, {high}].")
    return tokens.astype(jnp.int32) if isinstance(tokens, jax.Array) else tokens.astype(np.int32)

  def _batched(self, function, inputs) -> jax.Array:
    return run_batched(function, self._state, inputs, self.mesh, self.batch_size)


def run_batched(function, state, inputs, mesh: Mesh, batch_size: int | None) -> jax.Array:
  """`function(state, rows)` over `inputs` [B, ...] in padded chunks split over `mesh`'s
  batch axes: rows are padded to `batch_size` (or, without one, to B) rounded up to a
  multiple of the batch axes' size, and the padded rows' outputs dropped."""
  if any(device.process_index != jax.process_index() for device in mesh.devices.flat):
    raise ValueError("this mesh spans several processes: call the module inside your own "
                     "jax.jit with global arrays instead (see rvq_jax.export.Tokenizer).")
  count = inputs.shape[0]
  if count == 0:
    raise ValueError("got an empty batch (B = 0).")
  multiple = math.prod(mesh.shape[axis] for axis in parallel.BATCH_AXES if axis in mesh.shape)
  chunk = -(-(batch_size or count) // multiple) * multiple
  sharding = parallel.batch_sharding(mesh, inputs.ndim)
  xp = np if isinstance(inputs, np.ndarray) else jnp
  outputs = []
  for start in range(0, count, chunk):
    # Padded where the inputs are (they may sit on other devices than the mesh).
    rows = inputs[start:start + chunk]
    size = len(rows)
    padded = chunk if batch_size else -(-size // multiple) * multiple
    if padded > size:
      rows = xp.concatenate([rows, xp.zeros((padded - size,) + rows.shape[1:], rows.dtype)])
    rows = jax.device_put(rows, sharding)
    with jax.set_mesh(mesh):
      output = function(state, rows)
    outputs.append(output if padded == size else output[:size])
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs)


def _as_float_images(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] → float32 [-1, 1] (as the data pipeline's normalize_image); floats
  pass unchanged."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / jnp.float32(127.5) - jnp.float32(1.0)
  return images


def _output_images(images: jax.Array, uint8: bool) -> jax.Array:
  images = jnp.clip(images.astype(jnp.float32), -1.0, 1.0)
  if uint8:  # As rvq_jax.train.reporting.to_uint8.
    return jnp.round((images + 1.0) * 127.5).astype(jnp.uint8)
  return images


# ---------------------------------------------------------------------- priors


def prior_metadata(*, kind: str, settings: Mapping[str, Any], condition: str,
                   num_classes: int, layout: TokenLayout, step: int,
                   tokenizer: Mapping[str, Any] | None) -> dict[str, Any]:
  """export.json's fields for a prior.

  Args:
    settings: `config.<kind>` (its model, loss and sample blocks are kept).
    tokenizer: {'path', 'fingerprint', 'step'} of the tokenizer export the prior's
      tokens come from, or None (a prior trained on some other tokenizer).
  """
  if kind not in PRIORS:
    raise ValueError(f"unknown prior {kind!r}: choose from {tuple(PRIORS)}.")
  return {
      "kind": kind, "step": int(step), "condition": condition, "num_classes": int(num_classes),
      "settings": {name: json.loads(json.dumps(dict(settings[name])))
                   for name in ("model", "loss", "sample")},
      "tokens": _layout_fields(layout),
      "tokenizer": None if tokenizer is None else dict(tokenizer)}


def prior_module(metadata: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
  """The prior module export.json describes."""
  return build_prior(metadata["kind"], json_to_config(metadata["settings"]),
                     layout_of(metadata), condition=metadata["condition"],
                     num_classes=int(metadata["num_classes"]), rngs=rngs)


class Samples(NamedTuple):
  """What `Prior.sample` returns."""

  tokens: jax.Array  # int32 [N, h, w] (or [N, h, w, M])
  images: jax.Array | None  # float32 [N, S, S, 3] in [-1, 1]; None with decode=False


class Prior:
  """A trained AR or diffusion prior from its export, with the tokenizer that decodes it.

  `sample(num_samples, condition, seed=…)` draws tokens (one compile per number of
  samples and static structure of the options, e.g. guidance on or off; new temperature,
  top-k/top-p, guidance or truncation values reuse it) and decodes them with the
  tokenizer. The tokenizer is the one the prior was trained on: passed to `load`, else
  the export the prior's export.json names, else `<workdir>/tokenizer/export` beside
  the prior's stage.

  Attributes:
    module: the NNX prior (`rvq_jax.models.priors.Prior`) holding the exported weights.
    tokenizer: a `Tokenizer`, or None when none was found (then only tokens).
    metadata: export.json.
    mesh: where the weights are.
  """

  def __init__(self, module: nnx.Module, metadata: Mapping[str, Any], mesh: Mesh,
               tokenizer: Tokenizer | None, *, path: PathLike | None = None,
               tokenizer_searched: tuple[str, ...] = ()):
    self.module, self.metadata, self.mesh, self.tokenizer = module, dict(metadata), mesh, tokenizer
    self.path = None if path is None else as_path(path)
    self._tokenizer_searched = tokenizer_searched

  @classmethod
  def load(cls, path: PathLike, *, tokenizer: Tokenizer | PathLike | None = None,
           mesh: Mesh | None = None, sharding_rules=parallel.DEFAULT_RULES) -> Prior:
    """The prior exported at `path` (the export folder, or its stage's directory
    `<workdir>/ar`), on `mesh` (default: this process's devices), with its tokenizer:
    `tokenizer` (a `Tokenizer` or an export's path), else the one its export names.
    Call it outside `jax.set_mesh`."""
    directory = export_directory(path)
    metadata = read_metadata(directory)
    if metadata["kind"] not in PRIORS:
      raise ValueError(f"{directory} holds a {metadata['kind']!r} export, not a prior's; "
                       "load it with rvq_jax.Tokenizer.load.")
    mesh = default_mesh() if mesh is None else mesh
    abstract = nnx.eval_shape(lambda: prior_module(metadata, rngs=nnx.Rngs(0)))
    module = restore_module(directory, abstract, mesh, sharding_rules)
    found, searched = _prior_tokenizer(directory, metadata, tokenizer, mesh, sharding_rules)
    return cls(module, metadata, mesh, found, path=directory, tokenizer_searched=searched)

  @property
  def kind(self) -> str:
    return self.metadata["kind"]

  @property
  def condition_kind(self) -> str:
    """'none', 'class' ([N] labels) or 'semantic' ([N, h, w] label maps)."""
    return self.metadata["condition"]

  @property
  def num_classes(self) -> int:
    return int(self.metadata["num_classes"])

  @property
  def layout(self) -> TokenLayout:
    return layout_of(self.metadata)

  @property
  def step(self) -> int:
    return int(self.metadata["step"])

  def sample_options(self, **overrides) -> dict[str, Any]:
    """The sampling options `sample` uses: the training config's `<kind>.sample`, then
    `overrides` (AR: temperature, top_k, top_p, guidance_scale; diffusion: temperature,
    num_steps, truncation_rate, skip_rule, guidance_scale)."""
    return prior_class(self.kind).sample_options(self.metadata["settings"]["sample"],
                                                 **overrides)

  def sample(self, num_samples: int, condition=None, *, seed: int = 0,
             key: jax.Array | None = None, decode: bool = True, **options) -> Samples:
    """`num_samples` samples: tokens, and images decoded by the tokenizer.

    Args:
      num_samples: N.
      condition: None (an unconditional prior), class labels [N] in [0, num_classes)
        or label maps [N, h, w] on the token grid (semantic), ints.
      seed: the samples are a function of the seed (or `key`, which takes precedence)
        and the options.
      decode: also decode the images (needs the tokenizer).
      **options: sampling options overriding the training config's (`sample_options`).
    """
    options = self.sample_options(**options)
    if condition is not None and self.condition_kind != "none":  # (else sample says so)
      condition = condition if isinstance(condition, jax.Array) else np.asarray(condition)
      if not jnp.issubdtype(condition.dtype, jnp.integer):
        raise ValueError(f"condition must be integer ids, got {condition.dtype}.")
      if condition.size and (int(condition.min()) < 0
                             or int(condition.max()) >= self.num_classes):
        raise ValueError(f"condition values must lie in [0, {self.num_classes}), got "
                         f"[{int(condition.min())}, {int(condition.max())}].")
      condition = jnp.asarray(condition, jnp.int32)
    if decode and self.tokenizer is None:
      raise ValueError("no tokenizer to decode the samples: none was found at "
                       f"{', '.join(self._tokenizer_searched) or '(nowhere)'}. Pass "
                       "Prior.load(..., tokenizer=<its export>), or sample(decode=False).")
    key = jax.random.key(seed) if key is None else key
    with jax.set_mesh(self.mesh):
      tokens = self.module.sample(key, condition, num_samples=num_samples, **options)
    tokens = tokens.reshape((num_samples,) + self.layout.grid_shape())
    return Samples(tokens=tokens, images=self.tokenizer.decode(tokens) if decode else None)


def _prior_tokenizer(directory: epath.Path, metadata: Mapping[str, Any], tokenizer, mesh,
                     sharding_rules) -> tuple[Tokenizer | None, tuple[str, ...]]:
  """(the prior's tokenizer or None, the places looked at)."""
  recorded = metadata.get("tokenizer") or {}
  if isinstance(tokenizer, Tokenizer):
    found, searched = tokenizer, ()
  else:
    if tokenizer is not None:
      candidates = [epath.Path(tokenizer)]
    else:
      # Where the prior was trained, then beside it: <workdir>/<kind>/export →
      # <workdir>/tokenizer/export (a run folder copied elsewhere).
      candidates = [epath.Path(recorded["path"])] if recorded.get("path") else []
      candidates.append(directory.parent.parent / TOKENIZER_KIND / EXPORT_DIR)
    searched = tuple(str(c) for c in candidates)
    found = None
    for candidate in candidates:
      if (candidate / METADATA_FILE).exists() or (candidate / EXPORT_DIR / METADATA_FILE).exists():
        found = Tokenizer.load(candidate, mesh=mesh, sharding_rules=sharding_rules)
        break
    if found is None:
      if tokenizer is not None:
        raise FileNotFoundError(f"no tokenizer export at {tokenizer}.")
      logging.warning("No tokenizer export for the prior in %s (looked at %s): it samples "
                      "tokens only.", directory, ", ".join(searched))
      return None, searched
  if found.metadata["tokens"] != metadata["tokens"]:
    raise ValueError(f"the tokenizer at {found.path} makes tokens {found.metadata['tokens']}, "
                     f"the prior in {directory} models {metadata['tokens']}: not its "
                     "tokenizer.")
  if recorded.get("fingerprint") and found.metadata.get("fingerprint") != recorded["fingerprint"]:
    logging.warning("The tokenizer at %s (step %s) is not the one the prior in %s was trained "
                    "on (step %s, %s): its samples may decode to noise.", found.path,
                    found.metadata.get("step"), directory, recorded.get("step"),
                    recorded.get("path"))
  return found, searched


__all__ = ["Prior", "Samples", "Tokenizer", "default_mesh", "export_directory",
           "read_metadata"]
