"""Entry point: `python -m rvq_jax.main --config=configs/<data>.py[:variant] --workdir=DIR`.

Runs the config's stages in order (tokenizer → ar → diffusion), each in
`workdir/<stage>/`, resuming a stage that has a checkpoint and skipping one that has
finished. Other modes act on trained stages: `eval` (--stage), `reconstruct` (--input
folder → --output folder of PNGs), `encode` (--split → token array .npz for the priors)
and `sample` (a prior → --num_samples PNGs and their tokens).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant' (see configs/).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for this run.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "reconstruct", "encode", "sample"],
                          "What to do.")
_STAGE = flags.DEFINE_enum("stage", None, ["tokenizer", "ar", "diffusion"],
                           "eval: the stage to evaluate (default tokenizer); sample: the prior "
                           "(default: each prior in the config's stages).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 64, "sample: how many images.")
_INPUT = flags.DEFINE_string("input", None, "reconstruct: folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "reconstruct: output folder; encode: .npz path "
                              "(default workdir/tokenizer/tokens_<split>.npz); sample: output "
                              "folder (default workdir/<prior>/samples).")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "encode: which split.")
flags.mark_flags_as_required(["config", "workdir"])


class DistributedInitError(RuntimeError):
  """This process could not join the multi-process job (raised before any hang)."""


_DISTRIBUTED_ENV_HELP = (
    "Multi-process settings: RVQ_JAX_COORDINATOR=host:port (process 0's address, reachable "
    "from every process; process 0 listens there), RVQ_JAX_NUM_PROCESSES (N), "
    "RVQ_JAX_PROCESS_ID (0 … N−1, a different one per process), RVQ_JAX_INIT_TIMEOUT "
    "(seconds to wait, default 300). On Cloud TPU VMs or SLURM set RVQ_JAX_INIT=1 instead "
    "and JAX reads the topology from the environment.")


def _env_int(name: str) -> int:
  value = os.environ.get(name)
  if value is None or not value.strip().lstrip("-").isdigit():
    raise DistributedInitError(
        f"RVQ_JAX_COORDINATOR is set, so {name} must be an integer, got {value!r}. "
        + _DISTRIBUTED_ENV_HELP)
  return int(value)


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once `address` accepts TCP connections; raises after `timeout` seconds.

  jax.distributed.initialize does not raise when the coordinator is unreachable: after
  its deadline the runtime aborts the process with a bare DEADLINE_EXCEEDED. Probing the
  port first turns the commonest mistake (wrong address, process 0 not started, a
  firewall) into an error that names the address.
  """
  import socket
  import time
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedInitError(
        f"RVQ_JAX_COORDINATOR={address!r} is not host:port. " + _DISTRIBUTED_ENV_HELP)
  host = host.strip("[]")  # IPv6 literals are written [::1]:port.
  deadline = time.monotonic() + timeout
  while True:
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, remaining))):
        return
    except OSError as error:
      if remaining <= 0:
        raise DistributedInitError(
            f"cannot reach the coordinator at {address} (RVQ_JAX_COORDINATOR) within "
            f"{timeout:g} s (RVQ_JAX_INIT_TIMEOUT): {error}. Is process 0 running, on that "
            "host and port, and is the port open between the machines? "
            + _DISTRIBUTED_ENV_HELP) from None
    time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))


def _initialize_distributed() -> None:
  """Joins a multi-process job when one is configured (TPU pods, or RVQ_JAX_COORDINATOR).

  Fails within RVQ_JAX_INIT_TIMEOUT seconds with a message naming the coordinator and the
  environment variables, rather than hanging or aborting without one.
  """
  import sys
  import threading
  import time
  import jax
  coordinator = os.environ.get("RVQ_JAX_COORDINATOR")
  auto = bool(os.environ.get("RVQ_JAX_INIT"))
  if not coordinator and not auto:
    return
  timeout = float(os.environ.get("RVQ_JAX_INIT_TIMEOUT", "300"))
  deadline = time.monotonic() + timeout
  if coordinator:
    num_processes = _env_int("RVQ_JAX_NUM_PROCESSES")
    process_id = _env_int("RVQ_JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
      raise DistributedInitError(
          f"RVQ_JAX_PROCESS_ID={process_id} must lie in [0, RVQ_JAX_NUM_PROCESSES="
          f"{num_processes}). " + _DISTRIBUTED_ENV_HELP)
    if process_id != 0:
      _wait_for_coordinator(coordinator, timeout)
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
    who = f"process {process_id} of {num_processes}, coordinator {coordinator}"
  else:
    # Cloud TPU / SLURM / Open MPI: the topology comes from the environment.
    kwargs = {}
    who = "auto-detected cluster (RVQ_JAX_INIT=1)"

  def give_up():
    # The coordinator was reachable but not every process registered in time; the
    # runtime would abort later with only DEADLINE_EXCEEDED, so say what to check first.
    print(f"rvq_jax: error: the multi-process job did not start within {timeout:g} s "
          f"(RVQ_JAX_INIT_TIMEOUT) for {who}: not every process joined. Start all "
          "processes with the same coordinator and process count and distinct process "
          "ids. " + _DISTRIBUTED_ENV_HELP, file=sys.stderr, flush=True)
    os._exit(4)  # pylint: disable=protected-access

  # One budget for probing and joining, so the whole start-up is bounded by the timeout.
  remaining = max(1, int(deadline - time.monotonic()))
  watchdog = threading.Timer(remaining + 1.0, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(initialization_timeout=remaining, **kwargs)
  except (RuntimeError, ValueError) as error:
    raise DistributedInitError(
        f"jax.distributed.initialize failed for {who}: {error}. "
        + _DISTRIBUTED_ENV_HELP) from error
  finally:
    watchdog.cancel()


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

  from rvq_jax.train import inference, loop, stages
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
    except DistributedInitError as error:
      print(f"rvq_jax: error: {error}", file=sys.stderr)
      return 4
  app.run(wrapped)


if __name__ == "__main__":
  run()
