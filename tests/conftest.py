"""Test-wide JAX setup: 8 simulated CPU devices and fast compiles.

This runs before any test module imports JAX's backend, so every test sees the same
8-device CPU platform that the sharding tests need.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402

# Tests check math, not XLA's optimizations; skipping them roughly halves compile time.
jax.config.update("jax_disable_most_optimizations", True)

# Tests train the same tiny programs several times (straight vs resumed runs, modes that
# reload a checkpoint); a compilation cache shared by the session compiles each once.
import tempfile  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("RVQ_JAX_TEST_COMPILATION_CACHE",
                                 os.path.join(tempfile.gettempdir(), "rvq_jax_test_xla_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def reference_passes(monkeypatch):
  """The passes over a data split that reference statistics make (fid._reference_batches
  calls, their arguments), recorded to tell a computed reference from a cached one."""
  from rvq_jax.metrics import fid as fid_lib  # pylint: disable=g-import-not-at-top
  passes = []
  original = fid_lib._reference_batches  # noqa: SLF001  (the pass under test)

  def counting(*args, **kwargs):
    passes.append(args)
    return original(*args, **kwargs)

  monkeypatch.setattr(fid_lib, "_reference_batches", counting)
  return passes
