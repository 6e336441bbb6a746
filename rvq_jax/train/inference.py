"""The tokenizer's non-training modes: evaluate, reconstruct images, encode a data set.

`reconstruct` and `encode` use the tokenizer's params-only export (`rvq_jax.export`),
not its training stage, so they need no pretrained network's file."""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from rvq_jax import files
from rvq_jax.data import factory as data_factory
from rvq_jax.data.iterator import BatchIterator
from rvq_jax.data.sources import FolderSource
from rvq_jax.models.priors.conditioning import downsample_label_map
from rvq_jax.train import exporting
from rvq_jax.train import loop
from rvq_jax.train import reporting


def evaluate(stage, loop_config: loop.LoopConfig, workdir: str) -> dict[str, float]:
  """Held-out metrics of the latest checkpoint of `stage` in `workdir` → `eval_metrics.json`."""
  container, constants, mesh, step = loop.load_trained(stage, loop_config, workdir)
  eval_step = nnx.jit(stage.eval_step)
  with jax.set_mesh(mesh):
    metrics = {"step": step, **loop.evaluate_batches(
        stage, lambda batch: eval_step(container, constants, batch), mesh,
        max_rows=loop_config.max_eval_rows)}
  if jax.process_index() == 0:
    files.write_json(epath.Path(workdir) / "eval_metrics.json", metrics)
  logging.info("Evaluation of %s at step %d: %s", stage.name, step, metrics)
  return metrics


def _ordered_iterator(config, source, batch_size: int) -> BatchIterator:
  """One pass over `source` in order, no augmentation, padded last batch."""
  data_config = data_factory.validate_config(config.data)
  return BatchIterator(
      source, data_factory.preprocess_config(data_config, training=False),
      global_batch_size=batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), shuffle=False, num_epochs=1, drop_remainder=False,
      num_workers=data_config.num_workers, prefetch_batches=data_config.prefetch_batches)


def reconstruct(config: ml_collections.ConfigDict, workdir: str, input_dir: str,
                output_dir: str) -> int:
  """Every image under `input_dir` → its reconstruction as PNG in `output_dir`.

  Images are resized (shorter side) and centre-cropped to `data.image_size`, as in
  evaluation. Returns the number of images written.
  """
  tokenizer = exporting.load_tokenizer(config, workdir)
  mesh, model = tokenizer.mesh, tokenizer.module
  source = FolderSource(input_dir)

  @nnx.jit
  def run(model, images):
    return model(images, deterministic=True)[0]

  written = 0
  epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
  batch_size = config.tokenizer.eval.batch_size
  with jax.set_mesh(mesh), _ordered_iterator(config, source, batch_size) as it:
    for batch in it:
      images = loop.global_batch(batch, mesh)["image"]
      reconstructions = reporting.to_uint8(jax.device_get(run(model, images)))
      if jax.process_index() != 0:
        continue
      for row, (index, valid) in enumerate(zip(batch["index"], batch["valid"])):
        if valid:
          name = os.path.splitext(source.relative_paths[int(index)])[0].replace(os.sep, "_")
          files.save_png(epath.Path(output_dir) / (name + ".png"), reconstructions[row])
          written += 1
  logging.info("Wrote %d reconstructions to %s.", written, output_dir)
  _report_unreadable(source, "reconstruct")
  return written


def encode(config: ml_collections.ConfigDict, workdir: str, split: str, output: str) -> str:
  """The tokens of a whole split (in source order) → `output`, the priors' token file.

  The .npz holds 'indices' [N, h, w(, M)], 'index' (source order) and, when the data
  has them, 'label' [N] and 'label_map' [N, h, w] (downsampled to the token grid), so
  a conditional prior can train from the file alone (`prior.train_tokens`).
  """
  tokenizer = exporting.load_tokenizer(config, workdir)
  mesh, model, step = tokenizer.mesh, tokenizer.module, tokenizer.step
  source = data_factory.create_source(config.data, split=split)

  @nnx.jit
  def tokenize(model, batch):
    tokens = model.tokenize(batch["image"])
    fields = {"indices": tokens, "valid": batch["valid"], "index": batch["index"]}
    if "label" in batch:
      fields["label"] = batch["label"]
    if "label_map" in batch:
      fields["label_map"] = downsample_label_map(batch["label_map"], tokens.shape[1:3])
    return fields

  parts: dict[str, list[np.ndarray]] = {}
  batch_size = config.tokenizer.eval.batch_size
  with jax.set_mesh(mesh), _ordered_iterator(config, source, batch_size) as it:
    for batch in it:
      fields = multihost_utils.process_allgather(
          tokenize(model, loop.global_batch(batch, mesh)), tiled=True)
      valid = np.asarray(fields.pop("valid"))
      for name, value in fields.items():
        parts.setdefault(name, []).append(np.asarray(value)[valid])
  if jax.process_index() == 0:
    files.save_npz(output, {"step": step,
                            **{name: np.concatenate(p) for name, p in parts.items()}})
    logging.info("Encoded %d images of the %s split to %s.",
                 sum(len(p) for p in parts["indices"]), split, output)
  _report_unreadable(source, "encode")
  return output


def _report_unreadable(source, mode: str) -> None:
  """Names the inputs that got no output: unreadable files are skipped (their rows are
  invalid), never given another image's output."""
  unreadable = source.unreadable() if hasattr(source, "unreadable") else []
  if unreadable:
    listed = "; ".join(f"{name} ({why})" for name, why in unreadable[:10])
    more = f"; and {len(unreadable) - 10} more" if len(unreadable) > 10 else ""
    logging.warning("%s: skipped %d unreadable images of %s, which have no output: %s%s",
                    mode, len(unreadable), source.path, listed, more)
