"""The config-facing factory: a data config → a source → a per-host batch iterator.

The data config is an ml_collections.ConfigDict (or a plain dict) with the fields of
`get_default_config()`; fields left out take their defaults, unknown fields are
errors (they are almost always typos). Fields, by group:

  source                  'embedded' | 'folder' | 'tfds' | 'idx'
  image_size              S: every example becomes S×S (int >= 1)
  batch_size              global training batch B (all processes together)
  eval_batch_size         global eval batch; 0 = batch_size
  -- preprocessing (rvq_jax.data.preprocess.PreprocessConfig)
  resize_shorter_side     shorter side before cropping; 0 = image_size
  resize_shorter_side_max > resize_shorter_side: training scale jitter; 0 = none
  random_crop             training crops at a random position (eval: centre)
  random_flip             training flips horizontally with p = 1/2 (eval: never)
  -- source='tfds' (read with tfds.data_source; prepared as array_record, no TF needed)
  name                    builder name, e.g. 'celeb_a_hq/256'
  data_dir                TFDS data_dir (local or gs://); '' = $TFDS_DATA_DIR or default
  manual_dir              manual-download folder, quoted in the preparation steps
  train_split, eval_split TFDS split strings, slicing allowed ('train[:27000]')
  image_key               image feature (default 'image')
  label_key               class-label feature; '' = none
  label_map_key           segmentation feature; '' = none
  -- source='folder'
  path, eval_path         image roots for the train and eval splits
  label_path, eval_label_path  parallel label-map roots ('' = no label maps)
  class_labels            class = first-level subdirectory
  class_names             explicit class order (keeps train/eval labels consistent)
  probe_files             header-check every file when building the source
  -- source='idx' (LeCun's IDX files: Fashion-MNIST, MNIST; labelled, grayscale → RGB)
  idx_path                folder of train-*/t10k-*-idx?-ubyte(.gz) ('' = Debian's
                          dataset-fashion-mnist location, /usr/share/datasets/fashion-mnist)
  idx_pad_to              centre the images on a black canvas of this side (0 = no padding)
  -- source='embedded' (photographs inside the scikit-image wheel; no download)
  embedded_train_crops_per_photo, embedded_eval_crops_per_photo, embedded_crop_seed
  -- loading
  num_workers             decoding threads per host (grain ReadOptions.num_threads)
  prefetch_batches        global steps decoded ahead

Splits: 'train' repeats forever, shuffled per epoch from the seed, with augmentation,
dropping each epoch's last incomplete batch. 'eval' is one pass in source order
without augmentation, its last batch padded and marked by 'valid'; it does not depend
on the seed.
"""
from __future__ import annotations

import difflib
from typing import Any
from typing import Mapping

import jax
import ml_collections
from absl import logging
from etils import epath

from rvq_jax.data.iterator import BatchIterator
from rvq_jax.data.preprocess import PreprocessConfig
from rvq_jax.data.sources import FASHION_MNIST_CLASSES
from rvq_jax.data.sources import FASHION_MNIST_DIR
from rvq_jax.data.sources import IDX_FILES
from rvq_jax.data.sources import EmbeddedPhotoSource
from rvq_jax.data.sources import FolderSource
from rvq_jax.data.sources import IdxSource
from rvq_jax.data.sources import ImageSource
from rvq_jax.data.sources import TfdsSource
from rvq_jax.data.sources import idx_file

SOURCES = ("embedded", "folder", "tfds", "idx")
SPLITS = ("train", "eval")

_TFDS_FIELDS = ("name", "data_dir", "manual_dir", "label_key", "label_map_key")
_FOLDER_FIELDS = ("path", "label_path", "eval_path", "eval_label_path")
_IDX_FIELDS = ("idx_path", "idx_pad_to")


def get_default_config() -> ml_collections.ConfigDict:
  """Every data field with its default: the embedded photographs at 256×256."""
  config = ml_collections.ConfigDict()
  config.source = "embedded"
  config.image_size = 256
  config.batch_size = 8
  config.eval_batch_size = 0

  config.resize_shorter_side = 0
  config.resize_shorter_side_max = 0
  config.random_crop = True
  config.random_flip = True

  config.name = ""
  config.data_dir = ""
  config.manual_dir = ""
  config.train_split = "train"
  config.eval_split = "validation"
  config.image_key = "image"
  config.label_key = ""
  config.label_map_key = ""

  config.path = ""
  config.label_path = ""
  config.eval_path = ""
  config.eval_label_path = ""
  config.class_labels = False
  config.class_names = ()
  config.probe_files = True

  config.idx_path = ""
  config.idx_pad_to = 0

  config.embedded_train_crops_per_photo = 128
  config.embedded_eval_crops_per_photo = 16
  config.embedded_crop_seed = 0

  config.num_workers = 4
  config.prefetch_batches = 2
  return config


def _as_dict(data_config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  if isinstance(data_config, ml_collections.ConfigDict):
    return data_config.to_dict()
  return dict(data_config)


def resolve_config(data_config: Mapping[str, Any] | ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """Defaults overlaid with `data_config`; unknown fields raise (with a suggestion)."""
  values = _as_dict(data_config)
  resolved = get_default_config()
  known = set(resolved.keys())
  for key in values:
    if key not in known:
      close = difflib.get_close_matches(key, sorted(known), n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"unknown data config field {key!r}.{hint} Known fields: "
                       f"{', '.join(sorted(known))}.")
  for key, value in values.items():
    # None means "unset" for the string fields; keep the typed default instead.
    if value is None and isinstance(resolved[key], str):
      value = ""
    if isinstance(resolved[key], tuple) and isinstance(value, list):
      value = tuple(value)
    resolved[key] = value
  return resolved


def _int_field(config, key: str, minimum: int) -> int:
  value = config[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"data config field {key} must be an int >= {minimum}, got {value!r}.")
  return value


def validate_config(data_config, *, split: str = "train",
                    process_count: int = 1) -> ml_collections.ConfigDict:
  """Checks every field that can be checked without touching data; returns the resolved config.

  Call it at start-up to fail before any model is built.
  """
  config = resolve_config(data_config)
  if config.source not in SOURCES:
    raise ValueError(f"data config field source must be one of {SOURCES}, got "
                     f"{config.source!r}.")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
  _int_field(config, "image_size", 1)
  batch_size = _int_field(config, "batch_size", 1)
  eval_batch_size = _int_field(config, "eval_batch_size", 0) or batch_size
  for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
    if value % process_count:
      raise ValueError(f"data config field {key}={value} (global) is not divisible by "
                       f"the {process_count} processes.")
  for key in ("resize_shorter_side", "resize_shorter_side_max", "embedded_crop_seed",
              "idx_pad_to"):
    _int_field(config, key, 0)
  _int_field(config, "embedded_train_crops_per_photo", 1)
  _int_field(config, "embedded_eval_crops_per_photo", 1)
  _int_field(config, "num_workers", 1)
  _int_field(config, "prefetch_batches", 0)
  preprocess_config(config, training=True)  # Checks the resize fields against image_size.

  if config.source == "tfds":
    if not config.name:
      raise ValueError("source='tfds' needs data config field name, e.g. 'celeb_a_hq/256'.")
    split_field = "train_split" if split == "train" else "eval_split"
    if not config[split_field]:
      raise ValueError(f"source='tfds' needs data config field {split_field}.")
    if not config.image_key:
      raise ValueError("source='tfds' needs data config field image_key.")
  elif config.source == "folder":
    path_field = "path" if split == "train" else "eval_path"
    if not config[path_field]:
      raise ValueError(f"source='folder' needs data config field {path_field} for the "
                       f"{split!r} split.")

  # Fields of another source are ignored; say so, since it is usually a mistake.
  stray = []
  if config.source != "tfds":
    stray += [key for key in _TFDS_FIELDS if config[key]]
  if config.source != "folder":
    stray += [key for key in _FOLDER_FIELDS if config[key]]
  if config.source != "idx":
    stray += [key for key in _IDX_FIELDS if config[key]]
  if stray:
    logging.warning("data config: source=%r ignores the fields %s.", config.source, stray)
  return config


def check_sources(data_config, splits=SPLITS) -> None:
  """Checks that each split's data exists, cheaply (no file is decoded): folders and
  IDX files are there, a TFDS split opens. Raises ValueError naming the config field.

  Call it at start-up with every split a run will read: a missing eval folder would
  otherwise pass until the first evaluation, after hours of training.
  """
  for split in splits:
    config = validate_config(data_config, split=split)
    if config.source == "folder":
      fields = (("path", "label_path") if split == "train" else
                ("eval_path", "eval_label_path"))
      for field in fields:
        if config[field] and not epath.Path(config[field]).is_dir():
          raise ValueError(f"data.{field}={config[field]!r} (the {split!r} split's "
                           f"{'images' if 'label' not in field else 'label maps'}) does "
                           "not exist or is not a directory.")
    elif config.source == "idx":
      directory = config.idx_path or FASHION_MNIST_DIR
      for stem in IDX_FILES[split]:
        idx_file(directory, stem)  # FileNotFoundError with the command that installs them.
    elif config.source == "tfds":
      _create_source(config, split)  # Opening names the steps that prepare a split.


def preprocess_config(data_config, *, training: bool) -> PreprocessConfig:
  """The preprocessing part of a (resolved) data config."""
  return PreprocessConfig(
      image_size=data_config.image_size,
      resize_shorter_side=data_config.resize_shorter_side,
      resize_shorter_side_max=data_config.resize_shorter_side_max,
      random_crop=bool(data_config.random_crop),
      random_flip=bool(data_config.random_flip),
      training=training)


def class_names(data_config) -> tuple[str, ...] | None:
  """The names of the class labels, for captions: `class_names` when given, Fashion-MNIST's
  for an IDX source, else None (the labels are shown as numbers)."""
  config = resolve_config(data_config)
  if config.class_names:
    return tuple(config.class_names)
  return FASHION_MNIST_CLASSES if config.source == "idx" else None


def create_source(data_config, *, split: str) -> ImageSource:
  """The random-access source for `split` ('train' | 'eval') of a data config."""
  return _create_source(validate_config(data_config, split=split), split)


def _create_source(config: ml_collections.ConfigDict, split: str) -> ImageSource:
  """`create_source` for a config that `validate_config` has already resolved."""
  train = split == "train"
  if config.source == "embedded":
    crops = (config.embedded_train_crops_per_photo if train
             else config.embedded_eval_crops_per_photo)
    return EmbeddedPhotoSource(split, crops_per_photo=crops,
                               min_crop_size=config.image_size,
                               crop_seed=config.embedded_crop_seed)
  if config.source == "idx":
    return IdxSource(config.idx_path or FASHION_MNIST_DIR, split=split,
                     pad_to=config.idx_pad_to,
                     class_names=tuple(config.class_names) or FASHION_MNIST_CLASSES)
  if config.source == "folder":
    return FolderSource(config.path if train else config.eval_path,
                        label_path=(config.label_path if train else config.eval_label_path)
                        or None,
                        class_labels=config.class_labels,
                        class_names=tuple(config.class_names) or None,
                        probe_files=config.probe_files,
                        num_workers=config.num_workers)
  return TfdsSource(config.name, split=config.train_split if train else config.eval_split,
                    data_dir=config.data_dir or None, manual_dir=config.manual_dir or None,
                    image_key=config.image_key, label_key=config.label_key or None,
                    label_map_key=config.label_map_key or None)


def create_dataset(data_config, *, split: str, process_index: int | None = None,
                   process_count: int | None = None, seed: int = 0,
                   batch_size: int | None = None) -> BatchIterator:
  """A per-host batch iterator for `split` of the configured data.

  Args:
    data_config: ConfigDict or dict with fields of `get_default_config()`.
    split: 'train' (infinite, shuffled, augmented) or 'eval' (one ordered pass, padded).
    process_index, process_count: this host and the host count; default
      jax.process_index() / jax.process_count().
    seed: fixes the training order and augmentation (eval ignores it).
    batch_size: the global batch size, for callers that keep it outside the data
      config (e.g. config.train.batch_size); None = data_config.batch_size for
      'train', data_config.eval_batch_size (or batch_size) for 'eval'.

  Returns:
    A `BatchIterator` (a grain pipeline); `next(it)` is this host's batch of B/P rows,
    `it.get_state()` / `it.restore(state)` checkpoint and resume it, `it.source` is the
    source.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if batch_size is not None:
    # Validated below with the config's own batch fields.
    data_config = dict(_as_dict(data_config),
                       **{"batch_size" if split == "train" else "eval_batch_size": batch_size})
  config = validate_config(data_config, split=split, process_count=process_count)
  train = split == "train"
  source = _create_source(config, split)
  return BatchIterator(
      source, preprocess_config(config, training=train),
      global_batch_size=config.batch_size if train else (config.eval_batch_size
                                                         or config.batch_size),
      process_index=process_index, process_count=process_count, seed=seed,
      shuffle=train, num_epochs=None if train else 1, drop_remainder=train,
      num_workers=config.num_workers, prefetch_batches=config.prefetch_batches)
