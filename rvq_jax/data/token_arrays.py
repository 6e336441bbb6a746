"""Token arrays written by `--mode=encode`, read back as resumable per-host batches.

A prior trains either on images tokenized on the fly by the frozen tokenizer, or on the
arrays `encode` wrote once (faster when the tokenizer is large). The file is an .npz:

  'indices'    int32 (N, h, w) or (N, h, w, M)  tokens (M sub-tokens for FQ)
  'label'      int32 (N,)                       if the data had class labels
  'label_map'  int32 (N, h, w)                  if the data had label maps (at token size)
  'index'      int32 (N,)                       the example's index in its image source

Batches come from the same grain pipeline as images (`rvq_jax.data.iterator.BatchIterator`:
same seed → same order, same per-process slices, same checkpointable state), without
the preprocessing; a batch is {'tokens', 'label'?, 'label_map'?, 'index', 'valid'}.
`TokenArraySource` is a grain random-access source (`__len__`, `__getitem__`); the
arrays are in host memory, so grain reads them in the calling thread (num_threads=0,
as grain advises for in-memory data).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rvq_jax import files
from rvq_jax.data.iterator import BatchIterator

TOKEN_FIELDS = ("label", "label_map")


class TokenArraySource:
  """The examples of one token .npz, loaded into host memory."""

  def __init__(self, path: str):
    if not files.is_file(path):
      raise FileNotFoundError(
          f"token file {path} does not exist; write it with: python -m rvq_jax.main "
          "--config=<config> --workdir=<workdir> --mode=encode --split=<train|eval> "
          f"--output={path}")
    arrays = files.load_npz(path)  # Local or gs://.
    if "indices" not in arrays:
      raise ValueError(f"{path} has no 'indices' array (fields: {sorted(arrays)}); "
                       "it was not written by --mode=encode.")
    self.tokens = np.asarray(arrays["indices"], np.int32)
    self.fields = {name: np.asarray(arrays[name], np.int32)
                   for name in TOKEN_FIELDS if name in arrays}
    if self.tokens.ndim not in (3, 4) or not len(self.tokens):
      raise ValueError(f"{path}: 'indices' has shape {self.tokens.shape}; expected "
                       "(N, h, w) or (N, h, w, M) with N > 0.")
    self.path = path
    self.has_labels = "label" in self.fields
    self.has_label_maps = "label_map" in self.fields

  def __len__(self) -> int:
    return len(self.tokens)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"tokens": self.tokens[index],
            **{name: values[index] for name, values in self.fields.items()}}


class TokenBatchIterator(BatchIterator):
  """`BatchIterator`'s order and state over a `TokenArraySource` (no decoding, no
  augmentation: the tokens are fixed)."""

  def __init__(self, source: TokenArraySource, **kwargs: Any):
    kwargs.setdefault("num_workers", 0)  # In memory: no read threads.
    super().__init__(source, preprocess=None, **kwargs)

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    b = self.per_process_batch_size
    example = self.source[0]
    spec = {name: jax.ShapeDtypeStruct((b,) + np.shape(value), np.int32)
            for name, value in example.items()}
    spec["index"] = jax.ShapeDtypeStruct((b,), np.int32)
    spec["valid"] = jax.ShapeDtypeStruct((b,), np.bool_)
    return spec


def create_token_dataset(path: str, *, split: str, batch_size: int, process_index: int,
                         process_count: int, seed: int = 0) -> TokenBatchIterator:
  """Training (shuffled, endless) or eval (one ordered, padded pass) batches of `path`."""
  train = split == "train"
  return TokenBatchIterator(
      TokenArraySource(path), global_batch_size=batch_size, process_index=process_index,
      process_count=process_count, seed=seed, shuffle=train,
      num_epochs=None if train else 1, drop_remainder=train, prefetch_batches=2)
