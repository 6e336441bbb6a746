"""The device mesh and the mapping of logical parameter axes onto it.

One mesh per run, axes ('data', 'fsdp', 'model') by default. Parameters carry logical
axis names (see `rvq_jax.models.layers.partitioning`); rules map each name to mesh axes.
A dimension that the mapped mesh axes do not divide evenly is replicated instead, so a
small layer never makes a configuration unshardable. Batches split over ('data', 'fsdp').
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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
  devices = jax.devices() if devices is None else list(devices)
  if len(shape) != len(axes):
    raise ValueError(f"mesh shape {tuple(shape)} and axes {tuple(axes)} differ in length.")
  resolved = resolve_mesh_shape(shape, len(devices))
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
