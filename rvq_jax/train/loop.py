"""The one training loop every stage runs.

A stage (tokenizer, AR prior, diffusion prior) supplies its train container (an NNX
module holding models and optimizers), a step function and its data; this loop owns the
rest: the mesh, sharded initialization, the jitted step with explicit shardings and a
donated state, checkpoints and resumption (state, data position, step), preemption,
NaN stops, evaluation, progress and summaries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import signal
import threading
from typing import Any
from typing import Callable
from typing import Hashable
from typing import Iterator
from typing import Mapping
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rvq_jax import files
from rvq_jax import parallel
from rvq_jax.data.iterator import to_global_array
from rvq_jax.train import checkpoint as checkpoint_lib
from rvq_jax.train import reporting
from rvq_jax.train.reporting import Reporter

Batch = Mapping[str, np.ndarray]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the last checkpoint written before it is intact."""


class ResumableIterator(Protocol):
  """Host-local batches, with a position that a checkpoint can hold."""

  def __next__(self) -> Batch: ...

  def get_state(self) -> dict: ...

  def restore(self, state: dict) -> None: ...


class Stage(Protocol):
  """What a stage gives the loop."""

  name: str
  progress_keys: tuple[str, ...]

  def create(self, rngs: nnx.Rngs) -> nnx.Module:
    """The train container: models, optimizers, EMA copies (built inside a jit)."""

  def constants(self) -> Any:
    """Frozen inputs of every step (pretrained networks): passed, never checkpointed."""

  def phase(self, step: int) -> Hashable:
    """A static value selecting the compiled step variant (e.g. before/after GAN start)."""

  def train_step(self, container: nnx.Module, constants: Any, batch: Batch, key: jax.Array,
                 step: jax.Array, phase: Hashable) -> dict[str, jax.Array]:
    """Updates `container` in place; returns scalar metrics including 'loss'."""

  def eval_step(self, container: nnx.Module, constants: Any, batch: Batch) -> dict[str, jax.Array]:
    """Sums over one held-out batch (with a 'count'); the loop adds them over batches.

    Outputs named `ROWS_PREFIX + name` are per-example rows [B, ...] instead, which the
    loop collects (see `evaluate_batches`)."""

  def finalize_eval(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
    """Metrics from the summed eval outputs (and the collected rows)."""

  def summarize(self, container: nnx.Module, constants: Any, batch: Batch,
                step: int) -> dict[str, np.ndarray]:
    """uint8 images for TensorBoard/PNG (runs on every process; called rarely)."""

  # Optional: `eval_images(totals, step) -> dict[str, np.ndarray]`, uint8 images drawn
  # from an evaluation's totals (e.g. the held-out codebook usage), written beside its
  # scalars as `eval_<name>`.
  # Optional: `on_finish(container, step, workdir)`, called on every process once the
  # final checkpoint is saved (also when a rerun finds the stage at its last step),
  # before the final evaluation: what the stage leaves for later use, e.g. its
  # params-only export (rvq_jax.train.exporting). It may run collectives.

  def train_iterator(self, process_index: int, process_count: int) -> ResumableIterator: ...

  def eval_batches(self, process_index: int, process_count: int) -> Iterator[Batch]: ...


@dataclasses.dataclass
class LoopConfig:
  """The loop's own settings (config.train plus seed and mesh)."""

  num_steps: int
  log_every: int = 50
  checkpoint_every: int = 500
  eval_every: int = 500
  summary_every: int = 500
  keep_checkpoints: int = 3
  seed: int = 0
  mesh_shape: tuple[int, ...] = (-1, 1, 1)
  mesh_axes: tuple[str, ...] = parallel.DEFAULT_MESH_AXES
  sharding_rules: tuple = parallel.DEFAULT_RULES
  asynchronous_checkpoints: bool = True
  # Per-example eval rows kept in all (`evaluate_batches`); None = no limit.
  max_eval_rows: int | None = None
  # Resume a checkpoint whose data state names other data (a different example count,
  # batch size or seed) at its step in the new data's order, instead of refusing.
  accept_data_change: bool = False


# Every process counts its calls of the preemption service's sync point the same way
# (same stages, same steps, from the same checkpoint), so this count is a step id they
# share; unlike a stage's step it never repeats when the next stage starts from 0, where
# a sync point agreed near the end of one stage would otherwise be met again.
_SYNC_POINT_CALLS = itertools.count(1)


class _Preemption:
  """Says, once per step, whether the job is being preempted and must save and stop.

  One process: SIGTERM/SIGINT set a flag (a Python handler), read after the step in
  flight, so the run saves and stops at the next step.

  Several processes: JAX's preemption service. `jax.distributed.initialize` installs a
  C SIGTERM handler whose listener thread (polling once a second) posts the notice to
  the coordination service; every process's service thread then reports its latest
  step id, waits at one barrier and takes the largest + 1 as the step at which all save
  (`multihost_utils.reached_preemption_sync_point`). Asking is a local, lock-guarded
  comparison: no step waits for another host unless a notice arrived. The notice
  therefore reaches the loop up to ~1 s (plus the barrier) after SIGTERM: at a few steps
  per second the run goes on for a few steps before its save; every process saves at
  the same one. A Python SIGTERM handler would displace JAX's, so there is none here;
  SIGINT (Ctrl-C) is turned into a SIGTERM to this process and takes the same path.
  """

  def __init__(self):
    self.requested = threading.Event()
    self._previous = {}
    self._service = jax.process_count() > 1

  def __enter__(self):
    if self._service:
      if not jax.config.jax_enable_preemption_service:
        raise RuntimeError(
            "this multi-process run has no JAX preemption service, so its processes "
            "could not agree on a step to save at when one is preempted: leave "
            "jax_enable_preemption_service on (JAX's default).")
      if callable(signal.getsignal(signal.SIGTERM)):
        # getsignal reports Python's own table: a callable is a Python handler, and it
        # replaced JAX's C handler when it was installed.
        logging.warning("A Python SIGTERM handler replaced JAX's preemption notifier: "
                        "a SIGTERM will not make the processes save and stop together.")
    if threading.current_thread() is threading.main_thread():
      if self._service:
        self._previous[signal.SIGINT] = signal.signal(
            signal.SIGINT, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
      else:
        for sig in (signal.SIGTERM, signal.SIGINT):
          self._previous[sig] = signal.signal(sig, lambda *_: self.requested.set())
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def reached(self) -> bool:
    """Whether to save and stop after the step just dispatched (call once per step)."""
    if self._service:
      return multihost_utils.reached_preemption_sync_point(next(_SYNC_POINT_CALLS))
    return self.requested.is_set()


def global_batch(batch: Batch, mesh) -> dict[str, jax.Array]:
  """Host-local rows → global arrays split over the mesh's batch axes."""
  return to_global_array(dict(batch), parallel.batch_sharding(mesh))


# Eval outputs under this prefix are per-example rows, not sums (see `evaluate_batches`).
ROWS_PREFIX = "rows/"


def evaluate_batches(stage: Stage, eval_batch: Callable[[Batch], dict], mesh, *,
                     max_rows: int | None = None, return_totals: bool = False):
  """Runs `eval_batch` over the stage's held-out batches, sums, and finalizes.

  Every output is a sum over the batch, added over batches in float64, except those
  named `ROWS_PREFIX + name`: per-example rows [B, ...] (B = the global batch), for
  metrics that need every example (precision/recall's k-NN manifolds). Of those the loop
  keeps the rows of valid examples (the batch's 'valid', all rows without one), in
  evaluation order, and at most `max_rows` of them in all (None = no limit), which bounds
  host memory; `stage.finalize_eval` receives them concatenated, [N, ...] with
  N ≤ max_rows, under the same name. Like the sums, rows are global arrays gathered from
  all processes, so every process sees the same ones.

  Returns:
    The metrics of `stage.finalize_eval`, or (metrics, totals) with `return_totals`.
  """
  # A running float64 total: holding every batch's outputs would keep, e.g., two
  # [2048, 2048] FID moment matrices per batch in host memory.
  totals: dict[str, np.ndarray] | None = None
  rows: dict[str, list[np.ndarray]] = {}
  kept = 0
  for batch in stage.eval_batches(jax.process_index(), jax.process_count()):
    inputs = global_batch(batch, mesh)
    # Sums may be sharded over processes on a pod: every process gathers them.
    output = jax.tree.map(reporting.to_host, eval_batch(inputs))
    sums = {name: value for name, value in output.items() if not name.startswith(ROWS_PREFIX)}
    if totals is None:
      totals = {name: np.asarray(value, np.float64) for name, value in sums.items()}
    else:
      for name, value in sums.items():
        totals[name] += np.asarray(value, np.float64)
    per_example = {name: value for name, value in output.items() if name.startswith(ROWS_PREFIX)}
    if per_example:
      size = len(next(iter(per_example.values())))
      valid = (reporting.to_host(inputs["valid"]).astype(bool) if "valid" in inputs
               else np.ones(size, bool))
      if any(len(value) != len(valid) for value in per_example.values()):
        raise ValueError(f"{stage.name}: eval rows {[np.shape(v) for v in per_example.values()]}"
                         f" do not match the batch of {len(valid)} examples.")
      room = len(valid) if max_rows is None else max(max_rows - kept, 0)
      take = np.flatnonzero(valid)[:room]
      for name, value in per_example.items():
        rows.setdefault(name, []).append(np.asarray(value)[take])
      kept += len(take)
  if totals is None:
    raise ValueError(f"{stage.name}: the evaluation split produced no batches.")
  totals.update({name: np.concatenate(parts) for name, parts in rows.items()})
  metrics = stage.finalize_eval(totals)
  return (metrics, totals) if return_totals else metrics


def jitted_train_step(stage: Stage, graphdef, state_shardings, phase: Hashable) -> Callable:
  """The loop's step for `phase`: jitted, sharded, state donated (AOT checks lower this)."""
  def train_step(state, constants, batch, key, step):
    container = nnx.merge(graphdef, state)
    metrics = stage.train_step(container, constants, batch, key, step, phase)
    return nnx.state(container), metrics
  return jax.jit(train_step, out_shardings=(state_shardings, None), donate_argnums=0)


@dataclasses.dataclass(frozen=True, eq=False)
class Prepared:
  """A stage set up on its mesh, nothing allocated: what `run`, `load_trained`, the AOT
  check (`rvq_jax.tools.aot_check`) and the benchmarks share. Made by `prepare`.

  `abstract_state` holds ShapeDtypeStructs without shardings; `state_shardings` has the
  NamedSharding of every leaf (from the parameters' logical axes and the config's rules).
  Methods that create, restore or transfer arrays, and the steps, run under
  `jax.set_mesh(prepared.mesh)`.
  """

  stage: Stage
  config: LoopConfig
  mesh: Mesh
  graphdef: nnx.GraphDef
  abstract_state: nnx.State
  state_shardings: nnx.State
  _train_steps: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  @property
  def replicated(self) -> NamedSharding:
    """The sharding of the constants, the step key and the step number."""
    return NamedSharding(self.mesh, P())

  def merge(self, state: nnx.State) -> nnx.Module:
    """The stage's container holding `state`."""
    return nnx.merge(self.graphdef, state)

  def init_state(self) -> nnx.State:
    """A freshly initialized state (seed `config.seed`), created sharded on the mesh."""
    return jax.jit(lambda: nnx.state(self.stage.create(nnx.Rngs(self.config.seed))),
                   out_shardings=self.state_shardings)()

  def _restore_target(self):
    return checkpoint_lib.abstract_with_shardings(
        nnx.to_pure_dict(self.abstract_state), nnx.to_pure_dict(self.state_shardings))

  def _filled(self, pure_state) -> nnx.State:
    state = jax.tree.map(lambda leaf: leaf, self.abstract_state)  # A copy to fill.
    nnx.replace_by_pure_dict(state, pure_state)
    return state

  def restore(self, checkpointer: checkpoint_lib.Checkpointer, step: int):
    """(state, data-iterator state, progress) of the checkpoint of `step`, restored onto
    the state's shardings.

    Raises checkpoint.CheckpointMismatchError naming the arrays that differ when the
    config builds another model than the checkpoint holds.
    """
    self._check_matches(checkpointer, step)
    pure_state, data_state, progress = checkpointer.restore(step, self._restore_target())
    return self._filled(pure_state), data_state, progress

  def _check_matches(self, checkpointer: checkpoint_lib.Checkpointer, step: int) -> None:
    """Raises CheckpointMismatchError when the checkpoint of `step` holds another model
    than this config builds (read from its metadata; a damaged one passes, and its
    restore then says what is wrong)."""
    differences = checkpointer.differences(step, self._restore_target())
    if differences:
      shown = "; ".join(differences[:5])
      more = f"; and {len(differences) - 5} more" if len(differences) > 5 else ""
      raise checkpoint_lib.CheckpointMismatchError(
          f"{self.stage.name}: the checkpoint of step {step} in {checkpointer.directory} "
          f"holds another model than this config builds: {shown}{more}. The config "
          "changed since it was saved (model, quantizer or optimizer settings): use the "
          "config it was trained with, or start over in a new --workdir.")

  def restore_latest(self, checkpointer: checkpoint_lib.Checkpointer, *, move_damaged: bool):
    """(state, data-iterator state, progress) of the newest checkpoint that restores, or
    None without any; a damaged newer one is skipped with a warning (see
    `Checkpointer.restore_latest`, which raises when checkpoints exist but none restores).

    A config change is not damage: when the newest checkpoint's metadata shows another
    model, CheckpointMismatchError is raised before any fallback.
    """
    steps = checkpointer.all_steps()
    if steps:
      self._check_matches(checkpointer, steps[-1])
    restored = checkpointer.restore_latest(self._restore_target(), move_damaged=move_damaged)
    if restored is None:
      return None
    _, pure_state, data_state, progress = restored
    return self._filled(pure_state), data_state, progress

  def constants(self) -> Any:
    """The stage's constants, replicated on the mesh (every step's second argument)."""
    return jax.device_put(self.stage.constants(), self.replicated)

  def abstract_constants(self) -> Any:
    """ShapeDtypeStructs of `constants()`, with their (replicated) sharding."""
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=self.replicated),
        jax.eval_shape(lambda c: c, self.stage.constants()))

  def abstract_step_arguments(self, batch: Mapping[str, jax.ShapeDtypeStruct]) -> tuple:
    """(state, constants, batch, key, step) of a train step as ShapeDtypeStructs with the
    loop's shardings (`batch`: shapes of one global batch): lower `train_step(phase)` with
    them to compile it without allocating anything."""
    state = jax.tree.map(lambda leaf: leaf, self.abstract_state)  # A copy to fill.
    nnx.replace_by_pure_dict(state, checkpoint_lib.abstract_with_shardings(
        nnx.to_pure_dict(self.abstract_state), nnx.to_pure_dict(self.state_shardings)))
    batch_spec = parallel.batch_sharding(self.mesh).spec

    def batch_leaf(leaf):  # Cut to the leaf's rank, as `global_batch` does.
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(
          self.mesh, P(*batch_spec[:len(leaf.shape)])))

    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=self.replicated)
    step = jax.ShapeDtypeStruct((), np.int32, sharding=self.replicated)
    return state, self.abstract_constants(), jax.tree.map(batch_leaf, dict(batch)), key, step

  def train_step(self, phase: Hashable) -> Callable:
    """The loop's jitted step for `phase` (`jitted_train_step`), made once per phase:
    `step(state, constants, batch, key, step) -> (state, metrics)`, state donated."""
    if phase not in self._train_steps:
      self._train_steps[phase] = jitted_train_step(self.stage, self.graphdef,
                                                   self.state_shardings, phase)
    return self._train_steps[phase]

  @functools.cached_property
  def eval_step(self) -> Callable:
    """The jitted `eval_step(state, constants, batch)`: the stage's sums over one batch."""
    @jax.jit
    def eval_step(state, constants, batch):
      return self.stage.eval_step(nnx.merge(self.graphdef, state), constants, batch)
    return eval_step


def prepare(stage: Stage, config: LoopConfig, mesh: Mesh | None = None) -> Prepared:
  """Sets `stage` up on `mesh` (default: `config`'s mesh over all devices) without
  allocating its state: graphdef, abstract state, shardings and, lazily, the steps.

  Call it outside `jax.set_mesh`: under a mesh, nnx.eval_shape would read the logical
  axis names as mesh axes. The sharding rules map them to the mesh here instead.
  """
  if mesh is None:
    mesh = parallel.make_mesh(config.mesh_shape, config.mesh_axes)
  abstract_container = nnx.eval_shape(lambda: stage.create(nnx.Rngs(config.seed)))
  graphdef, abstract_state = nnx.split(abstract_container)
  return Prepared(stage=stage, config=config, mesh=mesh, graphdef=graphdef,
                  abstract_state=abstract_state,
                  state_shardings=parallel.state_shardings(abstract_state, mesh,
                                                           config.sharding_rules))


def load_trained(stage: Stage, config: LoopConfig, workdir: str):
  """The stage's container from the latest checkpoint in `workdir`, for inference.

  A damaged newest checkpoint is skipped with a warning (and left in place).

  Returns (container, constants, mesh, step). Raises FileNotFoundError with the command
  that trains the stage when there is no checkpoint.
  """
  prepared = prepare(stage, config)
  directory = str(epath.Path(workdir) / "checkpoints")
  with jax.set_mesh(prepared.mesh):
    checkpointer = checkpoint_lib.Checkpointer(directory, asynchronous=False, read_only=True)
    try:
      restored = prepared.restore_latest(checkpointer, move_damaged=False)
    finally:
      checkpointer.close()
    if restored is None:
      raise FileNotFoundError(
          f"no {stage.name} checkpoint in {directory}; train the "
          f"stage first: python -m rvq_jax.main --config=<config> --workdir=<workdir>")
    state, _, progress = restored
    constants = prepared.constants()
  return prepared.merge(state), constants, prepared.mesh, int(progress["step"])


def run(stage: Stage, config: LoopConfig, workdir: str) -> dict[str, float]:
  """Trains `stage` to `config.num_steps` in `workdir`, resuming from its latest checkpoint.

  Returns the final evaluation metrics (also written to `workdir/metrics.json`).

  Raises:
    files.UnwritableDirectoryError: `workdir` cannot be written (before anything compiles).
    checkpoint.NoUsableCheckpointError: checkpoints exist but none restores.
  """
  files.ensure_writable_dir(workdir)
  prepared = prepare(stage, config)
  mesh = prepared.mesh
  base_key = jax.random.key(config.seed)

  with jax.set_mesh(mesh), _closed_on_error() as opened:
    checkpointer = opened(checkpoint_lib.Checkpointer(
        str(epath.Path(workdir) / "checkpoints"), keep=config.keep_checkpoints,
        asynchronous=config.asynchronous_checkpoints))
    iterator = opened(stage.train_iterator(jax.process_index(), jax.process_count()))
    start_step = 0
    try:
      latest = prepared.restore_latest(checkpointer, move_damaged=True)
    except BaseException:
      checkpointer.close()  # Its background clean-up must not outlive the error.
      raise
    if latest is not None:
      # State, data position and step all come from one checkpoint (see checkpoint.py).
      state, data_state, progress = latest
      _restore_data(iterator, data_state, config.accept_data_change,
                    f"{stage.name}: the checkpoint of step {int(progress['step'])} in "
                    f"{checkpointer.directory}")
      start_step = int(progress["step"])
    else:
      state = prepared.init_state()

    reporter = opened(Reporter(workdir, stage.name, config.num_steps, start_step))
    if latest is not None:
      reporter.log("Resumed from the checkpoint of step %d.", start_step)
    reporter.log("Mesh %s on %d devices (%d processes).", dict(mesh.shape), jax.device_count(),
                 jax.process_count())

    constants = prepared.constants()

    def evaluate(state, step):
      metrics, totals = evaluate_batches(
          stage, functools.partial(prepared.eval_step, state, constants), mesh,
          max_rows=config.max_eval_rows, return_totals=True)
      reporter.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
      if hasattr(stage, "eval_images"):
        reporter.images(step, {f"eval_{name}": image
                               for name, image in stage.eval_images(totals, step).items()})
      reporter.log("eval at step %d: %s", step,
                   " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
      return metrics

    def summarize(state, batch, step):
      images = stage.summarize(prepared.merge(state), constants,
                               global_batch(batch, mesh), step)
      reporter.images(step, images)

    last_saved = start_step if latest is not None else None
    nonfinite = jnp.zeros((), bool)

    def check_finite(step):
      if bool(nonfinite):
        checkpointer.wait()
        kept = "" if last_saved is None else f" The checkpoint of step {last_saved} is intact."
        raise NonFiniteLossError(
            f"{stage.name}: the loss became NaN or Inf at or before step {step}; the run "
            f"stopped without saving that state.{kept} Lower the learning rate, check the "
            "data, or resume from the checkpoint with another seed.")

    def save(step):
      nonlocal last_saved
      if last_saved == step:
        return
      check_finite(step)
      checkpointer.save(step, nnx.to_pure_dict(state), iterator.get_state(), {"step": step})
      last_saved = step

    step = start_step
    train_metrics: dict[str, float] = {}
    with _Preemption() as preemption:
      while step < config.num_steps:
        batch = next(iterator)
        key = jax.random.fold_in(base_key, step)
        state, metrics = prepared.train_step(stage.phase(step))(
            state, constants, global_batch(batch, mesh), key, jnp.asarray(step, jnp.int32))
        nonfinite = nonfinite | ~jnp.isfinite(metrics["loss"])
        step += 1
        if step % config.log_every == 0 or step == config.num_steps:
          check_finite(step)
          train_metrics = {k: float(v) for k, v in metrics.items()}
          reporter.progress(step, train_metrics, stage.progress_keys)
        if config.summary_every and step % config.summary_every == 0:
          summarize(state, batch, step)
        # Saved before the evaluation of the same step, which then cannot lose it.
        if step % config.checkpoint_every == 0 and step < config.num_steps:
          save(step)
        if config.eval_every and step % config.eval_every == 0 and step < config.num_steps:
          evaluate(state, step)
        if preemption.reached():
          save(step)
          checkpointer.close()
          _close(iterator)
          reporter.log("Stopped at step %d on request; the checkpoint is saved.", step)
          reporter.close()
          raise SystemExit(143)

      save(step)
      if hasattr(stage, "on_finish"):
        stage.on_finish(prepared.merge(state), step, workdir)
      final = evaluate(state, step)
      summarize(state, batch if step > start_step else next(iterator), step)
      reporter.write_json("metrics.json", {
          "step": step, **final, **{f"train/{k}": v for k, v in train_metrics.items()}})
      checkpointer.close()
      _close(iterator)
      reporter.close()
  return final


def _close(iterator) -> None:
  if hasattr(iterator, "close"):
    iterator.close()


@contextlib.contextmanager
def _closed_on_error():
  """Yields `opened(resource) -> resource`; if the block raises (other than the loop's
  own SystemExit, which closes first), closes what was opened, newest first, then
  re-raises. Closing the checkpointer waits for the save in flight, so an error (a
  failing evaluation, bad data) never leaves it half-written as
  `<step>.orbax-checkpoint-tmp`, and no orbax thread fails at interpreter exit."""
  resources = []

  def opened(resource):
    resources.append(resource)
    return resource

  try:
    yield opened
  except SystemExit:
    raise
  except BaseException:
    for resource in reversed(resources):
      try:
        _close(resource)
      except Exception:  # noqa: BLE001  (the original error is the one to report)
        logging.exception("Closing %s after an error failed.", type(resource).__name__)
    raise


def _restore_data(iterator, data_state: dict, accept_change: bool, where: str) -> None:
  """Positions the data iterator from a checkpoint's state, or raises ValueError saying
  what changed in the data and how to go on (a new workdir, or --accept_data_change)."""
  current = iterator.get_state()
  changed = {key: (data_state[key], current[key]) for key in data_state
             if key not in ("step", "order") and key in current
             and data_state[key] != current[key]}
  if changed and not accept_change:
    what = ", ".join(f"{key} {saved} → {now}" for key, (saved, now) in changed.items())
    raise ValueError(
        f"{where} was saved with other data ({what}), so it cannot continue the saved "
        "order of examples. Start over in a new --workdir, or pass --accept_data_change "
        f"to continue from step {data_state['step']} with the new data's order.")
  if changed:
    logging.warning("%s: the data changed (%s); continuing from step %d in the new data's "
                    "order (--accept_data_change).", where, changed, data_state["step"])
    data_state = {"step": data_state["step"]}
  iterator.restore(data_state)


def loop_config_from(config, stage: str = "tokenizer") -> LoopConfig:
  """The loop's settings for `stage` from a full run config (a prior's live in
  config.<stage>.train; the eval rows cap is config.<stage>.eval.max_manifold_examples)."""
  train = config[stage].train
  return LoopConfig(
      num_steps=train.num_steps, log_every=train.log_every,
      checkpoint_every=train.checkpoint_every, eval_every=train.eval_every,
      summary_every=train.summary_every, keep_checkpoints=train.keep_checkpoints,
      seed=config.seed, mesh_shape=tuple(config.mesh.shape), mesh_axes=tuple(config.mesh.axes),
      sharding_rules=tuple(tuple(rule) for rule in config.mesh.rules),
      max_eval_rows=config[stage].eval.max_manifold_examples)
