"""What rematerialization saves for the backward pass: the bytes of the residuals JAX keeps
between the forward and the backward pass of the tokenizer (VQGAN + quantizer) and of the
discriminator, per image, for each `remat` setting and compute dtype.

  python -m benchmarks.remat_residuals [--config=configs/celebahq.py] [--json=out.json]

Platform-independent (traced with `jax.eval_shape`, nothing is compiled or allocated):
the residuals are the leaves of the `jax.vjp` pullback. The step's per-device peak also
holds what XLA's buffer assignment adds (fusion temporaries, the perceptual network,
collectives), which `rvq_jax.tools.aot_check --remat=...` measures per platform.
"""
from __future__ import annotations

import argparse
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rvq_jax.models.layers import remat as remat_lib
from rvq_jax.models.layers.dtypes import compute_dtype
from rvq_jax.models.tokenizer.discriminator import NLayerDiscriminator
from rvq_jax.train.tokenizer_stage import build_tokenizer


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location("run_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tokenizer")


def _nbytes(tree) -> int:
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


residual_bytes = remat_lib.saved_residual_bytes


def measure(config, remat: str, dtype: str) -> dict:
  config.tokenizer.model.update(remat=remat, dtype=dtype)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  model = nnx.eval_shape(lambda: build_tokenizer(config, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def generator_loss(p, x):
    reconstructions, output = nnx.merge(graphdef, p, rest)(
        x, key=jax.random.key(0), step=0, deterministic=False)
    return jnp.mean(jnp.abs(reconstructions.astype(jnp.float32) - x)) + output.total_loss

  loss = config.tokenizer.loss
  disc = nnx.eval_shape(lambda: NLayerDiscriminator(
      ndf=loss.disc_channels, n_layers=loss.disc_layers, norm=loss.disc_norm,
      dtype=compute_dtype(dtype), remat=remat, rngs=nnx.Rngs(0)))
  d_graphdef, d_params, d_rest = nnx.split(disc, nnx.Param, ...)

  def discriminator_loss(p, x):
    return jnp.mean(nnx.merge(d_graphdef, p, d_rest)(x).astype(jnp.float32))

  return dict(remat=remat, dtype=dtype, image_size=size,
              generator_residual_bytes=residual_bytes(generator_loss, params, images),
              discriminator_residual_bytes=residual_bytes(discriminator_loss, d_params, images),
              generator_param_bytes=_nbytes(params))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/celebahq.py")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  jax.config.update("jax_platforms", "cpu")
  rows = [measure(_load_config(args.config), remat, dtype)
          for dtype in ("float32", "bfloat16") for remat in remat_lib.REMAT_MODES]
  print("| remat | dtype | generator residuals / image (MiB) | discriminator residuals / "
        "image (MiB) |\n|---|---|---|---|")
  for row in rows:
    print(f"| {row['remat']} | {row['dtype']} | {row['generator_residual_bytes'] / 2**20:,.0f} "
          f"| {row['discriminator_residual_bytes'] / 2**20:,.1f} |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
