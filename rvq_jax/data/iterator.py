"""Deterministic, resumable, multi-host batch iterator on grain, and per-host → global arrays.

The pipeline is grain's `MapDataset` → `IterDataset` API, not `grain.DataLoader`:

  order    grain.MapDataset.range(N).shuffle(seed)   element e·N + k = example k of epoch e
                                                     (grain reseeds every epoch)
  rows     MapDataset.range(R).repeat(num_epochs)    R = steps_per_epoch · B global rows per
           .map_with_index(GlobalRow)                epoch: drops the last incomplete batch
                                                     (training) or pads it (eval, valid=False)
  shard    ProcessRows(rows, B, p, P)                this process's block of each global batch
  read     .map(ReadSource(source))                  the source's raw example (grain source)
           .map(Preprocess(config, seed))            resize / crop / flip, seeded per example
  batch    .to_iter_dataset(grain.ReadOptions(num_threads=num_workers, ...)).batch(B/P)

Why not `DataLoader`: its `IndexSampler` shards the *records* over processes and each
process batches its own shard, so the global batch (and its row order) would depend on
the process count, batches would straddle epochs, and the per-record random seeds would
change with the sharding. Random access (`MapDataset`) lets every step be computed
from its index alone: global batch t of an epoch is the B consecutive entries t·B …
t·B+B−1 of that epoch's order, and process p reads only rows p·B/P … (p+1)·B/P−1 of it
(`ProcessRows`, the batch-major counterpart of grain's `ds[p::P]`). Every host
computes the same order from the seed, no communication is needed, and the union of
the hosts' slices is exactly, row for row, the batch a single process would read.
Augmentation draws come from (seed, epoch, example index) (`preprocess`), never
from grain's per-position `random_map` seeds, so the same example gets the same pixels
on 1 host or 64. Decoding runs in grain's thread pool (`ReadOptions.num_threads` =
`num_workers`; PIL and the array_record reader release the GIL), `prefetch_batches`
steps ahead of the consumer; `num_workers=0` reads in the calling thread. Processes
(`mp_prefetch`) are not used: threads suffice for GIL-free decoding, and they keep the
state a single number.

The whole iterator state is the global step (plus fields that detect a mismatched
restore), a small JSON dict that goes into the checkpoint next to the model. The grain
iterator is positioned from it with `grain.experimental.set_next_index` (its own state,
`{'next_index': step·B/P}`, is per-process; the global step restores on any process
count):

  state = iterator.get_state()      # {'step': 1200, 'seed': 0, ...}
  ...
  iterator.restore(state)           # next batch = the one an uninterrupted run sees

Per-host batch, B_local = B / P rows:
  'image'      float32 (B_local, S, S, 3) in [-1, 1]
  'label_map'  int32   (B_local, S, S)   if the source has label maps
  'label'      int32   (B_local,)        if the source has class labels
  'index'      int32   (B_local,)        the example's index in the source
  'valid'      bool    (B_local,)        False on rows that pad the last eval batch
"""
from __future__ import annotations

import math
import sys
from typing import Any
from typing import Mapping

import grain
import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from rvq_jax.data.preprocess import PreprocessConfig
from rvq_jax.data.preprocess import preprocess_example
from rvq_jax.data.sources import REPLACED

PERMUTATION_STREAM = 0x706572  # "per": first word of the shuffle seed's hash.
# Names the order of the iterator state's 'step': a state saved under another order
# (the pre-grain iterator's numpy permutations) resumes at the same step in this order.
ORDER = "grain-index-shuffle"


# ------------------------------------------------------------------ order


def shuffle_seed(seed: int) -> int:
  """grain's 32-bit shuffle seed for a run seed.

  grain shuffles epoch e with seed `shuffle_seed + e`; hashing the run seed keeps run
  seeds s and s+1 from seeing each other's epochs shifted by one.
  """
  state = np.random.SeedSequence([PERMUTATION_STREAM, seed % 2**63]).generate_state(1)
  return int(state[0])


def example_order(num_examples: int, seed: int, shuffle: bool = True) -> grain.MapDataset:
  """The visiting order: element e·N + k is the source index of example k of epoch e."""
  order = grain.MapDataset.range(num_examples)
  return order.shuffle(seed=shuffle_seed(seed)) if shuffle else order


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The visiting order of epoch `epoch`: int64 (num_examples,), a function of (seed, epoch)."""
  order = example_order(num_examples, seed)
  start = epoch * num_examples
  return np.fromiter((order[start + k] for k in range(num_examples)), np.int64,
                     count=num_examples)


class GlobalRow(grain.transforms.MapWithIndex):
  """Row g of the global stream (row g % B of global batch g // B) → its example.

  Element → {'index': source index, 'epoch', 'valid'}. Each epoch has R rows
  (R = steps_per_epoch · B); rows past the epoch's N examples pad its last batch with
  the epoch's first example, marked valid=False.
  """

  def __init__(self, order: grain.MapDataset, num_examples: int, rows_per_epoch: int):
    self.order, self.num_examples, self.rows_per_epoch = order, num_examples, rows_per_epoch

  def map_with_index(self, index: int, position: int) -> dict[str, Any]:
    epoch = index // self.rows_per_epoch
    valid = position < self.num_examples
    example = self.order[epoch * self.num_examples + (position if valid else 0)]
    return {"index": np.int32(example), "epoch": epoch, "valid": np.bool_(valid)}


class ProcessRows(grain.MapDataset):
  """This process's rows of every global batch of `parent` (batch-major sharding).

  Local row j is global row (j // b)·B + p·b + j % b, with b = B/P: process p reads
  the contiguous block p·b … (p+1)·b−1 of each global batch, so the P processes'
  batches, concatenated in process order, are the global batch row for row, for any P.
  (grain's `ds[p::P]` would interleave rows, and `grain.sharding` would shard the
  examples, so the global batch would depend on P.)
  """

  def __init__(self, parent: grain.MapDataset, *, global_batch_size: int,
               process_index: int, process_count: int):
    super().__init__(parent)
    self._global_batch_size = global_batch_size
    self._local_batch_size = global_batch_size // process_count
    self._process_index, self._process_count = process_index, process_count

  def __len__(self) -> int:
    length = len(self._parent)
    return length if length >= sys.maxsize else length // self._process_count

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local_batch_size)
    return self._parent[step * self._global_batch_size
                        + self._process_index * self._local_batch_size + row]

  def __str__(self) -> str:
    return (f"ProcessRows(process={self._process_index}/{self._process_count}, "
            f"global_batch={self._global_batch_size})")


# --------------------------------------------------------------- reading


class ReadSource(grain.transforms.Map):
  """A row {'index', 'epoch', 'valid'} → the source's raw example plus those fields.

  The source is read as a grain random-access source (`grain.MapDataset.source`); its
  own skip-and-count of unreadable examples (`rvq_jax.data.sources`) stays inside it.
  """

  def __init__(self, source):
    self.source = source
    self._examples = grain.MapDataset.source(source)

  def map(self, row: dict[str, Any]) -> dict[str, Any]:
    example = dict(self._examples[int(row["index"])])
    if example.pop(REPLACED, False):
      # The example stood in for an unreadable one: the row keeps the batch's shape,
      # but nothing may count it or give it an output as if it were that example.
      row = {**row, "valid": np.bool_(False)}
    return {**example, **row}


class Preprocess(grain.transforms.Map):
  """A raw example → fixed-size arrays (`preprocess_example`), seeded by (seed, epoch,
  index), so the result is the same on any process count, thread, or resume."""

  def __init__(self, config: PreprocessConfig, seed: int):
    self.config, self.seed = config, seed

  def map(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    index = example["index"]
    out = preprocess_example(example, self.config, seed=self.seed, epoch=example["epoch"],
                             index=int(index))
    out["index"], out["valid"] = index, example["valid"]
    return out


class DropEpoch(grain.transforms.Map):
  """Drops the 'epoch' field (sources that need no augmentation)."""

  def map(self, example: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in example.items() if key != "epoch"}


# -------------------------------------------------------------- iterator


def _too_few_examples(source, global_batch_size: int) -> str:
  """Why `source` cannot fill one batch, counting only the examples that decode.

  A file can pass the header check when its source is built and still fail to decode
  (a truncated PNG), so with fewer examples than a batch each is decoded now: a folder
  of corrupt files is then reported as such, not as a small one.
  """
  count = len(source)
  if hasattr(source, "count_readable"):
    count = source.count_readable()
  unreadable = source.unreadable() if hasattr(source, "unreadable") else []
  detail = ""
  if unreadable:
    name, why = unreadable[0]
    detail = (f" ({len(unreadable)} image files are unreadable and skipped, e.g. {name}: "
              f"{why})")
  if not count:
    return f"{source.path} has no readable examples{detail}."
  return (f"{source.path} has {count} readable examples{detail}, fewer than the global "
          f"batch size {global_batch_size}, so no full batch exists.")


class BatchIterator:
  """Per-host batches of one source, in a global order fixed by the seed (on grain).

  Args:
    source: random-access examples (see `rvq_jax.data.sources`; anything with
      `__len__`, `__getitem__` and `path`, i.e. a grain RandomAccessDataSource).
    preprocess: sizes and augmentation; `preprocess.training` decides random vs. fixed;
      None = batch the source's examples as they are (e.g. token arrays).
    global_batch_size: B, rows per step over all processes.
    process_index, process_count: this host's p and P; B must divide by P.
    seed: fixes the per-epoch order and every augmentation.
    shuffle: visit each epoch in a fresh permutation (else index order).
    num_epochs: None = repeat forever (training); n = stop after n epochs.
    drop_remainder: drop the last incomplete global batch of each epoch (training);
      else pad it with copies of the epoch's first example marked `valid=False`
      (eval: every example is seen exactly once, shapes stay fixed).
    num_workers: grain read threads (0 = read in the calling thread).
    prefetch_batches: steps read ahead of the consumer (with num_workers > 0).
  """

  def __init__(self, source, preprocess: PreprocessConfig | None, *,
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
    if not num_examples:
      raise ValueError(f"{source.path} has no examples.")
    if drop_remainder and num_examples < global_batch_size:
      raise ValueError(_too_few_examples(source, global_batch_size))
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
    self.num_workers = max(0, int(num_workers))
    self.prefetch_batches = max(0, int(prefetch_batches))

    rows_per_epoch = self.steps_per_epoch * self.global_batch_size
    order = example_order(num_examples, self.seed, self.shuffle)
    # The global stream of rows: what a single process would read.
    self.global_rows = (grain.MapDataset.range(rows_per_epoch).repeat(num_epochs)
                        .map_with_index(GlobalRow(order, num_examples, rows_per_epoch)))
    self.local_rows = ProcessRows(self.global_rows, global_batch_size=self.global_batch_size,
                                  process_index=self.process_index,
                                  process_count=self.process_count)
    examples = self.local_rows.map(ReadSource(source))
    examples = examples.map(Preprocess(preprocess, self.seed) if preprocess is not None
                            else DropEpoch())
    buffer = ((self.prefetch_batches + 1) * self.per_process_batch_size
              if self.num_workers else 0)
    self.dataset = examples.to_iter_dataset(grain.ReadOptions(
        num_threads=self.num_workers, prefetch_buffer_size=buffer)).batch(
            self.per_process_batch_size)
    self._iterator: grain.DatasetIterator | None = None  # Made on the first `next`.
    self._step = 0  # The next step __next__ returns.

  # ------------------------------------------------------------------ order

  def _rows(self, dataset: grain.MapDataset, start: int, count: int):
    rows = [dataset[start + r] for r in range(count)]
    return (np.array([row["index"] for row in rows], np.int64),
            np.array([row["valid"] for row in rows], np.bool_))

  def global_batch_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices int64 (B,) and validity bool (B,) of global batch `step`."""
    return self._rows(self.global_rows, step * self.global_batch_size,
                      self.global_batch_size)

  def local_batch_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's contiguous slice (B/P,) of `global_batch_indices(step)`."""
    return self._rows(self.local_rows, step * self.per_process_batch_size,
                      self.per_process_batch_size)

  # --------------------------------------------------------------- loading

  def _finished(self, step: int) -> bool:
    return self.num_steps is not None and step >= self.num_steps

  def _grain_iterator(self) -> grain.DatasetIterator:
    if self._iterator is None:
      self._iterator = iter(self.dataset)
      if self._step:
        grain.experimental.set_next_index(self._iterator, self._step)
    return self._iterator

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._finished(self._step):
      raise StopIteration
    iterator = self._grain_iterator()
    try:
      batch = next(iterator)
    except BaseException:
      # Leave the iterator at this step, so that a retry re-reads the same batch
      # (grain has already dropped the failed element from its buffer).
      grain.experimental.set_next_index(iterator, self._step)
      raise
    self._step += 1
    return batch

  # ----------------------------------------------------------------- state

  def get_state(self) -> dict[str, Any]:
    """A JSON-serializable dict: the next global step and the fields that fix the order."""
    return {"step": self._step, "seed": self.seed, "num_examples": self.num_examples,
            "global_batch_size": self.global_batch_size, "order": ORDER}

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
    if "seed" in state and state.get("order") != ORDER:
      logging.warning("The data iterator state %s was saved with another example order "
                      "(%r, not %r): the run continues at its step in this order.",
                      dict(state), state.get("order"), ORDER)
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"data iterator step must be >= 0, got {step}.")
    self._step = step
    if self._iterator is not None:
      # Drops what grain has prefetched for other steps.
      grain.experimental.set_next_index(self._iterator, step)

  def reset(self) -> None:
    """Back to the first batch (e.g. before each pass over an eval set)."""
    self.restore({"step": 0})

  def close(self) -> None:
    """Stops the read threads; the iterator can still `restore` and continue."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def __enter__(self) -> BatchIterator:
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
