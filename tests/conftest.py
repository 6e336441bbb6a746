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

# Tests check math, not XLA's optimizations; skipping them roughly halves compile time.
jax.config.update("jax_disable_most_optimizations", True)
