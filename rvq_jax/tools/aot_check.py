"""Compile a stage's train step for a target mesh before renting the hardware.

  python -m rvq_jax.tools.aot_check --config=configs/celebahq.py --mesh=data=4,fsdp=2
  python -m rvq_jax.tools.aot_check --config=configs/celebahq.py --mesh=data=16,fsdp=4 \\
      --batch_size=256 --json=aot.json
  python -m rvq_jax.tools.aot_check --config=configs/celebahq.py --mesh=data=8 \\
      --topology=v5e:2x4          # a TPU topology (needs libtpu; no TPU attached)
  python -m rvq_jax.tools.aot_check --config=configs/celebahq.py --mesh=data=4,fsdp=2 \\
      --steps=30001 --remat=none,blocks,full --dtype=float32,bfloat16 \\
      --markdown=memory.md        # one compile per setting, and a table of them

The step is the loop's own (`loop.prepare(...).train_step`: same shardings, same
donation), lowered with abstract inputs only (ShapeDtypeStructs carrying the shardings
of the state, batch, key and step: `Prepared.abstract_step_arguments`), so no parameter
or batch is allocated. By default the
target devices are simulated CPU devices, as many as the mesh needs, which this tool
asks XLA for before JAX starts: that checks that the program shards and compiles and
what it needs per device, on any machine. Per-device memory comes from XLA's buffer
assignment (`compiled.memory_analysis()`): arguments (state, batch), outputs, the part
of the outputs aliased to donated arguments, temporaries; FLOPs from
`compiled.cost_analysis()`. CPU numbers size the program, not a TPU's exact layout
(which pads and fuses differently): use `--topology` or `--platform=attached` on the
target for the real figures.

Every phase the stage compiles is checked: the phases of steps `--steps` (default: the
first and the last step, e.g. the tokenizer before and after its GAN starts). `--remat`
and `--dtype` (comma-separated) compile the step once for each combination of
`<stage>.model.remat` and `<stage>.model.dtype` (default: the config's), and the
report ends with a table of per-device temporaries and totals against the HBM of TPU
v5e (16 GiB) and v5p (95 GiB) chips (`--markdown` writes it to a file). XLA:CPU
expands the checkpoints' optimization barriers and schedules the recomputation early,
so on simulated CPU devices remat shows in the FLOPs but hardly in the temporaries;
`benchmarks/remat_residuals.py` (what JAX saves) and `--topology` (XLA:TPU) show its
effect (docs/results/memory.md).
Frozen pretrained networks are random (`weights.random`) unless
`--norandom_pretrained`: their shapes matter here, not their weights.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any
from typing import Hashable
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from rvq_jax import files

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with ':variant' (see configs/).", lock_config=False)
_STAGE = flags.DEFINE_string("stage", None, "Stage to compile (default: the config's first).")
_MESH = flags.DEFINE_string(
    "mesh", None, "Target mesh as axis=size pairs, e.g. 'data=4,fsdp=2'; axes left out "
    "have size 1 (default: the config's mesh over the attached devices).")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the stage's "
                              "train.batch_size).")
_STEPS = flags.DEFINE_list("steps", None, "Steps whose phases to compile (default: first, last).")
_PLATFORM = flags.DEFINE_enum(
    "platform", "cpu", ["cpu", "attached"],
    "cpu: simulated CPU devices, as many as the mesh needs; attached: the devices JAX finds.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology to compile for without the hardware, e.g. 'v5e:2x4' "
    "(jax.experimental.topologies; needs libtpu). Overrides --platform.")
_RANDOM_PRETRAINED = flags.DEFINE_bool(
    "random_pretrained", True, "Random frozen networks (no weight files needed).")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")
_REMAT = flags.DEFINE_list(
    "remat", None, "Rematerialization settings to compile, e.g. 'none,blocks,full' "
    "(<stage>.model.remat; default: the config's).")
_DTYPE = flags.DEFINE_list(
    "dtype", None, "Compute dtypes to compile, e.g. 'float32,bfloat16' (<stage>.model.dtype; "
    "default: the config's).")
_MARKDOWN = flags.DEFINE_string(
    "markdown", None, "Also write the per-setting memory table (markdown) to this file.")

# HBM per chip of the TPUs the table compares with.
CHIP_MEMORY_GIB = {"v5e": 16, "v5p": 95}
flags.mark_flags_as_required(["config"])


@dataclasses.dataclass
class StepReport:
  """What one compiled step needs per device."""

  stage: str
  phase: str
  mesh: dict
  platform: str
  num_devices: int
  global_batch: int
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  total_bytes: int   # arguments + outputs − aliased + temporaries: the live peak bound
  flops: float       # per device (the partitioned program)
  remat: str = "none"      # <stage>.model.remat
  dtype: str = "float32"   # <stage>.model.dtype (compute; parameters stay float32)

  def lines(self) -> list[str]:
    per_device = self.global_batch / max(1, self.num_devices)
    return [
        f"{self.stage} train step, phase {self.phase}, remat={self.remat}, "
        f"dtype={self.dtype}: mesh {self.mesh} on {self.num_devices} "
        f"{self.platform} devices, global batch {self.global_batch} ({per_device:g} per device)",
        "  per device: " + " | ".join(
            f"{name} {_gib(value)}" for name, value in (
                ("arguments", self.argument_bytes), ("outputs", self.output_bytes),
                ("aliased", self.alias_bytes), ("temporaries", self.temp_bytes),
                ("code", self.code_bytes), ("total", self.total_bytes))),
        f"  FLOPs per device per step: {self.flops:.4g} (all devices: "
        f"{self.flops * self.num_devices:.4g})",
    ]


def _gib(num_bytes: int) -> str:
  if num_bytes >= 2**30:
    return f"{num_bytes / 2**30:.2f} GiB"
  return f"{num_bytes / 2**20:.1f} MiB"


def fits(report: StepReport) -> dict[str, bool]:
  """Chip → whether the step's per-device total fits its HBM (`CHIP_MEMORY_GIB`)."""
  return {chip: report.total_bytes <= gib * 2**30 for chip, gib in CHIP_MEMORY_GIB.items()}


def memory_table(reports: Sequence[StepReport]) -> str:
  """A markdown table of per-device memory, one row per compiled step."""
  chips = list(CHIP_MEMORY_GIB)
  header = ["devices", "mesh", "global batch", "per device", "phase", "remat", "dtype",
            "temporaries (GiB)", "total (GiB)", "GFLOPs/device"] + [
                f"fits {chip} ({CHIP_MEMORY_GIB[chip]} GiB)" for chip in chips]
  rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in reports:
    mesh = "×".join(f"{name}={size}" for name, size in r.mesh.items() if size > 1) or "1"
    ok = fits(r)
    rows.append("| " + " | ".join([
        str(r.num_devices), mesh, str(r.global_batch), f"{r.global_batch / r.num_devices:g}",
        r.phase, r.remat, r.dtype, f"{r.temp_bytes / 2**30:.2f}",
        f"{r.total_bytes / 2**30:.2f}", f"{r.flops / 1e9:,.0f}"] + [
            "yes" if ok[chip] else "no" for chip in chips]) + " |")
  return "\n".join(rows)


def with_settings(config, stage_name: str, *, remat: str | None = None,
                  dtype: str | None = None):
  """A copy of `config` with `<stage>.model.remat` / `.dtype` set (None: unchanged)."""
  import copy  # pylint: disable=import-outside-toplevel

  from rvq_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  config = copy.deepcopy(config)
  model = config[stage_name].model
  if remat is not None:
    model.remat = remat
  if dtype is not None:
    model.dtype = dtype
  config_lib.validate(config)
  return config


def parse_mesh(spec: str, axes: Sequence[str]) -> tuple[int, ...]:
  """'data=4,fsdp=2' → (4, 2, 1) for axes (data, fsdp, model)."""
  sizes = {}
  for item in filter(None, (part.strip() for part in spec.split(","))):
    name, _, value = item.partition("=")
    if name not in axes or not value.isdigit() or int(value) < 1:
      raise ValueError(f"--mesh item {item!r}: use axis=size with an axis of {tuple(axes)} "
                       "and a positive size, e.g. --mesh=data=4,fsdp=2.")
    sizes[name] = int(value)
  return tuple(sizes.get(axis, 1) for axis in axes)


def build_stage(config, name: str):
  """The stage called `name`, from `rvq_jax.train.stages.build`, allocating nothing big.

  A prior's frozen tokenizer is abstract (`nnx.eval_shape`): its weights are constants
  of the step, so their shapes are all the compile needs.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from rvq_jax.train import stages  # pylint: disable=import-outside-toplevel
  if name == "tokenizer":
    return stages.build(config, name)
  from rvq_jax.train.tokenizer_stage import build_tokenizer  # pylint: disable=import-outside-toplevel
  tokenizer = nnx.eval_shape(lambda: build_tokenizer(config, rngs=nnx.Rngs(0)))
  return stages.build(config, name, tokenizer=tokenizer)


def _train_batch_size(config, name: str) -> int:
  return config[name].train.batch_size


def abstract_batch(stage, config, global_batch: int) -> dict:
  """ShapeDtypeStructs of one global training batch, without reading any data.

  A stage may say what its batches are with an `abstract_batch(global_batch_size)`
  method. The default is the image batch of `rvq_jax.data.iterator.BatchIterator`
  (what the tokenizer reads, and what a prior reads when it tokenizes images in its
  step), with the class labels or label maps a conditional prior needs.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  if hasattr(stage, "abstract_batch"):
    return stage.abstract_batch(global_batch)
  size = config.data.image_size
  batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), np.float32),
           "index": jax.ShapeDtypeStruct((global_batch,), np.int32),
           "valid": jax.ShapeDtypeStruct((global_batch,), np.bool_)}
  condition = getattr(stage, "condition_kind", "none")
  if condition == "class":
    batch["label"] = jax.ShapeDtypeStruct((global_batch,), np.int32)
  elif condition not in ("none", None):
    batch["label_map"] = jax.ShapeDtypeStruct((global_batch, size, size), np.int32)
  return batch


def compiled_memory(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program (XLA's buffer assignment)."""
  stats = compiled.memory_analysis()
  if stats is None:  # Some backends do not report; say so rather than print zeros.
    raise RuntimeError("this backend reports no memory analysis for compiled programs.")
  numbers = dict(argument_bytes=int(stats.argument_size_in_bytes),
                 output_bytes=int(stats.output_size_in_bytes),
                 alias_bytes=int(stats.alias_size_in_bytes),
                 temp_bytes=int(stats.temp_size_in_bytes),
                 code_bytes=int(stats.generated_code_size_in_bytes))
  numbers["total_bytes"] = (numbers["argument_bytes"] + numbers["output_bytes"]
                            - numbers["alias_bytes"] + numbers["temp_bytes"])
  return numbers


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled program, per device (XLA's cost analysis)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def check(config, *, stage_name: str | None = None, mesh_shape: Sequence[int] | None = None,
          batch_size: int | None = None, steps: Sequence[int] | None = None,
          devices: Sequence[Any] | None = None, platform: str = "cpu") -> list[StepReport]:
  """Lowers and compiles the stage's train step for each phase; returns what each needs.

  `devices` are the target devices (default: all attached); the mesh takes the first
  prod(mesh_shape) of them. Nothing is allocated on them: state, batch, key and step are
  ShapeDtypeStructs with the shardings the loop would give them.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from rvq_jax import parallel  # pylint: disable=import-outside-toplevel
  from rvq_jax.train import loop  # pylint: disable=import-outside-toplevel

  stage_name = stage_name or config.stages[0]
  loop_config = loop.loop_config_from(config, stage_name)
  if mesh_shape is not None:
    loop_config = dataclasses.replace(loop_config, mesh_shape=tuple(mesh_shape))
  batch_size = batch_size or _train_batch_size(config, stage_name)
  devices = list(jax.devices() if devices is None else devices)
  mesh = parallel.make_mesh(loop_config.mesh_shape, loop_config.mesh_axes, devices=devices)
  resolved = tuple(mesh.shape[a] for a in loop_config.mesh_axes)
  data_parallel = math.prod(mesh.shape[a] for a in parallel.BATCH_AXES if a in mesh.shape)
  if batch_size % data_parallel:
    raise ValueError(f"global batch {batch_size} does not split over the {data_parallel} "
                     f"data-parallel devices of mesh {resolved}.")

  stage = build_stage(config, stage_name)
  steps = list(steps) if steps else sorted({0, max(0, loop_config.num_steps - 1)})
  phases: dict[Hashable, int] = {}
  for step in steps:
    phases.setdefault(stage.phase(int(step)), int(step))

  prepared = loop.prepare(stage, loop_config, mesh)
  # State, constants (replicated, as the loop's device_put), batch, key and step, abstract.
  arguments = prepared.abstract_step_arguments(abstract_batch(stage, config, batch_size))

  reports = []
  with jax.set_mesh(mesh):
    for phase in phases:
      compiled = prepared.train_step(phase).lower(*arguments).compile()
      reports.append(StepReport(
          stage=stage_name, phase=repr(phase), mesh=dict(mesh.shape), platform=platform,
          num_devices=mesh.devices.size, global_batch=batch_size, flops=compiled_flops(compiled),
          remat=config[stage_name].model.remat, dtype=config[stage_name].model.dtype,
          **compiled_memory(compiled)))
  return reports


def _target_devices(num_devices: int):
  """Devices to compile for, set up before JAX's backend starts."""
  import jax  # pylint: disable=import-outside-toplevel
  if _TOPOLOGY.value:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    try:
      topology = topologies.get_topology_desc(topology_name=_TOPOLOGY.value, platform="tpu")
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(f"--topology={_TOPOLOGY.value}: cannot describe this TPU topology "
                       f"here ({error}); it needs libtpu (pip install 'jax[tpu]'). Leave "
                       "--topology out to compile for simulated CPU devices.") from error
    return list(topology.devices), f"TPU {_TOPOLOGY.value}"
  if _PLATFORM.value == "cpu":
    # Simulated CPU devices: as many as the mesh needs, on any machine.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", num_devices)
    return jax.devices()[:num_devices], "simulated cpu"
  return jax.devices(), jax.devices()[0].platform


def main(argv) -> int:
  del argv
  config = _CONFIG.value
  if _RANDOM_PRETRAINED.value:
    config.weights.random = True
  from rvq_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  config_lib.validate(config)
  axes = tuple(config.mesh.axes)
  mesh_shape = parse_mesh(_MESH.value, axes) if _MESH.value else tuple(config.mesh.shape)
  if -1 in mesh_shape and _PLATFORM.value == "cpu" and not _TOPOLOGY.value:
    raise app.UsageError("give --mesh with every size (e.g. --mesh=data=4,fsdp=2) to "
                         "compile for simulated devices; the config's mesh has a -1.")
  stage_name = _STAGE.value or config.stages[0]
  settings = [(remat, dtype) for dtype in (_DTYPE.value or [None])
              for remat in (_REMAT.value or [None])]
  # Every setting is checked before the first (minutes-long) compile.
  configs = [with_settings(config, stage_name, remat=remat, dtype=dtype)
             for remat, dtype in settings]
  devices, platform = _target_devices(math.prod(s for s in mesh_shape if s > 0))
  reports = []
  for setting_config in configs:
    new = check(setting_config, stage_name=stage_name, mesh_shape=mesh_shape,
                batch_size=_BATCH.value, steps=[int(s) for s in _STEPS.value or []],
                devices=devices, platform=platform)
    for report in new:
      print("\n".join(report.lines()), flush=True)
    reports.extend(new)
    # Written after each setting, so a long sweep that is stopped keeps what it did.
    if _JSON.value:
      files.write_json(_JSON.value, [dataclasses.asdict(r) for r in reports])
  table = memory_table(reports)
  print("\nPer-device memory (fits: total ≤ the chip's HBM):\n" + table)
  if platform == "simulated cpu" and len({r.remat for r in reports}) > 1:
    print("Note: XLA:CPU expands remat's optimization barriers and schedules the "
          "recomputation early, so its temporaries barely change with remat (the FLOPs "
          "do); compile with --topology for a TPU's figures, or run "
          "benchmarks/remat_residuals.py for what JAX saves per setting.")
  if _MARKDOWN.value:
    files.write_bytes(_MARKDOWN.value, (table + "\n").encode())
  return 0


def run() -> None:
  def wrapped(argv):
    try:
      return main(argv)
    except ValueError as error:
      print(f"aot_check: error: {error}", file=sys.stderr)
      return 2
  app.run(wrapped)


if __name__ == "__main__":
  run()
