"""Damaged checkpoints, kills during a save, and workdirs that cannot be written.

On tests/test_loop.py's toy stage, whose batches are a function of the data position: a
run that resumes from a model of step s with the data position of another step ends with
other weights than an uninterrupted run, so equal weights show a consistent restore.
"""
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rvq_jax import files
from rvq_jax.train import checkpoint as checkpoint_lib
from rvq_jax.train import loop
from tests.test_loop import _Batches
from tests.test_loop import _config
from tests.test_loop import _kernel
from tests.test_loop import _Stage

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


class _Recording(_Stage):
  """The toy stage, remembering the data positions its iterators were restored to."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.restored = []

  def train_iterator(self, process_index, process_count):
    stage = self

    class Iterator(_Batches):
      def restore(self, state):
        stage.restored.append(dict(state))
        super().restore(state)

    return Iterator(self.signal_at)


def _truncate_arrays(step_dir):
  # OCDBT keeps the array bytes in files under state/**/d/.
  paths = [p for p in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(p)]
  assert paths, os.listdir(os.path.join(step_dir, "state"))
  for path in paths:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _break_progress_json(step_dir):
  paths = [p for p in glob.glob(os.path.join(step_dir, "progress", "*"))
           if not p.endswith("commit_success.txt")]
  assert len(paths) == 1, paths
  with open(paths[0]) as f:
    assert json.load(f) == {"step": 6}
  with open(paths[0], "w") as f:
    f.write('{"step" 6}')


def _delete_manifest(step_dir):
  path = os.path.join(step_dir, "state", "manifest.ocdbt")
  assert os.path.isfile(path)
  os.remove(path)


def _delete_item(step_dir):
  shutil.rmtree(os.path.join(step_dir, "data"))


DAMAGE = {"truncated_arrays": (_truncate_arrays, "OUT_OF_RANGE"),
          "broken_progress_json": (_break_progress_json, "JSONDecodeError"),
          "deleted_manifest": (_delete_manifest, "NOT_FOUND"),
          "deleted_data_item": (_delete_item, "not found")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """Weights and metrics of an uninterrupted 8-step run."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  metrics = loop.run(_Stage(), _config(num_steps=8), workdir)
  return _kernel(workdir)[0], metrics


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, straight,
                                                                     damage):
  damage_fn, reason = DAMAGE[damage]
  workdir = str(tmp_path / "run")
  loop.run(_Stage(), _config(num_steps=6), workdir)  # Checkpoints 2, 4 and 6.
  checkpoints = os.path.join(workdir, "checkpoints")
  damage_fn(os.path.join(checkpoints, "6"))

  # Inference skips it too, and leaves the directory as it is.
  with caplog.at_level(logging.WARNING):
    assert _kernel(workdir)[1] == 4
  assert sorted(os.listdir(checkpoints)) == ["2", "4", "6"]

  caplog.clear()
  stage = _Recording()
  with caplog.at_level(logging.WARNING):
    metrics = loop.run(stage, _config(num_steps=8), workdir)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  named = [w for w in warnings if os.path.join(checkpoints, "6") in w and "cannot be restored" in w]
  assert named and reason in named[0], warnings
  # The model, the data position and the step all came from step 4 ...
  assert stage.restored == [{"step": 4}]
  # ... so training on gives the uninterrupted run's weights and metrics.
  np.testing.assert_array_equal(_kernel(workdir)[0], straight[0])
  assert metrics == straight[1]
  # The damaged step is kept aside, and step 6 was saved again.
  moved = [name for name in os.listdir(checkpoints) if name.startswith("6.damaged-")]
  assert len(moved) == 1 and {"6", "8"} <= set(os.listdir(checkpoints))


def _break_progress_json_any(step_dir):
  path, = (p for p in glob.glob(os.path.join(step_dir, "progress", "*"))
           if not p.endswith("commit_success.txt"))
  with open(path, "w") as f:
    f.write("{")


def test_when_no_checkpoint_restores_the_run_stops_and_touches_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  loop.run(_Stage(), _config(num_steps=6), workdir)
  os.remove(os.path.join(workdir, "metrics.json"))
  checkpoints = os.path.join(workdir, "checkpoints")
  for step in ("2", "4", "6"):
    _break_progress_json_any(os.path.join(checkpoints, step))
  before = sorted(os.listdir(checkpoints))
  with pytest.raises(checkpoint_lib.NoUsableCheckpointError) as error:
    loop.run(_Stage(), _config(num_steps=8), workdir)
  message = str(error.value)
  assert checkpoints in message and "new --workdir" in message
  assert all(f"step {s}: JSONDecodeError" in message for s in (2, 4, 6))
  assert sorted(os.listdir(checkpoints)) == before  # Nothing moved, nothing new.
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))
  with pytest.raises(checkpoint_lib.NoUsableCheckpointError):
    _kernel(workdir)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_restorable(tmp_path):
  """SIGKILL while orbax commits the checkpoint of step 4, keeping only 1 checkpoint:
  retention must not have deleted step 2 yet, and the half-written step 4 is ignored."""
  workdir, marker = str(tmp_path / "run"), str(tmp_path / "committing")
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
  child = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "_killed_during_save.py"), workdir, "4",
       marker], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 300
    while not os.path.exists(marker):
      assert child.poll() is None, child.communicate()[0][-3000:]
      assert time.monotonic() < deadline, "the save of step 4 never started committing"
      time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
  finally:
    child.kill()
    child.communicate()
  checkpoints = os.path.join(workdir, "checkpoints")
  names = sorted(os.listdir(checkpoints))
  assert "2" in names and "4" not in names, names
  assert any(name.startswith("4.orbax-checkpoint-tmp") for name in names), names
  assert _kernel(workdir)[1] == 2

  stage = _Recording()
  loop.run(stage, _config(num_steps=8, keep_checkpoints=1), workdir)
  assert stage.restored == [{"step": 2}]
  reference = str(tmp_path / "straight")
  loop.run(_Stage(), _config(num_steps=8), reference)
  np.testing.assert_array_equal(_kernel(workdir)[0], _kernel(reference)[0])
  assert not [n for n in os.listdir(checkpoints) if "orbax-checkpoint-tmp" in n]


def test_sigterm_during_an_asynchronous_save_still_ends_with_a_restorable_checkpoint(
    tmp_path, monkeypatch):
  saving = checkpoint_lib.Checkpointer.save

  def save_then_sigterm(self, step, *args, **kwargs):
    saving(self, step, *args, **kwargs)  # Returns while the write goes on in the background.
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", save_then_sigterm)
  workdir = str(tmp_path / "run")
  with pytest.raises(SystemExit) as stop:
    loop.run(_Stage(), _config(num_steps=8, asynchronous_checkpoints=True), workdir)
  assert stop.value.code == 143
  assert 2 <= _kernel(workdir)[1] < 8
  monkeypatch.setattr(checkpoint_lib.Checkpointer, "save", saving)
  loop.run(_Stage(), _config(num_steps=8), workdir)
  reference = str(tmp_path / "straight")
  loop.run(_Stage(), _config(num_steps=8), reference)
  np.testing.assert_array_equal(_kernel(workdir)[0], _kernel(reference)[0])


# ---------------------------------------------------------------- unwritable workdirs


class _MustNotBuild(_Stage):
  def create(self, rngs):
    raise AssertionError("the stage was built although the workdir cannot be written")


@pytest.mark.parametrize("workdir", ["/proc/foo", "{tmp}/a_file/run"])
def test_an_unwritable_workdir_is_refused_before_anything_is_built(tmp_path, workdir):
  (tmp_path / "a_file").write_text("")
  workdir = workdir.format(tmp=tmp_path)
  with pytest.raises(files.UnwritableDirectoryError,
                     match=f"workdir {re.escape(workdir)} cannot be written"):
    loop.run(_MustNotBuild(), _config(), workdir)


def test_a_read_only_workdir_is_refused_and_its_checkpoints_kept(tmp_path):
  """A read-only file system (as root, permission bits do not stop writes, so the file
  system's answer is simulated through epath, as a read-only mount would give it)."""
  import errno

  from etils.epath import testing

  workdir = str(tmp_path / "run")
  loop.run(_Stage(), _config(num_steps=2), workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))

  def read_only(original, path, *args, **kwargs):
    if os.fspath(path).startswith(workdir):
      raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
    return original(path, *args, **kwargs)

  with testing.mock_epath(open=read_only, makedirs=read_only, mkdir=read_only):
    with pytest.raises(files.UnwritableDirectoryError,
                       match=f"workdir {re.escape(workdir)} cannot be written .*Read-only"):
      loop.run(_MustNotBuild(), _config(num_steps=4), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_main_names_an_unwritable_workdir_in_one_line_and_exits_2():
  result = subprocess.run(
      [sys.executable, "-m", "rvq_jax.main", "--config=configs/demo.py", "--workdir=/proc/foo"],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("rvq_jax: error:")]
  assert errors == [errors[0]] and "--workdir /proc/foo cannot be written" in errors[0]
  assert "Traceback" not in result.stderr


def test_an_unreadable_metrics_json_counts_as_not_finished(tmp_path, caplog):
  from rvq_jax.train import stages
  (tmp_path / "metrics.json").write_text('{"step": 6, "psnr"')  # Cut short.
  with caplog.at_level(logging.WARNING):
    assert stages.finished_step(str(tmp_path)) is None
  assert any(str(tmp_path / "metrics.json") in r.getMessage() for r in caplog.records)
  (tmp_path / "metrics.json").write_text('{"step": 6}')
  assert stages.finished_step(str(tmp_path)) == 6
