"""Frozen pretrained networks (VGG, LPIPS, feature teachers) and the strict weight loader.

`from rvq_jax.models import pretrained` gives the loader's public API
(`pretrained.load_params`, `pretrained.PretrainedWeight`, ...); the networks are the
submodules `vgg`, `lpips` and `teachers`.
"""
from rvq_jax.models.pretrained.weights import (WEIGHTS_DIR_ENV_VAR, PretrainedWeight,
                                               WeightMismatchError, check_arrays,
                                               converter_command, load_params,
                                               module_arrays, param_shapes, read_npz,
                                               resolve_weights_path, save_params, write_npz)

__all__ = ["WEIGHTS_DIR_ENV_VAR", "PretrainedWeight", "WeightMismatchError", "check_arrays",
           "converter_command", "load_params", "module_arrays", "param_shapes", "read_npz",
           "resolve_weights_path", "save_params", "write_npz"]
