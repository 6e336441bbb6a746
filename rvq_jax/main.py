"""Entry point: `python -m rvq_jax.main --config=configs/<data>.py[:variant] --workdir=DIR`.

Runs the config's stages in order (tokenizer → ar → diffusion), each in
`workdir/<stage>/`, resuming a stage that has a checkpoint and skipping one that has
finished; a checkpoint saved with other data stops the run with an error unless
`--accept_data_change`. Other modes act on trained stages: `eval` (--stage),
`reconstruct` (--input folder → --output folder of PNGs), `encode` (--split → token
array .npz for the priors), `sample` (a prior → --num_samples PNGs and their tokens) and
`export` (a stage's params-only export from its latest checkpoint, for runs from before
exports). Bad flags, configs and data end in one `rvq_jax: error:` line and exit code 2.
"""
from __future__ import annotations

import dataclasses
import os
import re
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
_ACCEPT_DATA_CHANGE = flags.DEFINE_bool(
    "accept_data_change", False, "train: resume a checkpoint saved with other data (another "
    "example count, batch size or seed) at its step in the new data's order, instead of "
    "stopping with an error.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
  del argv
  if not flags.FLAGS["verbosity"].present:
    # orbax and XLA log every save at INFO; the job's progress has its own logger.
    logging.set_verbosity(logging.WARNING)
  from rvq_jax import config as config_lib  # After absl parsed flags (and JAX settings).
  config = _CONFIG.value
  config_lib.validate(config)
  # Every split a mode reads must exist before anything is built or compiled: a missing
  # eval folder would otherwise surface at the first evaluation, hours in.
  from rvq_jax.data import factory as data_factory
  data_factory.check_sources(config.data, _splits_read(config))
  from rvq_jax import parallel
  parallel.initialize_distributed()
  import jax
  config_lib.check_batch_divides(config, jax.device_count(), jax.process_count())
  workdir = _WORKDIR.value
  _check_writable(workdir)

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
      if num_steps == 0:
        logging.warning("%s.train.num_steps=0: the stage will be evaluated and marked "
                        "finished with its freshly initialized (untrained) model.",
                        stage_name)
      loop_config = dataclasses.replace(loop.loop_config_from(config, stage_name),
                                        accept_data_change=_ACCEPT_DATA_CHANGE.value)
      metrics = loop.run(stages.build(config, stage_name, workdir=workdir), loop_config,
                         stage_dir)
      logging.info("%s finished: %s", stage_name, metrics)
  elif _MODE.value == "eval":
    stage_name = _STAGE.value or "tokenizer"
    inference.evaluate(stages.build(config, stage_name, workdir=workdir),
                       loop.loop_config_from(config, stage_name),
                       os.path.join(workdir, stage_name))
  elif _MODE.value == "reconstruct":
    if not _INPUT.value or not _OUTPUT.value:
      raise app.UsageError("--mode=reconstruct needs --input and --output folders.")
    written = inference.reconstruct(config, tokenizer_dir, _INPUT.value, _OUTPUT.value)
    _say(f"wrote {written} reconstructions (PNG) to {_OUTPUT.value}.")
  elif _MODE.value == "encode":
    output = _OUTPUT.value or os.path.join(tokenizer_dir, f"tokens_{_SPLIT.value}.npz")
    inference.encode(config, tokenizer_dir, _SPLIT.value, output)
    _say(f"wrote the {_SPLIT.value} split's tokens to {output}.")
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
      _say(f"wrote {_NUM_SAMPLES.value} {prior} samples to {output} (sample_00000.png …, "
           "and their tokens in samples.npz).")
  elif _MODE.value == "export":
    from etils import epath
    names = (_STAGE.value,) if _STAGE.value else tuple(
        name for name in config.stages
        if (epath.Path(workdir) / name / "checkpoints").exists())
    if not names:
      raise FileNotFoundError(f"--mode=export: no stage of {tuple(config.stages)} has a "
                              f"checkpoint under {workdir}.")
    for name in names:
      _say(f"{name}: params-only export written to {stages.export(config, name, workdir)}")
  return 0


def _check_writable(workdir: str) -> None:
  """Refuses, in one line, a directory this mode must write to but cannot — now rather
  than at the first save, after building and compiling everything."""
  from etils import epath

  from rvq_jax import files
  if _MODE.value != "reconstruct":  # It only reads the workdir; the others write into it.
    files.ensure_writable_dir(workdir, "--workdir")
  if _OUTPUT.value:  # encode's --output is a file, the other modes' a folder.
    output = epath.Path(_OUTPUT.value)
    files.ensure_writable_dir(output.parent if _MODE.value == "encode" else output, "--output")


def _say(message: str) -> None:
  """What a mode made, on stdout, once per job (process 0 writes the files)."""
  import jax
  if jax.process_index() == 0:
    print(f"rvq_jax: {message}", flush=True)


def _splits_read(config) -> tuple[str, ...]:
  """The data splits the chosen mode reads from config.data."""
  if _MODE.value == "train":
    return ("train", "eval")
  if _MODE.value == "eval":
    return ("eval",)
  if _MODE.value == "encode":
    return (_SPLIT.value,)
  if _MODE.value == "sample" and config.prior.condition == "semantic":
    return ("eval",)  # Label maps of held-out images condition the samples.
  return ()


def _flag_error(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing the flags and loading the config."""
  text = str(error).replace("\\'", "'")
  config_flag = next((arg for arg in argv if arg.startswith("--config=")), "--config")
  # ml_collections on a misspelt override: 'key'\nDid you mean "name" instead of "key"?
  hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  key = hint.group(2) if hint else None
  if key is None and isinstance(error, (AttributeError, KeyError)):
    quoted = re.search(r"'([^']+)'", text)
    key = quoted.group(1) if quoted else None
  if key is not None:
    override = next((arg.split("=", 1)[0] for arg in argv if arg.startswith("--config.")
                     and f".{key}" in arg.split("=", 1)[0]), None)
    where = f" ({override})" if override else ""
    suggestion = f"; did you mean {hint.group(1)!r}?" if hint else "."
    return f"the config has no key {key!r}{where}{suggestion}"
  if "Errno" in text:  # The config file cannot be read.
    reason = [line.strip() for line in text.splitlines() if "Errno" in line][-1]
    return f"cannot load {config_flag}: {reason}"
  if "Traceback (most recent call last)" in text:
    # The config file's get_config raised: its own message is the last line.
    last = re.split(r"\b\w+(?:Error|Exception): ", text)[-1]
    return f"{config_flag}: {' '.join(last.split())}"
  return " ".join(text.split())


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with the config loaded here too, so that a bad flag, a missing
  config file or a misspelt `--config.` key is one `rvq_jax: error:` line (exit 2)
  instead of a traceback."""
  try:
    remaining = flags.FLAGS(argv)
    # A config file that failed to load raises only when the config is first read.
    _CONFIG.value.keys()
  except Exception as error:  # noqa: BLE001  (every parse failure is the user's to fix)
    print(f"rvq_jax: error: {_flag_error(error, argv)}", file=sys.stderr)
    sys.exit(2)
  return remaining


def run() -> None:
  """Console entry with readable errors for the failures a user can fix."""
  def wrapped(argv):
    from rvq_jax import parallel  # After absl parsed flags, as main's imports.
    try:
      return main(argv)
    except (ValueError, FileNotFoundError) as error:
      # Printed once: a log line as well would repeat it.
      print(f"rvq_jax: error: {error}", file=sys.stderr)
      return 2
    except FloatingPointError as error:
      print(f"rvq_jax: stopped: {error}", file=sys.stderr)
      return 3
    except parallel.DistributedInitError as error:
      print(f"rvq_jax: error: {error}", file=sys.stderr)
      return 4
  app.run(wrapped, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
