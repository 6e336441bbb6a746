"""Entry point: `python -m rvq_jax.main --config=configs/<data>.py[:variant] --workdir=DIR`.

Runs the config's stages in order (tokenizer → ar → diffusion), each in
`workdir/<stage>/`, resuming a stage that has a checkpoint and skipping one that has
finished. Other modes act on trained stages: `eval` (--stage), `reconstruct` (--input
folder → --output folder of PNGs), `encode` (--split → token array .npz for the priors),
`sample` (a prior → --num_samples PNGs and their tokens) and `export` (a stage's
params-only export from its latest checkpoint, for runs from before exports).
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant' (see configs/).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for this run.")
_MODE = flags.DEFINE_enum("mode", "train",
                          ["train", "eval", "reconstruct", "encode", "sample", "export"],
                          "What to do.")
_STAGE = flags.DEFINE_enum("stage", None, ["tokenizer", "ar", "diffusion"],
                           "eval: the stage to evaluate (default tokenizer); sample: the prior "
                           "(default: each prior in the config's stages); export: the stage "
                           "(default: each of the config's stages with a checkpoint).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "sample: how many images.")
_INPUT = flags.DEFINE_string("input", None, "reconstruct: folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "reconstruct: output folder; encode: .npz path "
                              "(default workdir/tokenizer/tokens_<split>.npz); sample: output "
                              "folder (default workdir/<prior>/samples).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "encode: which split.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  if not flags.FLAGS["verbosity"].present:
    # orbax and XLA log every save at INFO; the job's progress has its own logger.
    logging.set_verbosity(logging.WARNING)
  from rvq_jax import config as config_lib  # After absl parsed flags (and JAX settings).
  config = _CONFIG.value
  config_lib.validate(config)
  from rvq_jax import parallel
  parallel.initialize_distributed()
  import jax
  config_lib.check_batch_divides(config, jax.device_count(), jax.process_count())
  workdir = _WORKDIR.value

  from rvq_jax.train import inference
  from rvq_jax.train import loop
  from rvq_jax.train import stages
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  if _MODE.value == "train":
    for stage_name in config.stages:
      stage_dir = os.path.join(workdir, stage_name)
      num_steps = loop.loop_config_from(config, stage_name).num_steps
      done = stages.finished_step(stage_dir)
      if done is not None and done >= num_steps:
        logging.warning("%s: finished at step %d already (%s/metrics.json); skipping it.",
                        stage_name, done, stage_dir)
        continue
      metrics = loop.run(stages.build(config, stage_name, workdir=workdir),
                         loop.loop_config_from(config, stage_name), stage_dir)
      logging.info("%s finished: %s", stage_name, metrics)
  elif _MODE.value == "eval":
    stage_name = _STAGE.value or "tokenizer"
    inference.evaluate(stages.build(config, stage_name, workdir=workdir),
                       loop.loop_config_from(config, stage_name),
                       os.path.join(workdir, stage_name))
  elif _MODE.value == "reconstruct":
    if not _INPUT.value or not _OUTPUT.value:
      raise app.UsageError("--mode=reconstruct needs --input and --output folders.")
    inference.reconstruct(config, tokenizer_dir, _INPUT.value, _OUTPUT.value)
  elif _MODE.value == "encode":
    output = _OUTPUT.value or os.path.join(tokenizer_dir, f"tokens_{_SPLIT.value}.npz")
    inference.encode(config, tokenizer_dir, _SPLIT.value, output)
  elif _MODE.value == "sample":
    priors = ((_STAGE.value,) if _STAGE.value else
              tuple(s for s in config.stages if s != "tokenizer"))
    if not priors or "tokenizer" in priors:
      raise ValueError("--mode=sample needs a prior: --stage=ar or --stage=diffusion.")
    from rvq_jax.train import prior_inference
    for prior in priors:
      output = (os.path.join(_OUTPUT.value, prior) if _OUTPUT.value and len(priors) > 1 else
                _OUTPUT.value or os.path.join(workdir, prior, "samples"))
      prior_inference.sample(stages.build(config, prior, workdir=workdir), config,
                             os.path.join(workdir, prior), _NUM_SAMPLES.value, output)
  elif _MODE.value == "export":
    from etils import epath
    names = (_STAGE.value,) if _STAGE.value else tuple(
        name for name in config.stages
        if (epath.Path(workdir) / name / "checkpoints").exists())
    if not names:
      raise FileNotFoundError(f"--mode=export: no stage of {tuple(config.stages)} has a "
                              f"checkpoint under {workdir}.")
    for name in names:
      print(f"{name}: params-only export written to {stages.export(config, name, workdir)}")
  return 0


def run() -> None:
  """Console entry with readable errors for the failures a user can fix."""
  def wrapped(argv):
    from rvq_jax import parallel  # After absl parsed flags, as main's imports.
    try:
      return main(argv)
    except (ValueError, FileNotFoundError) as error:
      logging.error("%s", error)
      print(f"rvq_jax: error: {error}", file=sys.stderr)
      return 2
    except FloatingPointError as error:
      print(f"rvq_jax: stopped: {error}", file=sys.stderr)
      return 3
    except parallel.DistributedInitError as error:
      print(f"rvq_jax: error: {error}", file=sys.stderr)
      return 4
  app.run(wrapped)


if __name__ == "__main__":
  run()
