"""What every benchmark records next to its numbers: the machine and the code under test."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
from typing import Any

import jax
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def usable_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _total_memory_bytes() -> int | None:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return None


def _git_state() -> dict[str, Any] | None:
  """The commit of the code under test, and which of its files differ from it."""
  try:
    def git(*cmd):
      return subprocess.run(["git", "-C", _REPO, *cmd], capture_output=True, text=True,
                            check=True, timeout=30).stdout
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "uncommitted_in_rvq_jax": [line[3:] for line in
                                   git("status", "--porcelain", "--", "rvq_jax").splitlines()],
    }
  except (OSError, subprocess.SubprocessError):
    return None


def environment(**extra_packages: str) -> dict[str, Any]:
  """The device, host, library versions and git state; `extra_packages` maps a JSON key
  to a distribution name whose version to record as well."""
  device = jax.devices()[0]
  return {
      "backend": jax.default_backend(),
      "device": str(device),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "description": (f"{device.device_kind} ({jax.default_backend()}), host CPU "
                      f"{_cpu_model()}, {usable_cores()} usable cores"),
      "cpu_model": _cpu_model(),
      "usable_cores": usable_cores(),
      "total_memory_bytes": _total_memory_bytes(),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "numpy": np.__version__,
      **{key: _version(package) for key, package in extra_packages.items()},
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
      "jax_default_prng_impl": str(jax.config.jax_default_prng_impl),
      "git": _git_state(),
  }


def load_config(name: str, arg: str | None = None):
  """`configs/<name>.py`'s `get_config(arg)` (loaded by path: configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"_config_{name}",
                                                os.path.join(_REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def write_generated_section(path: str, section: str, *, begin: str, end: str,
                            title: str) -> None:
  """Puts `section` (which starts with `begin` and ends with `end`) into the doc at `path`
  in place of the text between those markers, keeping what is written around them (a
  new doc gets `title` as its heading). Written through a temporary file, so an
  interrupted run never leaves half a doc."""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
    if begin in text and end in text:
      head, rest = text.split(begin, 1)
      text = head + section + rest.split(end, 1)[1]
    else:
      text = text.rstrip() + "\n\n" + section + "\n"
  else:
    text = f"# {title}\n\n{section}\n"
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)
