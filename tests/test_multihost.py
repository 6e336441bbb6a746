"""Multi-process training on one machine: 2 processes × 4 CPU devices vs 1 × 8.

Each process is `tests/_multihost_worker.py`, joined through the same
`parallel.initialize_distributed` as `python -m rvq_jax.main` (coordinator
127.0.0.1:<free port>, gloo collectives). The two set-ups train the same tiny tokenizer
on the same mesh (data=4, fsdp=2) and global batch; the test checks that they agree,
that the processes split every global batch between them, that they write one
checkpoint together and both resume from it, and that a mis-sharded input (both
processes reading process 0's slice) is caught by the same checks; that a step which
neither saves nor evaluates makes no host-synchronizing call; and that a SIGTERM reaching
one process only makes both save once, at the same step, and exit 143. A start-up that
cannot reach its coordinator fails with a clear message within RVQ_JAX_INIT_TIMEOUT.

Every subprocess has a timeout, so a hang fails the test instead of stalling CI.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.multihost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "_multihost_worker.py")
# Per launch (all processes together). Generous: CI machines are shared and slow.
LAUNCH_TIMEOUT = int(os.environ.get("RVQ_JAX_MULTIHOST_TIMEOUT", "420"))
DISTRIBUTED_ENV = ("RVQ_JAX_COORDINATOR", "RVQ_JAX_NUM_PROCESSES", "RVQ_JAX_PROCESS_ID",
                   "RVQ_JAX_INIT", "RVQ_JAX_INIT_TIMEOUT")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _base_env() -> dict:
  env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
  # The session's compilation cache (tests/conftest.py), so repeated launches compile once.
  env["RVQ_JAX_TEST_COMPILATION_CACHE"] = jax.config.jax_compilation_cache_dir
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _tail(path: str, lines: int = 40) -> str:
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def launch(tmp_path, name, *, processes, devices, workdir, num_steps, data_process=None,
           sigterm_at=None, expect_code=0):
  """Runs `processes` workers to completion; returns their records, by process index.

  `sigterm_at=S`: process 1 sends itself SIGTERM before loading the batch of step S + 1.
  Every process must exit with `expect_code` (143: stopped for a preemption)."""
  port = _free_port()
  procs, logs, records = [], [], []
  for pid in range(processes):
    env = _base_env()
    if processes > 1:
      env.update(RVQ_JAX_COORDINATOR=f"127.0.0.1:{port}", RVQ_JAX_NUM_PROCESSES=str(processes),
                 RVQ_JAX_PROCESS_ID=str(pid), RVQ_JAX_INIT_TIMEOUT="120")
    records.append(str(tmp_path / f"{name}_p{pid}.json"))
    logs.append(str(tmp_path / f"{name}_p{pid}.log"))
    command = [sys.executable, WORKER, f"--devices={devices}", f"--workdir={workdir}",
               f"--num_steps={num_steps}", f"--record={records[-1]}"]
    if data_process is not None:
      command.append(f"--data_process={data_process}")
    if sigterm_at is not None:
      command += [f"--sigterm_at={sigterm_at}", "--sigterm_process=1"]
    with open(logs[-1], "w") as log:
      procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=REPO))
  deadline = time.monotonic() + LAUNCH_TIMEOUT
  # Poll all: once one process fails the others would wait for it in a collective.
  while any(proc.poll() is None for proc in procs):
    failed = any(proc.poll() not in (None, expect_code) for proc in procs)
    if failed or time.monotonic() > deadline:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
      for proc in procs:
        proc.wait()
      if not failed:
        pytest.fail(f"{name}: timed out after {LAUNCH_TIMEOUT} s; logs:\n"
                    + "\n".join(f"--- {log}\n{_tail(log)}" for log in logs))
      break
    time.sleep(0.5)
  failed = [(pid, proc.returncode) for pid, proc in enumerate(procs)
            if proc.returncode != expect_code]
  if failed:
    pytest.fail(f"{name}: processes exited with {failed}; logs:\n"
                + "\n".join(f"--- {log}\n{_tail(log)}" for log in logs))
  result = []
  for path in records:
    with open(path) as f:
      result.append(json.load(f))
  assert [r["process_index"] for r in result] == list(range(processes))
  assert all(r["device_count"] == 8 and r["process_count"] == processes for r in result)
  assert all(r["exit_code"] == expect_code for r in result)
  return result


def check_data_split(records) -> None:
  """Each process loaded a disjoint slice of every global batch; together exactly it.

  Raises AssertionError naming the first step where that fails.
  """
  count = len(records)
  for step in records[0]["global"]:
    want = records[0]["global"][step]
    assert all(r["global"][step] == want for r in records), f"step {step}: global orders differ"
    slices = [r["local"][step] for r in records]
    assert all(len(s) * count == len(want) for s in slices), f"step {step}: slice sizes"
    seen = [index for s in slices for index in s]
    assert len(set(seen)) == len(seen), f"step {step}: processes loaded the same examples"
    # Process p's rows are rows p·B/P … of the global batch: the order the global array
    # is assembled in (to_global_array), so the union is the batch, row for row.
    assert seen == want, f"step {step}: the slices {slices} are not the global batch {want}"


def _losses(*records) -> dict[int, float]:
  losses = {}
  for record in records:
    losses.update({int(step): value for step, value in record["loss"].items()})
  return losses


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("multihost")
  out = {"reference": launch(tmp, "reference", processes=1, devices=8,
                             workdir=str(tmp / "reference"), num_steps=3)}
  shared = tmp / "two_processes"
  out["first"] = launch(tmp, "first", processes=2, devices=4, workdir=str(shared), num_steps=2)
  checkpoints = shared / "checkpoints"
  out["after_first"] = {step: sorted(os.listdir(checkpoints / step / "state"))
                        for step in os.listdir(checkpoints) if step.isdigit()}
  out["resumed"] = launch(tmp, "resumed", processes=2, devices=4, workdir=str(shared),
                          num_steps=3)
  out["after_resume"] = sorted(s for s in os.listdir(checkpoints) if s.isdigit())
  out["shared"] = shared
  out["mis_sharded"] = launch(tmp, "mis_sharded", processes=2, devices=4,
                              workdir=str(tmp / "mis_sharded"), num_steps=1, data_process=0)
  return out


def test_two_processes_train_like_one(runs):
  reference = _losses(*runs["reference"])
  for pid in range(2):
    two = _losses(runs["first"][pid], runs["resumed"][pid])
    assert sorted(two) == sorted(reference) == [1, 2, 3]
    for step in reference:
      np.testing.assert_allclose(two[step], reference[step], rtol=1e-5,
                                 err_msg=f"process {pid}, step {step}")


def test_each_process_reads_a_disjoint_slice_and_together_the_batch(runs):
  for name in ("first", "resumed"):
    check_data_split(runs[name])
  # The single process read whole batches: the same global order.
  single = runs["reference"][0]
  for name in ("first", "resumed"):
    for step, want in runs[name][0]["global"].items():
      assert single["local"][step] == want


def test_eval_rows_are_gathered_from_both_processes_in_order(runs):
  """Per-example eval rows (loop.ROWS_PREFIX): each process holds half of every eval
  batch, yet both finalize with the single process's rows, in order, capped at 6."""
  single = runs["reference"][0]["eval_rows"]
  assert len(single) == 6 and len(set(single)) == 6
  for name in ("first", "resumed"):
    for record in runs[name]:
      np.testing.assert_allclose(record["eval_rows"], single, rtol=1e-6, err_msg=name)


def test_one_checkpoint_written_together_and_resumed_by_both(runs):
  # The first run wrote one checkpoint (its last step); each process wrote its own shards.
  assert list(runs["after_first"]) == ["2"]
  state_files = runs["after_first"]["2"]
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(state_files), state_files
  # Both processes of the second run started from it and went on to step 3.
  assert [r["start_step"] for r in runs["resumed"]] == [2, 2]
  assert all(sorted(r["loss"]) == ["3"] for r in runs["resumed"])
  assert runs["after_resume"][-1] == "3"


def test_plain_steps_make_no_host_synchronization(runs):
  """A step that neither saves nor evaluates calls no host-synchronizing collective (the
  preemption check is a local look-up): a pod's hosts never wait for each other there.
  The first run's step 1 is such a step; its step 2 saves and evaluates."""
  for record in runs["first"]:
    assert record["host_syncs"].get("1", 0) == 0, record["host_syncs"]
    assert record["host_syncs"].get("2", 0) > 0, "the counting saw no collective at all"


def test_sigterm_on_one_process_saves_once_and_both_exit_143(tmp_path, runs):
  """A preemption notice reaching process 1 only: both processes save one checkpoint at
  the same step and exit 143; resuming from it gives the uninterrupted run's losses."""
  workdir = tmp_path / "preempted"
  stopped = launch(tmp_path, "preempted", processes=2, devices=4, workdir=str(workdir),
                   num_steps=3, sigterm_at=0, expect_code=143)
  checkpoints = workdir / "checkpoints"
  saved = sorted(os.listdir(checkpoints))
  assert len(saved) == 1 and saved[0].isdigit(), saved  # One save, none left half-written.
  at = int(saved[0])
  assert 1 <= at < 3, at
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(checkpoints / saved[0] /
                                                                  "state"))
  for record in stopped:
    assert sorted(int(step) for step in record["loss"]) == list(range(1, at + 1)), record
    assert all(record["host_syncs"].get(str(step), 0) == 0 for step in range(1, at))
  resumed = launch(tmp_path, "preempted_resumed", processes=2, devices=4,
                   workdir=str(workdir), num_steps=3)
  assert [r["start_step"] for r in resumed] == [at, at]
  reference = _losses(*runs["reference"])
  for pid in range(2):
    losses = _losses(stopped[pid], resumed[pid])
    assert sorted(losses) == [1, 2, 3]
    for step in reference:
      np.testing.assert_allclose(losses[step], reference[step], rtol=1e-5,
                                 err_msg=f"process {pid}, step {step}")
def test_the_export_is_written_together_and_holds_the_last_checkpoint(runs):
  """The finished stage's params-only export, written by both processes (parameters
  sharded over fsdp = 2 across them), holds the model of the last checkpoint."""
  from flax import nnx

  import rvq_jax
  from rvq_jax import parallel
  from rvq_jax.train import loop
  from rvq_jax.train.tokenizer_stage import TokenizerStage
  from tests._multihost_worker import tiny_config
  single = parallel.make_mesh((1, 1, 1), parallel.DEFAULT_MESH_AXES)
  tokenizer = rvq_jax.Tokenizer.load(runs["shared"], mesh=single)
  assert tokenizer.step == 3
  config = tiny_config(3, (1, 1, 1))
  container, *_ = loop.load_trained(TokenizerStage(config), loop.loop_config_from(config),
                                    str(runs["shared"]))
  exported = nnx.to_pure_dict(nnx.state(tokenizer.module))
  trained = nnx.to_pure_dict(nnx.state(container.model))
  assert jax.tree.structure(exported) == jax.tree.structure(trained)
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_mis_sharded_input_is_caught(runs):
  """Both processes read process 0's slice: the checks above must fail on it."""
  bad = runs["mis_sharded"]
  with pytest.raises(AssertionError, match="loaded the same examples"):
    check_data_split(bad)
  reference = _losses(*runs["reference"])[1]
  loss = _losses(bad[0])[1]
  assert not np.isclose(loss, reference, rtol=1e-5), (loss, reference)


@pytest.mark.parametrize("process_id", [1, 0])
def test_an_unreachable_coordinator_fails_clearly_within_the_timeout(tmp_path, process_id):
  """Process 1: nobody listens at the coordinator's port. Process 0: it is the
  coordinator, but the other process never joins. Both must stop with a message naming
  the address and the settings, not hang (or abort with a bare DEADLINE_EXCEEDED)."""
  timeout = 10
  address = f"127.0.0.1:{_free_port()}"
  env = _base_env()
  env.update(JAX_PLATFORMS="cpu", RVQ_JAX_COORDINATOR=address, RVQ_JAX_NUM_PROCESSES="2",
             RVQ_JAX_PROCESS_ID=str(process_id), RVQ_JAX_INIT_TIMEOUT=str(timeout))
  start = time.monotonic()
  result = subprocess.run(
      [sys.executable, "-m", "rvq_jax.main", "--config=configs/demo.py",
       f"--workdir={tmp_path / 'run'}"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
  elapsed = time.monotonic() - start
  assert result.returncode == 4, result.stderr[-3000:]
  assert address in result.stderr and "RVQ_JAX_COORDINATOR" in result.stderr, result.stderr
  assert "RVQ_JAX_INIT_TIMEOUT" in result.stderr
  assert elapsed >= timeout - 1  # It waited for the coordinator, as long as it was told.
  # Bounded: the timeout plus start-up (imports on a busy CI machine), not the 300 s default.
  assert elapsed < timeout + 120, elapsed
  assert not os.path.exists(tmp_path / "run" / "tokenizer"), "it must stop before training"
