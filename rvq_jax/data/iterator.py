"""Deterministic, resumable, multi-host batch iterator, and per-host → global arrays.

Global order: epoch e visits the source in the permutation drawn from (seed, e) (or in
index order without shuffling). Global batch t of an epoch is the B consecutive
entries t·B … t·B+B−1 of that order; process p of P reads only rows
p·B/P … (p+1)·B/P−1 of it. Every host computes the same permutation from the seed,
so no communication is needed, and the union of the hosts' slices is exactly the
batch a single process would read.

The whole iterator state is the global step (plus fields that detect a mismatched
restore), a small dict that goes into the checkpoint next to the model:

  state = iterator.get_state()      # {'step': 1200, 'seed': 0, ...}
  ...
  iterator.restore(state)           # next batch = the one an uninterrupted run sees

Decoding runs in a thread pool (PIL and the array_record reader release the GIL),
`prefetch_batches` global steps ahead of the consumer.

Per-host batch, B_local = B / P rows:
  'image'      float32 (B_local, S, S, 3) in [-1, 1]
  'label_map'  int32   (B_local, S, S)   if the source has label maps
  'label'      int32   (B_local,)        if the source has class labels
  'index'      int32   (B_local,)        the example's index in the source
  'valid'      bool    (B_local,)        False on rows that pad the last eval batch
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rvq_jax.data.preprocess import PreprocessConfig, preprocess_example
from rvq_jax.data.sources import ImageSource

PERMUTATION_STREAM = 0x706572  # "per": first word of the per-epoch shuffle seed.


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The visiting order of epoch `epoch`: int64 (num_examples,), a function of (seed, epoch)."""
  rng = np.random.default_rng([PERMUTATION_STREAM, seed % 2**63, epoch])
  return rng.permutation(num_examples)


class BatchIterator:
  """Per-host batches of one source, in a global order fixed by the seed.

  Args:
    source: random-access examples (see `rvq_jax.data.sources`).
    preprocess: sizes and augmentation; `preprocess.training` decides random vs. fixed.
    global_batch_size: B, rows per step over all processes.
    process_index, process_count: this host's p and P; B must divide by P.
    seed: fixes the per-epoch order and every augmentation.
    shuffle: visit each epoch in a fresh permutation (else index order).
    num_epochs: None = repeat forever (training); n = stop after n epochs.
    drop_remainder: drop the last incomplete global batch of each epoch (training);
      else pad it with copies of the epoch's first example marked `valid=False`
      (eval: every example is seen exactly once, shapes stay fixed).
    num_workers: decoding threads.
    prefetch_batches: global steps decoded ahead of the consumer.
  """

  def __init__(self, source: ImageSource, preprocess: PreprocessConfig, *,
               global_batch_size: int, process_index: int = 0, process_count: int = 1,
               seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
               drop_remainder: bool = True, num_workers: int = 4,
               prefetch_batches: int = 2):
    if global_batch_size < 1:
      raise ValueError(f"global batch size must be >= 1, got {global_batch_size}.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} is not in [0, {process_count}).")
    if global_batch_size % process_count:
      raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                       f"process count {process_count}; each host must read B/P rows.")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}.")
    num_examples = len(source)
    if drop_remainder and num_examples < global_batch_size:
      raise ValueError(f"{source.path} has {num_examples} examples, fewer than the global "
                       f"batch size {global_batch_size}, so no full batch exists.")
    self.source = source
    self.preprocess = preprocess
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.per_process_batch_size = self.global_batch_size // self.process_count
    self.seed, self.shuffle = int(seed), bool(shuffle)
    self.num_epochs, self.drop_remainder = num_epochs, bool(drop_remainder)
    self.num_examples = num_examples
    self.steps_per_epoch = (num_examples // self.global_batch_size if drop_remainder else
                            math.ceil(num_examples / self.global_batch_size))
    self.num_steps = None if num_epochs is None else num_epochs * self.steps_per_epoch
    self._num_workers = max(1, int(num_workers))
    self._prefetch_batches = max(0, int(prefetch_batches))
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None
    self._pending: collections.deque = collections.deque()
    self._permutation_cache: tuple[int, np.ndarray] | None = None
    self._step = 0           # the next step __next__ returns
    self._next_submit = 0    # the next step to hand to the thread pool

  # ------------------------------------------------------------------ order

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_examples)
    if self._permutation_cache is None or self._permutation_cache[0] != epoch:
      self._permutation_cache = (epoch, epoch_permutation(self.num_examples, self.seed, epoch))
    return self._permutation_cache[1]

  def global_batch_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices int64 (B,) and validity bool (B,) of global batch `step`."""
    epoch, position = divmod(step, self.steps_per_epoch)
    order = self._order(epoch)
    positions = position * self.global_batch_size + np.arange(self.global_batch_size)
    valid = positions < self.num_examples
    # Padding rows repeat the epoch's first example; `valid` masks them out.
    return order[np.where(valid, positions, 0)], valid

  def local_batch_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's contiguous slice (B/P,) of `global_batch_indices(step)`."""
    indices, valid = self.global_batch_indices(step)
    rows = slice(self.process_index * self.per_process_batch_size,
                 (self.process_index + 1) * self.per_process_batch_size)
    return indices[rows], valid[rows]

  # --------------------------------------------------------------- loading

  def _load_one(self, epoch: int, index: int) -> dict[str, np.ndarray]:
    example = self.source[index]
    return preprocess_example(example, self.preprocess, seed=self.seed, epoch=epoch,
                              index=index)

  def _submit(self, step: int) -> None:
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self._num_workers,
                                                         thread_name_prefix="rvq_data")
    epoch = step // self.steps_per_epoch
    indices, valid = self.local_batch_indices(step)
    futures = [self._pool.submit(self._load_one, epoch, int(i)) for i in indices]
    self._pending.append((step, indices, valid, futures))

  def _finished(self, step: int) -> bool:
    return self.num_steps is not None and step >= self.num_steps

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._finished(self._step):
      raise StopIteration
    while (len(self._pending) <= self._prefetch_batches
           and not self._finished(self._next_submit)):
      self._submit(self._next_submit)
      self._next_submit += 1
    step, indices, valid, futures = self._pending.popleft()
    assert step == self._step, (step, self._step)
    try:
      examples = [future.result() for future in futures]
    except BaseException:
      # Leave the iterator at this step, so that a retry re-reads the same batch.
      self._cancel_pending()
      self._next_submit = self._step
      raise
    batch = {key: np.stack([example[key] for example in examples]) for key in examples[0]}
    batch["index"] = indices.astype(np.int32)
    batch["valid"] = valid.copy()
    self._step += 1
    return batch

  # ----------------------------------------------------------------- state

  def get_state(self) -> dict[str, int]:
    """A JSON-serializable dict: the next global step and the fields that fix the order."""
    return {"step": self._step, "seed": self.seed, "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Continues from `state` (from `get_state`): the next batch is batch state['step'].

    The state is global, so it restores on any process count. Fields other than
    'step' are checked against this iterator, because a different seed, data set
    size or batch size would silently change which examples come next; pass
    {'step': n} alone to skip that check on purpose.
    """
    if "step" not in state:
      raise ValueError(f"data iterator state has no 'step': {dict(state)}.")
    for key in ("seed", "num_examples", "global_batch_size"):
      if key in state and int(state[key]) != getattr(self, key):
        raise ValueError(
            f"data iterator state was saved with {key}={int(state[key])}, but this "
            f"iterator has {key}={getattr(self, key)}; resuming would not continue the "
            "saved order. Restore {'step': n} alone to accept the change.")
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"data iterator step must be >= 0, got {step}.")
    self._cancel_pending()
    self._step = self._next_submit = step

  def reset(self) -> None:
    """Back to the first batch (e.g. before each pass over an eval set)."""
    self.restore({"step": 0})

  def _cancel_pending(self) -> None:
    # Prefetched work for steps we no longer want: cancel what has not started and
    # drop the rest (its results are never read).
    for _, _, _, futures in self._pending:
      for future in futures:
        future.cancel()
    self._pending.clear()

  def close(self) -> None:
    """Stops the decoding threads; the iterator can still `restore` and continue."""
    self._cancel_pending()
    self._next_submit = self._step
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __enter__(self) -> "BatchIterator":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # ------------------------------------------------------------------ shape

  @property
  def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Per-host shapes and dtypes of one batch, without reading data (for AOT compiles)."""
    b, s = self.per_process_batch_size, self.preprocess.image_size
    spec = {"image": jax.ShapeDtypeStruct((b, s, s, 3), np.float32)}
    if self.source.has_label_maps:
      spec["label_map"] = jax.ShapeDtypeStruct((b, s, s), np.int32)
    if self.source.has_labels:
      spec["label"] = jax.ShapeDtypeStruct((b,), np.int32)
    spec["index"] = jax.ShapeDtypeStruct((b,), np.int32)
    spec["valid"] = jax.ShapeDtypeStruct((b,), np.bool_)
    return spec

  def __repr__(self) -> str:
    return (f"BatchIterator({self.source!r}, global_batch={self.global_batch_size}, "
            f"process={self.process_index}/{self.process_count}, step={self._step}, "
            f"steps_per_epoch={self.steps_per_epoch}, num_steps={self.num_steps})")


def to_global_array(local_batch: Any, sharding: jax.sharding.Sharding) -> Any:
  """Per-host numpy batch (pytree) → global jax.Arrays laid out by `sharding`.

  Built on `jax.make_array_from_process_local_data`: each process passes its own
  B/P rows and the global leading dimension is inferred (B). A NamedSharding whose
  spec is longer than a leaf's rank (e.g. P('data', None, None, None) for images,
  applied to the (B,) 'label' leaf) is cut to that rank, so one batch sharding serves
  every leaf.

  Rows land in the global array in the order of the devices that hold them. With a
  mesh whose batch axes list each process's devices together (jax.make_mesh does),
  process p's rows are global rows p·B/P … (p+1)·B/P−1, i.e. the global batch order.

  Args:
    local_batch: pytree of numpy arrays, leading dimension B/P.
    sharding: how the batch is laid out, typically NamedSharding(mesh, P(('data','fsdp'))).

  Returns:
    The same pytree of jax.Arrays with leading dimension B.
  """

  def one(leaf):
    leaf = np.asarray(leaf)
    leaf_sharding = sharding
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > leaf.ndim:
      leaf_sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:leaf.ndim]))
    return jax.make_array_from_process_local_data(leaf_sharding, leaf)

  return jax.tree.map(one, local_batch)
