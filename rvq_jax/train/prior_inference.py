"""A trained prior's `sample` mode: N images (PNG) and their tokens (.npz)."""
from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from rvq_jax import files
from rvq_jax.train import loop
from rvq_jax.train import reporting
from rvq_jax.train.prior_stage import PriorStage
from rvq_jax.train.prior_stage import decode_images
from rvq_jax.train.prior_stage import sample_options
from rvq_jax.train.prior_stage import sample_tokens


def _conditions(stage: PriorStage, config: ml_collections.ConfigDict, num_samples: int):
  """Conditions for `num_samples` images: none, classes in turn, or held-out label maps."""
  kind = config.prior.condition
  if kind == "none":
    return None
  if kind == "class":
    return np.arange(num_samples, dtype=np.int32) % config.prior.num_classes
  maps = []
  for batch in stage.eval_batches(jax.process_index(), jax.process_count()):
    maps.append(np.asarray(stage.condition(batch))[np.asarray(batch["valid"])])
    if sum(len(m) for m in maps) >= num_samples:
      break
  maps = np.concatenate(maps)
  return np.resize(maps, (num_samples,) + maps.shape[1:])  # Repeats maps if too few.


def sample(stage: PriorStage, config: ml_collections.ConfigDict, workdir: str,
           num_samples: int, output_dir: str) -> str:
  """Samples `num_samples` images from the latest checkpoint of the prior in `workdir`.

  Writes `output_dir/sample_00000.png …` and `output_dir/samples.npz` ('tokens', and
  'condition' when the prior is conditional). Returns `output_dir`.
  """
  if num_samples < 1:
    raise ValueError(f"--num_samples must be >= 1, got {num_samples}.")
  container, constants, mesh, step = loop.load_trained(
      stage, loop.loop_config_from(config, stage.name), workdir)
  tokenizer = stage.tokenizer(constants)
  conditions = _conditions(stage, config, num_samples)
  options = tuple(sorted(sample_options(config, stage.name).items()))
  chunk = min(num_samples, stage.settings.sample.num_samples)
  images, tokens = [], []
  with jax.set_mesh(mesh):
    for start in range(0, num_samples, chunk):
      count = min(chunk, num_samples - start)
      key = jax.random.fold_in(jax.random.key(config.seed), start)
      condition = None if conditions is None else conditions[start:start + count]
      batch_tokens = sample_tokens(container.model, key, condition, stage.layout, count,
                                   options)
      images.append(reporting.to_uint8(np.asarray(jax.device_get(
          decode_images(tokenizer, batch_tokens)))))
      tokens.append(np.asarray(jax.device_get(batch_tokens)))
  if jax.process_index() == 0:
    directory = epath.Path(output_dir)
    for index, image in enumerate(np.concatenate(images)):
      files.save_png(directory / f"sample_{index:05d}.png", image)
    extra = {} if conditions is None else {"condition": conditions}
    files.save_npz(directory / "samples.npz",
                   {"tokens": np.concatenate(tokens), "step": step, **extra})
    logging.info("Wrote %d %s samples of step %d to %s.", num_samples, stage.name, step,
                 output_dir)
  return output_dir
