"""rvq_jax: Regularized and Factorized Vector Quantization for tokenized image synthesis, in JAX.

`rvq_jax.Tokenizer.load(path)` and `rvq_jax.Prior.load(path)` use a trained run's
params-only exports (`rvq_jax.export`); `rvq_jax.ops` holds the quantizer math.
"""

__version__ = "0.1.0"

# Loaded on first use, so that `import rvq_jax` (e.g. by `python -m rvq_jax.main`, before
# its flags set JAX up) imports neither JAX nor Flax.
_EXPORTS = {"Tokenizer": "rvq_jax.export", "Prior": "rvq_jax.export",
            "Samples": "rvq_jax.export"}


def __getattr__(name):
  if name in _EXPORTS:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'rvq_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_EXPORTS])
