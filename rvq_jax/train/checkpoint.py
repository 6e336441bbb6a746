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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what a restore should produce."""
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      tree, shardings)
