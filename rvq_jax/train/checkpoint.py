"""Preemption-safe checkpoints: model/optimizer state, data position and progress together.

A checkpoint is one orbax step directory holding three items: `state` (the stage's whole
train state as a pure pytree, sharded arrays written by every process), `data` (the
input iterator's position, JSON) and `progress` (step and bookkeeping, JSON). Saves are
atomic (orbax writes to a temporary directory and renames), so an interrupted save
leaves the previous checkpoint as the latest one.

Multi-process: every process calls `save` and `restore` at the same step (they are
collective). Each process writes only the shards its devices hold (`state/ocdbt.process_<i>`),
process 0 the metadata and the JSON items, so the directory must be one all processes see
(gs://, a shared file system). A restore reads onto any mesh: the target's shardings say
where each array goes, so a checkpoint from 8 devices resumes on 4, on 1, or on another
mesh shape (tests/test_topology.py).

Damaged checkpoints. A save interrupted by a crash or a hard kill leaves only a temporary
directory (`<step>.orbax-checkpoint-tmp-*`), which orbax never lists and removes on the
next start; old checkpoints are deleted only after the new one is committed, so the
previous one stays restorable. A committed checkpoint can still be damaged later
(truncated or deleted files, an edited JSON item): `restore_latest` then warns, naming
the step directory and the reason, and falls back to the newest step that restores
whole — state, data position and progress always from the same step, so the model and
the data iterator stay consistent. A run that trains on moves the damaged steps aside
(`<step>.damaged-<time>`, which orbax ignores) so that their numbers can be saved again.
When checkpoints exist but none restores, `NoUsableCheckpointError` says so: the run
never starts again from step 0 over them.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from rvq_jax import files

# Suffix of a step directory moved aside after it failed to restore (not a step name for
# orbax, whose step directories are plain numbers).
DAMAGED_SUFFIX = ".damaged-"


class NoUsableCheckpointError(ValueError):
  """Checkpoints exist, but none of them restores."""


class _Manager(ocp.CheckpointManager):
  """A CheckpointManager that leaves JAX's preemption service to the training loop.

  The service takes each process's last `reached_preemption_sync_point` argument as its
  position and sets the common save step just past the largest. Orbax asks too, with
  the checkpoint's step, from `save` and from the thread that finalizes an asynchronous
  save, at any moment: not the loop's step id (a count of its calls), and from that
  thread an old one. Should the service read it then, the agreed step could lie behind
  the loop, never be reached, and a preempted job would not save. The loop alone asks
  (`loop._Preemption`), once per step.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False

  def close(self) -> None:
    # Orbax starts removing old temporary directories in the background when the
    # manager is made, and its close() does not wait for that: closed early (a run
    # that stops at once with an error), the clean-up thread then fails with "cannot
    # schedule new futures after shutdown", a traceback burying the error.
    await_cleanup = getattr(self, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:
      await_cleanup()
    super().close()


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for one stage's directory."""

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True,
               read_only: bool = False):
    """`read_only`: for inference, which creates, cleans up and moves nothing (orbax's own
    read_only option would say so in two warnings on every load)."""
    self.directory = files.absolute(directory)  # Never abspath a gs:// URI.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep, create=not read_only,
        enable_async_checkpointing=asynchronous and not read_only,
        cleanup_tmp_directories=not read_only)
    self._manager = _Manager(
        self.directory, item_names=("state", "data", "progress"), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The committed steps, oldest first (interrupted saves are not among them)."""
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return str(epath.Path(self.directory) / str(step))

  def save(self, step: int, state: Any, data_state: dict, progress: dict) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            progress=ocp.args.JsonSave(progress)),
        force=True)
    logging.info("Checkpoint for step %d started in %s.", step, self.directory)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores onto `abstract_state` (ShapeDtypeStructs with shardings), any topology."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            progress=ocp.args.JsonRestore()))
    return restored["state"], restored["data"], restored["progress"]

  def restore_latest(self, abstract_state: Any, *, move_damaged: bool
                     ) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data state, progress) of the newest checkpoint that restores whole.

    Steps are tried newest first; each one that fails is logged (a warning naming its
    directory and the reason) and the next older one is tried. With several processes
    they agree on every attempt, so all resume from the same step.

    Args:
      abstract_state: as for `restore`.
      move_damaged: rename the steps newer than the restored one that failed to
        `<step>.damaged-<time>` (a training run, which will save those step numbers
        again); inference leaves the directory as it is.

    Returns:
      None when there is no checkpoint at all.

    Raises:
      NoUsableCheckpointError: checkpoints exist but none restores; names the directory,
        each step's reason and what to do.
    """
    with _quiet_closed_event_loop():
      return self._restore_latest(abstract_state, move_damaged)

  def _restore_latest(self, abstract_state: Any, move_damaged: bool):
    steps = self.all_steps()[::-1]
    failed: list[tuple[int, str]] = []
    for position, step in enumerate(steps):
      reason = None
      try:
        state, data_state, progress = self.restore(step, abstract_state)
        _check_json_items(step, data_state, progress)
      except Exception as error:  # noqa: BLE001  (orbax, TensorStore and JSON all differ)
        reason = _one_line(error)
      if jax.process_count() > 1:
        # A damaged file may be read by some processes only; all must take the same step.
        everywhere = multihost_utils.process_allgather(np.asarray(reason is None))
        if reason is None and not np.all(everywhere):
          reason = "another process could not restore it"
      if reason is None:
        if failed:
          logging.warning("Resuming from step %d in %s: the newer checkpoint(s) of step %s "
                          "could not be restored (see above).", step, self.directory,
                          ", ".join(str(s) for s, _ in failed))
          if move_damaged:
            self._move_aside([s for s, _ in failed])
        return step, state, data_state, progress
      failed.append((step, reason))
      following = (f"trying step {steps[position + 1]}" if position + 1 < len(steps)
                   else "no older checkpoint is left")
      logging.warning("Checkpoint %s (step %d) cannot be restored: %s; %s.",
                      self.step_dir(step), step, reason, following)
    if not failed:
      return None
    details = "; ".join(f"step {step}: {reason}" for step, reason in failed)
    raise NoUsableCheckpointError(
        f"none of the {len(failed)} checkpoints in {self.directory} can be restored "
        f"({details}). If the config changed since they were written (model or data), "
        "run in a new --workdir; if they are damaged, move the step directories out of "
        f"{self.directory} to start this stage again from step 0.")

  def _move_aside(self, steps: list[int]) -> None:
    """Renames damaged step directories (process 0) so that orbax no longer lists them."""
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
      for step in steps:
        source = epath.Path(self.step_dir(step))
        target = source.parent / f"{step}{DAMAGED_SUFFIX}{stamp}"
        source.rename(target)
        logging.warning("Moved the damaged checkpoint %s to %s (kept for inspection; delete "
                        "it when done).", source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("rvq_jax:moved_damaged_checkpoints")
    self._manager.reload()

  def differences(self, step: int, abstract_state: Any) -> list[str]:
    """How the arrays saved at `step` differ from `abstract_state`: keys on one side
    only and shapes, each naming the parameter ([] when they fit). Reads only the
    checkpoint's metadata; [] when that cannot be read (the restore then reports)."""
    try:
      handler = ocp.StandardCheckpointHandler()
      try:
        # The manager's own directory: the path its arrays were written through.
        saved = handler.metadata(epath.Path(self._manager.directory) / str(step) / "state")
      finally:
        handler.close()
      saved = _flat(getattr(saved, "tree", saved))
    except Exception:  # noqa: BLE001  (a damaged checkpoint: restore says what is wrong)
      return []
    wanted = _flat(abstract_state)
    found = []
    for name in sorted(set(saved) | set(wanted)):
      if name not in wanted:
        found.append(f"{name} is in the checkpoint but not in this config's model")
      elif name not in saved:
        found.append(f"{name} is in this config's model but not in the checkpoint")
      elif tuple(saved[name].shape) != tuple(wanted[name].shape):
        found.append(f"{name} has shape {tuple(saved[name].shape)} in the checkpoint, "
                     f"{tuple(wanted[name].shape)} in this config")
    return found

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class CheckpointMismatchError(ValueError):
  """A checkpoint holds other arrays than the config's model (see `differences`)."""


def _flat(tree: Any) -> dict[str, Any]:
  """{'a/b/kernel': leaf} of a nested dict (int and str keys alike, as orbax stores them)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path): leaf
          for path, leaf in leaves}


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what a restore should produce."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      tree, shardings)


def _check_json_items(step: int, data_state: Any, progress: Any) -> None:
  """The JSON items parsed; they must also say what the loop wrote into them."""
  if not isinstance(progress, dict) or progress.get("step") != step:
    raise ValueError(f"its progress item is {progress!r}, not {{'step': {step}, ...}}")
  if not isinstance(data_state, dict):
    raise ValueError(f"its data item is {data_state!r}, not a data iterator state")


@contextlib.contextmanager
def _quiet_closed_event_loop():
  """Drops the "Event loop is closed" tracebacks a failed restore leaves behind.

  When one read of a restore fails, orbax closes its event loop while TensorStore's other
  reads are in flight; as they finish, their callbacks find the loop closed and Python
  prints each as an unraisable exception: dozens of lines after the one warning that
  already says what failed. Other unraisable exceptions still reach the previous hook.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    sys.unraisablehook = previous


def _one_line(error: BaseException) -> str:
  """An exception as one short line: TensorStore's messages carry a whole JSON spec."""
  text = str(error).split(" [tensorstore_spec", 1)[0]
  text = text.splitlines()[0] if text else ""
  if len(text) > 320:  # Keep the head (what was read) and the tail (why it failed).
    text = text[:150] + " … " + text[-150:]
  return f"{type(error).__name__}: {text}" if text else type(error).__name__
