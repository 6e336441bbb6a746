"""The generic training loop, on a stage small enough to check exactly: resume after
preemption, the NaN stop, checkpoints and metrics files."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rvq_jax import parallel
from rvq_jax.train import loop


class _Container(nnx.Module):
  def __init__(self, rngs):
    self.model = nnx.Linear(4, 1, rngs=rngs)
    self.optimizer = nnx.Optimizer(self.model, optax.sgd(0.1), wrt=nnx.Param)


class _Batches:
  """Batches that are a function of the step; optionally sends SIGTERM at one step."""

  def __init__(self, signal_at=None):
    self.step, self.signal_at = 0, signal_at

  def __next__(self):
    if self.step == self.signal_at:
      os.kill(os.getpid(), signal.SIGTERM)
    rng = np.random.default_rng(self.step)
    self.step += 1
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return {"x": x, "y": x @ np.arange(1, 5, dtype=np.float32)[:, None]}

  def get_state(self):
    return {"step": self.step}

  def restore(self, state):
    self.step = state["step"]


class _Stage:
  name = "toy"
  progress_keys = ("loss",)

  def __init__(self, signal_at=None, nan_from=None):
    self.signal_at, self.nan_from = signal_at, nan_from

  def create(self, rngs):
    return _Container(rngs)

  def constants(self):
    return {}

  def phase(self, step):
    return None

  def train_step(self, container, constants, batch, key, step, phase):
    def loss_fn(model):
      error = model(batch["x"]) - batch["y"]
      loss = jnp.mean(error**2) + 0.0 * jax.random.normal(key)
      if self.nan_from is not None:
        loss = jnp.where(step >= self.nan_from, jnp.nan, loss)
      return loss
    loss, grads = nnx.value_and_grad(loss_fn)(container.model)
    container.optimizer.update(container.model, grads)
    return {"loss": loss}

  def eval_step(self, container, constants, batch):
    error = container.model(batch["x"]) - batch["y"]
    return {"mse": jnp.sum(error**2), "count": jnp.float32(error.size)}

  def finalize_eval(self, totals):
    return {"mse": float(totals["mse"] / totals["count"])}

  def summarize(self, container, constants, batch, step):
    return {"weights": np.zeros((4, 4, 3), np.uint8)}

  def train_iterator(self, process_index, process_count):
    return _Batches(self.signal_at)

  def eval_batches(self, process_index, process_count):
    batches = _Batches()
    return [next(batches) for _ in range(2)]


def _config(**overrides):
  values = dict(num_steps=6, log_every=1, checkpoint_every=2, eval_every=3, summary_every=3,
                mesh_shape=(1, 1, 1), asynchronous_checkpoints=False)
  values.update(overrides)
  return loop.LoopConfig(**values)


def _kernel(workdir):
  container, _, _, step = loop.load_trained(_Stage(), _config(), workdir)
  return np.asarray(container.model.kernel[...]), step


def test_preempted_run_resumes_exactly_where_it_stopped(tmp_path):
  straight = loop.run(_Stage(), _config(), str(tmp_path / "straight"))
  interrupted = str(tmp_path / "interrupted")
  with pytest.raises(SystemExit) as stop:
    loop.run(_Stage(signal_at=3), _config(), interrupted)
  assert stop.value.code == 143
  kernel, step = _kernel(interrupted)
  assert step == 4  # The step in flight finished, then the loop saved and stopped.
  resumed = loop.run(_Stage(), _config(), interrupted)
  np.testing.assert_array_equal(_kernel(interrupted)[0], _kernel(str(tmp_path / "straight"))[0])
  assert resumed == straight
  with open(os.path.join(interrupted, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["step"] == 6 and "train/loss" in metrics and "mse" in metrics
  assert os.listdir(os.path.join(interrupted, "images"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "nan")
  with pytest.raises(loop.NonFiniteLossError, match="checkpoint of step 4 is intact"):
    loop.run(_Stage(nan_from=4), _config(), workdir)
  kernel, step = _kernel(workdir)
  assert step == 4 and np.isfinite(kernel).all()


def test_a_finished_stage_is_not_trained_again(tmp_path):
  workdir = str(tmp_path / "done")
  first = loop.run(_Stage(), _config(), workdir)
  assert loop.run(_Stage(nan_from=0), _config(), workdir) == first


class _RowsStage:
  """Eval batches of 8 examples with a padded tail; per-example rows beside a sum."""

  name = "rows"

  def __init__(self):
    self.totals = None

  def eval_batches(self, process_index, process_count):
    for start, num_valid in ((0, 8), (8, 8), (16, 3)):
      index = np.arange(start, start + 8, dtype=np.int32)
      yield {"index": index, "valid": np.arange(8) < num_valid}

  def finalize_eval(self, totals):
    self.totals = totals
    return {}


def test_eval_rows_are_the_valid_examples_in_order_up_to_the_cap():
  """Outputs under loop.ROWS_PREFIX are per-example rows: gathered from the 8 devices the
  batch is split over, kept only for valid examples, concatenated in order, capped."""
  mesh = parallel.make_mesh((-1, 1, 1))
  assert mesh.devices.size == 8

  @jax.jit
  def eval_batch(batch):
    index = batch["index"].astype(jnp.float32)
    return {"count": jnp.sum(batch["valid"].astype(jnp.float32)),
            loop.ROWS_PREFIX + "features": jnp.stack([index, -index], axis=1)}

  for max_rows, expected in ((None, 19), (12, 12), (100, 19), (0, 0)):
    stage = _RowsStage()
    with jax.set_mesh(mesh):
      loop.evaluate_batches(stage, eval_batch, mesh, max_rows=max_rows)
    assert float(stage.totals["count"]) == 19  # sums still see every example
    rows = stage.totals[loop.ROWS_PREFIX + "features"]
    assert rows.shape == (expected, 2)
    np.testing.assert_array_equal(rows[:, 0], np.arange(expected))
    np.testing.assert_array_equal(rows[:, 1], -np.arange(expected))
