"""The code keeps the style pyproject.toml states (ruff: pyflakes, pycodestyle, bugbear,
pyupgrade, import order)."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is not installed")
def test_ruff_finds_nothing():
  result = subprocess.run(["ruff", "check", "--no-cache", "rvq_jax", "benchmarks", "tests",
                           "configs"], cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
