"""The stages' params-only exports (format and public API: `rvq_jax.export`).

A stage writes its export into `<stage dir>/export` when it finishes (the loop's
`on_finish` hook): the tokenizer's evaluated weights (its EMA copy when
`tokenizer.train.ema_decay > 0`), a prior's model. A run from before exports, or one
whose stage has not finished, gets one from its latest checkpoint
(`export_from_checkpoint`: only the module's weights are read, never the discriminator,
optimizer or pretrained networks), which `--mode=export` and the priors (finding their
tokenizer without an export) do.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from rvq_jax import export as export_lib
from rvq_jax import parallel
from rvq_jax.models.priors import TokenLayout

# Inside a stage's directory (as rvq_jax.train.loop writes them).
CHECKPOINTS_DIR = "checkpoints"


def export_path(stage_dir) -> epath.Path:
  """Where a stage's export goes: `<stage_dir>/export`."""
  return export_lib.as_path(stage_dir) / export_lib.EXPORT_DIR


def _mesh_and_rules(config: ml_collections.ConfigDict):
  return (parallel.make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axes)),
          tuple(tuple(rule) for rule in config.mesh.rules))


# ---------------------------------------------------------------------- tokenizer


def _tokenizer_weights(config: ml_collections.ConfigDict) -> str:
  """Which of the train state's models is evaluated, and so exported."""
  return "ema_model" if config.tokenizer.train.ema_decay > 0 else "model"


def tokenizer_metadata(config: ml_collections.ConfigDict, step: int,
                       layout: TokenLayout) -> dict[str, Any]:
  return export_lib.tokenizer_metadata(
      model=config.tokenizer.model.to_dict(), quantizer=config.tokenizer.quantizer.to_dict(),
      image_size=config.data.image_size, step=step,
      weights="ema" if _tokenizer_weights(config) == "ema_model" else "model", layout=layout)


def write_tokenizer_export(config: ml_collections.ConfigDict, model: nnx.Module, step: int,
                           stage_dir) -> epath.Path:
  """`model` (the tokenizer the stage evaluates) → `<stage_dir>/export`. Collective."""
  layout = TokenLayout(vocab_size=model.vocab_size, num_subtokens=model.num_subtokens,
                       grid_size=(model.grid_size, model.grid_size))
  variables = nnx.to_pure_dict(nnx.state(model))
  # FQGAN's representation head serves only its training loss.
  variables.pop("representation_head", None)
  path = export_lib.write(export_path(stage_dir), variables,
                          tokenizer_metadata(config, step, layout))
  logging.info("tokenizer: params-only export of step %d written to %s.", step, path)
  return path


def _check_tokenizer_settings(config: ml_collections.ConfigDict, metadata: dict,
                              path) -> None:
  """The config's data must fit the export; other differences are reported, the export's
  settings win (they describe its weights)."""
  if int(metadata["image_size"]) != config.data.image_size:
    raise ValueError(f"the tokenizer export {path} is for {metadata['image_size']}px images, "
                     f"the config's data.image_size is {config.data.image_size}: use the "
                     "config the tokenizer was trained with.")
  for name in ("model", "quantizer"):
    if export_lib.json_to_config(metadata[name]) != export_lib.json_to_config(
        config.tokenizer[name].to_dict()):
      logging.warning("The config's tokenizer.%s differs from the one the tokenizer export "
                      "%s was trained with; the export's is used.", name, path)


def tokenizer_export(config: ml_collections.ConfigDict, tokenizer_dir) -> epath.Path:
  """The tokenizer's export in `tokenizer_dir`; written first from the latest checkpoint
  when there is none, or when the checkpoint is newer (training went on after it).

  Raises:
    FileNotFoundError: neither an export nor a checkpoint (the stage never trained).
  """
  path = export_path(tokenizer_dir)
  checkpoints = export_lib.as_path(tokenizer_dir) / CHECKPOINTS_DIR
  exported_step = (int(export_lib.read_metadata(path)["step"])
                   if (path / export_lib.METADATA_FILE).exists() else None)
  latest = _latest_step(checkpoints) if checkpoints.exists() else None
  # Every process must take the same branch: writing is collective.
  stale = _agree(latest is not None and (exported_step is None or latest > exported_step))
  if stale:
    logging.warning("tokenizer: %s; writing the params-only export from the checkpoint of "
                    "step %d.", "no export yet" if exported_step is None else
                    f"the export (step {exported_step}) is older than the checkpoints", latest)
    export_from_checkpoint(config, "tokenizer", tokenizer_dir)
  elif exported_step is None:
    raise FileNotFoundError(f"no tokenizer export or checkpoint in {tokenizer_dir}")
  return path


def load_tokenizer(config: ml_collections.ConfigDict, tokenizer_dir) -> export_lib.Tokenizer:
  """The trained tokenizer from its export (see `tokenizer_export`), on the config's mesh."""
  path = tokenizer_export(config, tokenizer_dir)
  mesh, rules = _mesh_and_rules(config)
  tokenizer = export_lib.Tokenizer.load(path, mesh=mesh, sharding_rules=rules)
  _check_tokenizer_settings(config, tokenizer.metadata, path)
  return tokenizer


# ---------------------------------------------------------------------- priors


def prior_metadata(config: ml_collections.ConfigDict, kind: str, layout: TokenLayout,
                   step: int, tokenizer_export) -> dict[str, Any]:
  tokenizer = None
  if tokenizer_export is not None:
    tokenizer_path = export_lib.as_path(tokenizer_export)  # Found from any working dir.
    recorded = export_lib.read_metadata(tokenizer_path)
    tokenizer = {"path": str(tokenizer_path), "fingerprint": recorded.get("fingerprint"),
                 "step": recorded["step"]}
  return export_lib.prior_metadata(
      kind=kind, settings=config[kind], condition=config.prior.condition,
      num_classes=config.prior.num_classes, layout=layout, step=step, tokenizer=tokenizer)


def write_prior_export(config: ml_collections.ConfigDict, kind: str, model: nnx.Module,
                       step: int, stage_dir, tokenizer_export=None) -> epath.Path:
  """The trained prior `model` → `<stage_dir>/export`, naming the tokenizer export its
  tokens come from (None: a tokenizer without one). Collective."""
  path = export_lib.write(export_path(stage_dir), nnx.to_pure_dict(nnx.state(model)),
                          prior_metadata(config, kind, model.layout, step, tokenizer_export))
  logging.info("%s: params-only export of step %d written to %s.", kind, step, path)
  return path


# ---------------------------------------------------------------------- from checkpoints


def export_from_checkpoint(config: ml_collections.ConfigDict, stage: str, stage_dir, *,
                           tokenizer_export=None) -> epath.Path:
  """The export of `stage` ('tokenizer' | 'ar' | 'diffusion') from the latest checkpoint
  in `stage_dir`, reading only the module's weights. A prior needs `tokenizer_export`
  (its token layout, and the tokenizer its samples decode with). Call it outside
  `jax.set_mesh`; collective."""
  checkpoints = export_lib.as_path(stage_dir) / CHECKPOINTS_DIR
  mesh, rules = _mesh_and_rules(config)
  if stage == "tokenizer":
    item = _tokenizer_weights(config)
    layout_source = None
    # Only the export's module, without the representation head: its weights are the
    # ones read (a partial restore skips the rest of the train state).
    probe = tokenizer_metadata(config, 0, TokenLayout(2, 1, (1, 1)))
    abstract = nnx.eval_shape(lambda: export_lib.tokenizer_module(probe, rngs=nnx.Rngs(0)))
  else:
    if tokenizer_export is None:
      raise ValueError(f"the {stage} prior's export needs its tokenizer's export.")
    item = "model"
    layout_source = export_lib.read_metadata(tokenizer_export)
    probe = export_lib.prior_metadata(
        kind=stage, settings=config[stage], condition=config.prior.condition,
        num_classes=config.prior.num_classes, layout=export_lib.layout_of(layout_source),
        step=0, tokenizer=None)
    abstract = nnx.eval_shape(lambda: export_lib.prior_module(probe, rngs=nnx.Rngs(0)))
  model, step = _restore_module_from_checkpoint(checkpoints, item, abstract, mesh, rules)
  if stage == "tokenizer":
    return write_tokenizer_export(config, model, step, stage_dir)
  return write_prior_export(config, stage, model, step, stage_dir, tokenizer_export)


def _latest_step(checkpoints: epath.Path) -> int | None:
  manager = ocp.CheckpointManager(checkpoints, item_names=("state",),
                                  options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  manager.close()
  return step


def _restore_module_from_checkpoint(checkpoints: epath.Path, item: str,
                                    abstract_module: nnx.Module, mesh, rules):
  """(the module, step) from `state/<item>` of the latest checkpoint: a partial restore
  of those weights alone, onto `mesh`."""
  if not checkpoints.exists():
    raise FileNotFoundError(f"no checkpoint in {checkpoints}")
  manager = ocp.CheckpointManager(checkpoints, item_names=("state",),
                                  options=ocp.CheckpointManagerOptions(create=False))
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise FileNotFoundError(f"no checkpoint in {checkpoints}")
  stored = getattr(manager.item_metadata(step)["state"], "tree", None)
  if isinstance(stored, dict) and item not in stored:
    manager.close()
    raise ValueError(f"the checkpoint of step {step} in {checkpoints} has no {item!r} "
                     f"weights (it has {sorted(stored)}): was it trained with another "
                     "tokenizer.train.ema_decay? Use that run's config.")
  graphdef, abstract_state = nnx.split(abstract_module)
  target = {item: export_lib.abstract_with_shardings(
      abstract_state, parallel.state_shardings(abstract_state, mesh, rules))}
  with jax.set_mesh(mesh):
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))["state"][item]
  manager.close()
  state = jax.tree.map(lambda leaf: leaf, abstract_state)  # A copy to fill.
  nnx.replace_by_pure_dict(state, restored)
  return nnx.merge(graphdef, state), int(step)


def _agree(flag: bool) -> bool:
  """Process 0's `flag` on every process."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
