"""rvq_jax.tools.aot_check: the loop's train step compiles for a target mesh from abstract
inputs, and the per-device memory and FLOPs it reports behave as sizes should."""
import json
import os
import subprocess
import sys

import jax
import pytest

from rvq_jax import config as config_lib
from rvq_jax.tools import aot_check
from tests import tiny_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  config = tiny_configs.tiny_config()
  # GAN from step 1, so the default steps (first, last) give two phases.
  config.tokenizer.loss.disc_start = 1
  config_lib.validate(config)
  return config


def test_parse_mesh():
  axes = ("data", "fsdp", "model")
  assert aot_check.parse_mesh("data=4,fsdp=2", axes) == (4, 2, 1)
  assert aot_check.parse_mesh("model=2", axes) == (1, 1, 2)
  with pytest.raises(ValueError, match="use axis=size"):
    aot_check.parse_mesh("dp=4", axes)


def test_tokenizer_step_compiles_on_8_devices_and_a_bigger_batch_needs_more():
  config = tiny_config()
  small = aot_check.check(config, mesh_shape=(4, 2, 1), batch_size=8)
  big = aot_check.check(config, mesh_shape=(4, 2, 1), batch_size=32, steps=[0])
  assert [r.phase for r in small] == ["False", "True"]  # Before and after the GAN starts.
  for report in small + big:
    assert report.num_devices == 8 and report.mesh == {"data": 4, "fsdp": 2, "model": 1}
    for name in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "flops"):
      assert getattr(report, name) > 0, (name, report)
    assert report.total_bytes >= report.argument_bytes
    assert "per device" in "\n".join(report.lines())
  for s, b in zip(small, big):
    assert b.temp_bytes > s.temp_bytes, (s, b)
    assert b.flops > s.flops
    # The state (arguments less the batch) does not grow with the batch.
    batch_bytes = lambda r: r.global_batch * 16 * 16 * 3 * 4 // r.num_devices
    assert abs((b.argument_bytes - batch_bytes(b)) - (s.argument_bytes - batch_bytes(s))) < 4096
  # The GAN phase runs the discriminator on top: more work.
  assert small[1].flops > small[0].flops


def test_command_line_simulates_more_devices_than_exist(tmp_path):
  """16 devices for the mesh; the tool asks XLA for them before JAX starts."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(PYTHONPATH=REPO, JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  output = tmp_path / "aot.json"
  result = subprocess.run(
      [sys.executable, "-m", "rvq_jax.tools.aot_check", "--config=configs/demo.py",
       "--mesh=data=8,fsdp=2", "--batch_size=16", "--steps=0", f"--json={output}"],
      env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "on 16 simulated cpu devices" in result.stdout, result.stdout
  assert "per device: arguments" in result.stdout and "FLOPs per device" in result.stdout
  (report,) = json.loads(output.read_text())
  assert report["num_devices"] == 16 and report["global_batch"] == 16
  assert report["temp_bytes"] > 0 and report["flops"] > 0
  assert jax.device_count() == 8  # This process is untouched.


def test_each_remat_and_dtype_setting_compiles_and_the_table_says_what_fits():
  config = tiny_config()
  reports = []
  for remat, dtype in (("none", "float32"), ("full", "bfloat16")):
    setting = aot_check.with_settings(config, "tokenizer", remat=remat, dtype=dtype)
    reports += aot_check.check(setting, mesh_shape=(4, 2, 1), batch_size=8, steps=[1])
  assert [(r.remat, r.dtype) for r in reports] == [("none", "float32"), ("full", "bfloat16")]
  assert config.tokenizer.model.remat == "none"  # The caller's config is left alone.
  # Recomputing each block in the backward pass costs FLOPs.
  assert reports[1].flops > reports[0].flops
  table = aot_check.memory_table(reports).splitlines()
  assert "fits v5e (16 GiB)" in table[0] and "fits v5p (95 GiB)" in table[0]
  assert len(table) == 4 and "| full | bfloat16 |" in table[3] and table[3].endswith("yes | yes |")
  with pytest.raises(ValueError, match="tokenizer.model.remat='some'"):
    aot_check.with_settings(config, "tokenizer", remat="some")
