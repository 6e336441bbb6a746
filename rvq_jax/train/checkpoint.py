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
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


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

  def __init__(self, directory: str, *, keep: int = 3, asynchronous: bool = True):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=True)
    self._manager = _Manager(
        self.directory, item_names=("state", "data", "progress"), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

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

  def differences(self, step: int, abstract_state: Any) -> list[str]:
    """How the arrays saved at `step` differ from `abstract_state`: keys on one side
    only and shapes, each naming the parameter ([] when they fit). Reads only the
    checkpoint's metadata; [] when that cannot be read (the restore then reports)."""
    try:
      handler = ocp.StandardCheckpointHandler()
      try:
        saved = handler.metadata(epath.Path(self.directory) / str(step) / "state")
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
