"""Entry point: `python -m rvq_jax.main --config=configs/<data>.py[:variant] --workdir=DIR`.

Runs the config's stages in order, each in `workdir/<stage>/`, resuming a stage that
has a checkpoint. Other modes act on a trained tokenizer: `eval`, `reconstruct`
(--input folder → --output folder of PNGs) and `encode` (--split → token array .npz).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant' (see configs/).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for this run.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "reconstruct", "encode"],
                          "What to do.")
_INPUT = flags.DEFINE_string("input", None, "reconstruct: folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "reconstruct: output folder; encode: .npz path "
                              "(default workdir/tokenizer/tokens_<split>.npz).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "encode: which split.")
flags.mark_flags_as_required(["config", "workdir"])


def _initialize_distributed() -> None:
  """Joins a multi-process job when one is configured (TPU pods, or RVQ_JAX_COORDINATOR)."""
  import jax
  coordinator = os.environ.get("RVQ_JAX_COORDINATOR")
  if coordinator:
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ["RVQ_JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["RVQ_JAX_PROCESS_ID"]),
        initialization_timeout=int(os.environ.get("RVQ_JAX_INIT_TIMEOUT", "300")))
  elif os.environ.get("RVQ_JAX_INIT"):
    jax.distributed.initialize()  # Cloud TPU: the topology comes from the environment.


def main(argv) -> int:
  del argv
  if not flags.FLAGS["verbosity"].present:
    # orbax and XLA log every save at INFO; the job's progress has its own logger.
    logging.set_verbosity(logging.WARNING)
  from rvq_jax import config as config_lib  # After absl parsed flags (and JAX settings).
  config = _CONFIG.value
  config_lib.validate(config)
  _initialize_distributed()
  import jax
  config_lib.check_batch_divides(config, jax.device_count(), jax.process_count())
  workdir = _WORKDIR.value

  from rvq_jax.train import inference, loop
  from rvq_jax.train.tokenizer_stage import TokenizerStage
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  if _MODE.value == "train":
    for stage_name in config.stages:
      if stage_name == "tokenizer":
        metrics = loop.run(TokenizerStage(config), loop.loop_config_from(config), tokenizer_dir)
        logging.info("tokenizer finished: %s", metrics)
  elif _MODE.value == "eval":
    inference.evaluate(config, tokenizer_dir)
  elif _MODE.value == "reconstruct":
    if not _INPUT.value or not _OUTPUT.value:
      raise app.UsageError("--mode=reconstruct needs --input and --output folders.")
    inference.reconstruct(config, tokenizer_dir, _INPUT.value, _OUTPUT.value)
  elif _MODE.value == "encode":
    output = _OUTPUT.value or os.path.join(tokenizer_dir, f"tokens_{_SPLIT.value}.npz")
    inference.encode(config, tokenizer_dir, _SPLIT.value, output)
  return 0


def run() -> None:
  """Console entry with readable errors for the failures a user can fix."""
  def wrapped(argv):
    try:
      return main(argv)
    except (ValueError, FileNotFoundError) as error:
      logging.error("%s", error)
      print(f"rvq_jax: error: {error}", file=sys.stderr)
      return 2
    except FloatingPointError as error:
      print(f"rvq_jax: stopped: {error}", file=sys.stderr)
      return 3
  app.run(wrapped)


if __name__ == "__main__":
  run()
