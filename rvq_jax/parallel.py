"""The device mesh and the mapping of logical parameter axes onto it.

One mesh per run, axes ('data', 'fsdp', 'model') by default. Parameters carry logical
axis names (see `rvq_jax.models.layers.partitioning`); rules map each name to mesh axes.
A dimension that the mapped mesh axes do not divide evenly is replicated instead, so a
small layer never makes a configuration unshardable. Batches split over ('data', 'fsdp').

`initialize_distributed` joins a multi-process job (TPU pods, or the RVQ_JAX_* variables)
before anything touches the devices.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from typing import Any
from typing import Sequence

import jax
from absl import logging
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# Logical name → mesh axis (or axes). Names not listed are replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("conv_out", "fsdp"),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills the single −1 entry with the remaining devices; checks the product.

  A shape without −1 may use fewer devices than are present (the first ones), which is
  how a run is pinned to part of a machine; it may not use more.
  """
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}.")
  known = math.prod(s for s in shape if s != -1)
  if known <= 0 or (-1 in shape and num_devices % known):
    raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices.")
  resolved = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(resolved) > num_devices:
    raise ValueError(f"mesh shape {resolved} needs {math.prod(resolved)} devices, but only "
                     f"{num_devices} are present.")
  return resolved


def make_mesh(shape: Sequence[int] = (-1, 1, 1),
              axes: Sequence[str] = DEFAULT_MESH_AXES,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all (or the given) devices; axes use automatic sharding propagation."""
  chosen = devices is not None
  devices = jax.devices() if devices is None else list(devices)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} and axes {tuple(axes)} differ in length.")
  resolved = resolve_mesh_shape(shape, len(devices))
  if not chosen and math.prod(resolved) < len(devices):
    # Allowed (a run pinned to part of a machine), but more often a mistake.
    logging.warning("mesh.shape=%s uses %d of the %d devices; %d stay idle. Set one axis "
                    "to -1 to use them all.", tuple(shape), math.prod(resolved),
                    len(devices), len(devices) - math.prod(resolved))
  devices = devices[:math.prod(resolved)]
  return jax.make_mesh(resolved, tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)


def logical_to_mesh_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                         rules=DEFAULT_RULES) -> P:
  """PartitionSpec for one array from its logical axis names."""
  rule_map = dict(rules)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    target = rule_map.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a in mesh.shape and a not in used)
    mesh_size = math.prod(mesh.shape[a] for a in axes)
    if not axes or mesh_size == 1 or size % mesh_size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def state_shardings(state: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """NamedShardings for an nnx State (or abstract state) from its logical-axis metadata."""

  def one(variable):
    names = variable.get_metadata().get("out_sharding") or variable.get_metadata().get(
        "sharding_names")
    shape = variable.shape if hasattr(variable, "shape") else variable[...].shape
    if not names:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_mesh_spec(names, shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rank: int = 1) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel mesh axes present in `mesh`."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(axes, *([None] * (rank - 1))))


class DistributedInitError(RuntimeError):
  """This process could not join the multi-process job (raised before any hang)."""


_DISTRIBUTED_ENV_HELP = (
    "Multi-process settings: RVQ_JAX_COORDINATOR=host:port (process 0's address, reachable "
    "from every process; process 0 listens there), RVQ_JAX_NUM_PROCESSES (N), "
    "RVQ_JAX_PROCESS_ID (0 … N−1, a different one per process), RVQ_JAX_INIT_TIMEOUT "
    "(seconds to wait, default 300). On Cloud TPU VMs or SLURM set RVQ_JAX_INIT=1 instead "
    "and JAX reads the topology from the environment.")


def _env_int(name: str) -> int:
  value = os.environ.get(name)
  if value is None or not value.strip().lstrip("-").isdigit():
    raise DistributedInitError(
        f"RVQ_JAX_COORDINATOR is set, so {name} must be an integer, got {value!r}. "
        + _DISTRIBUTED_ENV_HELP)
  return int(value)


def _wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once `address` accepts TCP connections; raises after `timeout` seconds.

  jax.distributed.initialize does not raise when the coordinator is unreachable: after
  its deadline the runtime aborts the process with a bare DEADLINE_EXCEEDED. Probing the
  port first turns the commonest mistake (wrong address, process 0 not started, a
  firewall) into an error that names the address.
  """
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedInitError(
        f"RVQ_JAX_COORDINATOR={address!r} is not host:port. " + _DISTRIBUTED_ENV_HELP)
  host = host.strip("[]")  # IPv6 literals are written [::1]:port.
  deadline = time.monotonic() + timeout
  while True:
    remaining = deadline - time.monotonic()
    try:
      with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, remaining))):
        return
    except OSError as error:
      if remaining <= 0:
        raise DistributedInitError(
            f"cannot reach the coordinator at {address} (RVQ_JAX_COORDINATOR) within "
            f"{timeout:g} s (RVQ_JAX_INIT_TIMEOUT): {error}. Is process 0 running, on that "
            "host and port, and is the port open between the machines? "
            + _DISTRIBUTED_ENV_HELP) from None
    time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))


def initialize_distributed() -> None:
  """Joins a multi-process job when one is configured (TPU pods, or RVQ_JAX_COORDINATOR).

  Call it before anything touches the devices (`python -m rvq_jax.main` does). Fails
  within RVQ_JAX_INIT_TIMEOUT seconds with a DistributedInitError naming the coordinator
  and the environment variables, rather than hanging or aborting without one.
  """
  coordinator = os.environ.get("RVQ_JAX_COORDINATOR")
  auto = bool(os.environ.get("RVQ_JAX_INIT"))
  if not coordinator and not auto:
    return
  timeout = float(os.environ.get("RVQ_JAX_INIT_TIMEOUT", "300"))
  deadline = time.monotonic() + timeout
  if coordinator:
    num_processes = _env_int("RVQ_JAX_NUM_PROCESSES")
    process_id = _env_int("RVQ_JAX_PROCESS_ID")
    if not 0 <= process_id < num_processes:
      raise DistributedInitError(
          f"RVQ_JAX_PROCESS_ID={process_id} must lie in [0, RVQ_JAX_NUM_PROCESSES="
          f"{num_processes}). " + _DISTRIBUTED_ENV_HELP)
    if process_id != 0:
      _wait_for_coordinator(coordinator, timeout)
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
    who = f"process {process_id} of {num_processes}, coordinator {coordinator}"
  else:
    # Cloud TPU / SLURM / Open MPI: the topology comes from the environment.
    kwargs = {}
    who = "auto-detected cluster (RVQ_JAX_INIT=1)"

  def give_up():
    # The coordinator was reachable but not every process registered in time; the
    # runtime would abort later with only DEADLINE_EXCEEDED, so say what to check first.
    print(f"rvq_jax: error: the multi-process job did not start within {timeout:g} s "
          f"(RVQ_JAX_INIT_TIMEOUT) for {who}: not every process joined. Start all "
          "processes with the same coordinator and process count and distinct process "
          "ids. " + _DISTRIBUTED_ENV_HELP, file=sys.stderr, flush=True)
    os._exit(4)  # pylint: disable=protected-access

  # One budget for probing and joining, so the whole start-up is bounded by the timeout.
  remaining = max(1, int(deadline - time.monotonic()))
  watchdog = threading.Timer(remaining + 1.0, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(initialization_timeout=remaining, **kwargs)
  except (RuntimeError, ValueError) as error:
    raise DistributedInitError(
        f"jax.distributed.initialize failed for {who}: {error}. "
        + _DISTRIBUTED_ENV_HELP) from error
  finally:
    watchdog.cancel()
