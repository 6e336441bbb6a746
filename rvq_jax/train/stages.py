"""The stage objects `main` and the tools run, by name."""
from __future__ import annotations

import json

import ml_collections
from absl import logging
from etils import epath

from rvq_jax.train.tokenizer_stage import TokenizerStage


def build(config: ml_collections.ConfigDict, name: str, *, workdir: str | None = None,
          tokenizer=None):
  """The `rvq_jax.train.loop.Stage` called `name` ('tokenizer' | 'ar' | 'diffusion').

  A prior needs the frozen tokenizer: pass it (a `Tokenizer`, or an abstract one from
  `nnx.eval_shape` for compile-only uses), or the run's `workdir` to load it from.
  """
  if name == "tokenizer":
    return TokenizerStage(config)
  if name in ("ar", "diffusion"):
    from rvq_jax.train import prior_stage  # The priors' modules load only when used.
    tokenizer_export = None
    if tokenizer is None:
      if workdir is None:
        raise ValueError(f"stage {name!r} needs the tokenizer or the run's workdir.")
      tokenizer, tokenizer_export = prior_stage.load_tokenizer(
          config, prior_stage.tokenizer_workdir(config, workdir))

    def cache(file_name):  # Reference statistics of the eval split, shared by the priors.
      return None if workdir is None else str(epath.Path(workdir) / file_name)

    return prior_stage.PriorStage(config, name, tokenizer,
                                  fid_reference_path=cache("fid_reference_eval.npz"),
                                  fd_vgg_reference_path=cache("fd_vgg_reference_eval.npz"),
                                  tokenizer_export=tokenizer_export)
  raise ValueError(f"unknown stage {name!r}: 'tokenizer', 'ar' or 'diffusion'.")


def export(config: ml_collections.ConfigDict, name: str, workdir: str) -> str:
  """Writes the params-only export of stage `name` of the run in `workdir` from its latest
  checkpoint (`--mode=export`; a finished stage has written one already) → its path.

  Only the module's weights are read: no pretrained network, discriminator or optimizer.
  """
  from rvq_jax.train import exporting
  stage_dir = epath.Path(workdir) / name
  if name == "tokenizer":
    return str(exporting.export_from_checkpoint(config, name, stage_dir))
  if name not in ("ar", "diffusion"):
    raise ValueError(f"unknown stage {name!r}: 'tokenizer', 'ar' or 'diffusion'.")
  from rvq_jax.train import prior_stage
  tokenizer_export = exporting.tokenizer_export(
      config, prior_stage.tokenizer_workdir(config, workdir))
  return str(exporting.export_from_checkpoint(config, name, stage_dir,
                                              tokenizer_export=tokenizer_export))


def finished_step(stage_dir: str) -> int | None:
  """The step of a stage's final metrics.json (written only when a run completes).

  An unreadable file counts as not finished (with a warning): the stage then resumes from
  its checkpoint, which at the last step only evaluates again and rewrites the file.
  """
  path = epath.Path(stage_dir) / "metrics.json"
  if not path.exists():
    return None
  try:
    return int(json.loads(path.read_text())["step"])
  except (ValueError, KeyError, TypeError) as error:
    logging.warning("%s cannot be read (%s: %s); resuming the stage from its checkpoint.",
                    path, type(error).__name__, error)
    return None
