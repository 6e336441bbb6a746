"""One process of a multi-process tokenizer run on simulated CPU devices.

Launched by tests/test_multihost.py (not collected by pytest: no test_ prefix):

  RVQ_JAX_COORDINATOR=127.0.0.1:PORT RVQ_JAX_NUM_PROCESSES=2 RVQ_JAX_PROCESS_ID=1 \\
      python tests/_multihost_worker.py --devices=4 --workdir=DIR --num_steps=2 \\
      --record=DIR/record_1.json

The process joins the job exactly as `python -m rvq_jax.main` does
(`parallel.initialize_distributed`, driven by the RVQ_JAX_* variables), trains the tiny
tokenizer of `tiny_config` with `loop.run`, and writes a JSON record: for every step, the example
indices this process loaded, the global batch's indices, and the loss; and the per-example
eval rows (`loop.ROWS_PREFIX`) the final evaluation collected.

`--data_process=K` makes this process read process K's slice of every batch instead of
its own: the mis-sharded input the test must catch. `--sigterm_at=S --sigterm_process=P`
makes process P send itself SIGTERM before it loads the batch of step S + 1 (a preemption
notice reaching one host); the record then also holds the exit code (143) and is
written before the process exits.

The record counts, per step, the calls of JAX's host-synchronizing collectives
(`multihost_utils.process_allgather`, `sync_global_devices`, `broadcast_one_to_all`)
made while the loop ran that step: none may happen in a step that neither saves nor
evaluates.
"""
import argparse
import json
import os
import signal
import sys
import traceback


def _parse():
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, required=True, help="local CPU devices")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num_steps", type=int, required=True)
  parser.add_argument("--record", required=True, help="JSON file this process writes")
  parser.add_argument("--mesh", default="4,2,1", help="data,fsdp,model")
  parser.add_argument("--data_process", type=int, default=None,
                      help="read this process's slice instead of our own (mis-sharding)")
  parser.add_argument("--sigterm_at", type=int, default=None,
                      help="send SIGTERM to this process before loading this step's batch")
  parser.add_argument("--sigterm_process", type=int, default=1)
  return parser.parse_args()


def _set_up_jax(devices: int):
  # Before the backend starts: the device count and the test-wide compile settings of
  # tests/conftest.py.
  os.environ["JAX_PLATFORMS"] = "cpu"
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [
      f"--xla_force_host_platform_device_count={devices}"])
  import jax
  jax.config.update("jax_disable_most_optimizations", True)
  cache = os.environ.get("RVQ_JAX_TEST_COMPILATION_CACHE")
  # Single-process runs only. JAX writes cache entries from process 0 alone, so in a
  # multi-process run process 0 may load a step that process 1 still compiles; its
  # first collective then waits for process 1 in gloo's 30 s context set-up, and fails.
  if cache and not os.environ.get("RVQ_JAX_COORDINATOR"):
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def tiny_config(num_steps: int, mesh_shape):
  """The shared tiny Reg-VQ tokenizer; no GAN phase, so one compiled step variant keeps
  the multi-process compiles short."""
  from rvq_jax import config as config_lib
  from tests import tiny_configs
  config = tiny_configs.tiny_config("regvq", num_steps=num_steps, mesh_shape=mesh_shape)
  # 8 eval examples: the loop keeps the per-example rows of the first 6.
  config.tokenizer.eval.max_manifold_examples = 6
  config_lib.validate(config)
  return config


def main():
  args = _parse()
  _set_up_jax(args.devices)
  from rvq_jax import parallel
  parallel.initialize_distributed()
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils

  from rvq_jax.train import loop
  from rvq_jax.train.tokenizer_stage import TokenizerStage

  record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local": {}, "global": {}, "loss": {},
            "start_step": None, "host_syncs": {}, "exit_code": 0}
  loaded = {"step": None}  # Batches loaded so far: the step the loop is running.

  def counting(function):
    def wrapper(*args, **kwargs):
      step = loaded["step"]
      record["host_syncs"][step] = record["host_syncs"].get(step, 0) + 1
      return function(*args, **kwargs)
    return wrapper

  for name in ("process_allgather", "sync_global_devices", "broadcast_one_to_all"):
    setattr(multihost_utils, name, counting(getattr(multihost_utils, name)))

  class RecordingIterator:
    """The stage's iterator, noting which examples each step loaded on this process."""

    def __init__(self, iterator):
      self.iterator = iterator

    def __next__(self):
      step = self.iterator.get_state()["step"]
      if record["start_step"] is None:
        record["start_step"] = step
      if step == args.sigterm_at and jax.process_index() == args.sigterm_process:
        os.kill(os.getpid(), signal.SIGTERM)
      batch = next(self.iterator)
      loaded["step"] = step + 1
      record["local"][step] = batch["index"].tolist()
      record["global"][step] = self.iterator.global_batch_indices(step)[0].tolist()
      return batch

    def get_state(self):
      return self.iterator.get_state()

    def restore(self, state):
      self.iterator.restore(state)

    def close(self):
      self.iterator.close()

  class RecordingStage(TokenizerStage):

    def train_iterator(self, process_index, process_count):
      if args.data_process is not None:
        process_index = args.data_process
      return RecordingIterator(super().train_iterator(process_index, process_count))

    def eval_step(self, container, constants, batch):
      # A per-example output (one of the loop's rows): every process must end up with the
      # same rows, in the global batch's order, as many as the cap allows.
      outputs = super().eval_step(container, constants, batch)
      outputs[loop.ROWS_PREFIX + "mean_pixel"] = jnp.mean(batch["image"], axis=(1, 2, 3))
      return outputs

    def finalize_eval(self, totals):
      record["eval_rows"] = totals.pop(loop.ROWS_PREFIX + "mean_pixel").tolist()
      return super().finalize_eval(totals)

  class RecordingReporter(loop.Reporter):

    def progress(self, step, metrics, keys):
      record["loss"][step] = metrics["loss"]
      super().progress(step, metrics, keys)

  loop.Reporter = RecordingReporter  # The loop looks the name up at run time.
  config = tiny_config(args.num_steps, [int(s) for s in args.mesh.split(",")])
  try:
    loop.run(RecordingStage(config), loop.loop_config_from(config), args.workdir)
  except SystemExit as stop:
    record["exit_code"] = stop.code
  with open(args.record + ".tmp", "w") as f:
    json.dump(record, f)
  os.replace(args.record + ".tmp", args.record)
  return record["exit_code"]


if __name__ == "__main__":
  try:
    code = main()  # 143 after a preemption, on every process: a normal exit, as main's.
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    # Not sys.exit: the distributed runtime's shutdown would wait for the other
    # process, which may be waiting for this one.
    os._exit(1)  # pylint: disable=protected-access
  sys.exit(code)
