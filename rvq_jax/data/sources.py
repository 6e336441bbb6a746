"""Random-access image sources: a TFDS data set, an image folder, the embedded photos.

A source is a sequence of raw examples. `source[i]` returns a dict

  'image':     uint8 (H, W, 3) RGB, any H and W
  'label_map': int32 (H, W), only when `source.has_label_maps` (semantic synthesis)
  'label':     int32 scalar, only when `source.has_labels` (class-conditional)

Sizes differ between examples; `rvq_jax.data.preprocess` makes them uniform.

Unreadable files are skipped, never fatal: a file that fails a cheap header check
when the source is built is left out of the index, and one that fails to decode later
(a truncated JPEG passes the header check) is replaced by the next readable example,
so that the batch keeps its shape and every host still agrees on the global order.
The replacement carries `REPLACED: True`, so that the batch marks its row invalid
(`valid=False`): evaluation does not count it twice, and inference (`--mode=reconstruct`,
`encode`) gives no output for it rather than another image's. Both kinds are counted in
`source.num_skipped`, listed by `source.unreadable()` and logged. A source with no
readable example at all is a `ValueError` that names its path.
"""
from __future__ import annotations

import concurrent.futures
import io
import math
import os
import threading
from typing import Any
from typing import Sequence

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from rvq_jax import files

Example = dict[str, Any]

# Set (True) on the example `source[i]` returns in place of an unreadable example i.
REPLACED = "replaced"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
LABEL_MAP_EXTENSION = ".png"

# Individual skipped files are logged up to this many per source, then only every
# `_LOG_EVERY`-th, so a badly damaged data set does not flood the log.
_LOG_FIRST = 20
_LOG_EVERY = 1000

# Distinct first words of the numpy seed sequences, one per use, so that two streams
# never share entropy even when their remaining words coincide.
EMBEDDED_CROP_STREAM = 0x656D62  # "emb"


# ------------------------------------------------------------------- decoding

# PIL's modes for 16-bit grayscale (PNG's bit depth 16 opens as 'I;16', or as 32-bit
# 'I' holding 0 … 65535 in older Pillow versions).
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I")


def _binary(data: bytes | str | os.PathLike):
  """Encoded bytes, or a local or gs:// file, as a binary file object for PIL."""
  return io.BytesIO(data) if isinstance(data, bytes) else epath.Path(data).open("rb")


def decode_image(data: bytes | str | os.PathLike) -> np.ndarray:
  """Decodes encoded bytes or a file path to uint8 (H, W, 3) RGB.

  Grayscale, palette, RGBA and CMYK images are converted to RGB (alpha is dropped);
  16-bit grayscale is scaled to 8 bits (v / 257), not clipped.
  EXIF orientation is ignored on purpose, as in tf.image / TFDS decoding, so pixels
  and label maps stay aligned and match the reference statistics of FID.
  """
  with _binary(data) as handle, Image.open(handle) as image:
    if image.mode in _SIXTEEN_BIT_GRAY:
      # PIL's convert("RGB") clips these to 255 instead of scaling them: a 16-bit
      # grayscale PNG would turn almost white. Scale 0 … 65535 to 0 … 255 instead.
      pixels = np.asarray(image).astype(np.float32)
      gray = np.clip(np.round(pixels / 257.0), 0, 255).astype(np.uint8)
      return np.repeat(gray[..., None], 3, axis=-1)
    # convert() forces a full decode, so a truncated file raises here, not later.
    return np.asarray(image.convert("RGB"))


def decode_label_map(data: bytes | str | os.PathLike) -> np.ndarray:
  """Decodes a single-channel index image (PNG modes 1, L, P, I, I;16) to int32 (H, W).

  Palette ('P') images keep their palette indices: the index is the class.
  """
  with _binary(data) as handle, Image.open(handle) as image:
    if image.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
      raise ValueError(f"label map {_describe(data)} has mode {image.mode!r}; expected a "
                       "single-channel index image (PNG mode L, P, I or I;16).")
    return np.asarray(image).astype(np.int32)


def _to_rgb_uint8(array: Any, where: str) -> np.ndarray:
  """An already-decoded image (e.g. from TFDS) as uint8 (H, W, 3)."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f"{where}: expected a uint8 image, got dtype {array.dtype}.")
  if array.ndim == 2:
    array = array[..., None]
  if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
    raise ValueError(f"{where}: expected an (H, W, 1|3|4) image, got shape {array.shape}.")
  if array.shape[-1] == 1:
    array = np.repeat(array, 3, axis=-1)
  return array[..., :3]


def _describe(data: Any) -> str:
  return f"<{len(data)} bytes>" if isinstance(data, bytes) else str(data)


def _probe(path: str, label_map_path: str | None) -> str | None:
  """Cheap header check: returns why the pair is unusable, or None if it looks fine."""
  try:
    with _binary(path) as handle, Image.open(handle) as image:
      image.size  # noqa: B018  (reading the header is the check)
  except Exception as error:  # noqa: BLE001  (any failure means "unreadable")
    return f"unreadable image: {type(error).__name__}: {error}"
  if label_map_path is not None:
    if not files.is_file(label_map_path):
      return f"missing label map {label_map_path}"
    try:
      with _binary(label_map_path) as handle, Image.open(handle) as label_map:
        label_map.size  # noqa: B018
    except Exception as error:  # noqa: BLE001
      return f"unreadable label map {label_map_path}: {type(error).__name__}: {error}"
  return None


# -------------------------------------------------------------------- base


class ImageSource:
  """Base class: `len(source)` examples, `source[i]` with skip-and-count on failure.

  Subclasses implement `_load(index)` (may raise on a bad file) and set `path` (what
  error messages name), `has_labels`, `has_label_maps` and `num_classes`.
  """

  path: str = ""
  has_labels: bool = False
  has_label_maps: bool = False
  num_classes: int | None = None

  def __init__(self):
    self._lock = threading.Lock()
    self._num_skipped_at_build = 0
    self._failed: dict[int, str] = {}  # Index → why it failed to decode.

  def __len__(self) -> int:
    raise NotImplementedError

  def _load(self, index: int) -> Example:
    raise NotImplementedError

  @property
  def num_skipped(self) -> int:
    """Distinct examples skipped as unreadable: left out at build plus failed decodes."""
    with self._lock:
      return self._num_skipped_at_build + len(self._failed)

  def unreadable(self) -> list[tuple[str, str]]:
    """(name, why) of every example skipped so far: at build, then failed decodes."""
    with self._lock:
      failed = sorted(self._failed.items())
    return self._unreadable_at_build() + [(self._example_name(i), why) for i, why in failed]

  def _unreadable_at_build(self) -> list[tuple[str, str]]:
    return []

  def __getitem__(self, index: int) -> Example:
    """The example at `index`, or the next readable one (marked `REPLACED`) if it
    fails to decode."""
    size = len(self)
    if not 0 <= index < size:
      raise IndexError(f"index {index} out of range for {size} examples in {self.path}.")
    # Walk forward (wrapping) to the next readable example: deterministic, so every
    # host substitutes the same example for the same index.
    for offset in range(size):
      candidate = (index + offset) % size
      try:
        example = self._load(candidate)
      except Exception as error:  # noqa: BLE001  (corrupt data must not stop training)
        self._record_decode_failure(candidate, error)
        continue
      return {**example, REPLACED: True} if offset else example
    raise ValueError(f"no readable example in {self.path}: all {size} examples failed "
                     "to decode (see the warnings above).")

  def _record_decode_failure(self, index: int, error: Exception) -> None:
    # A failing example is retried on every read (the error may be a transient I/O
    # failure on a network file system) but counted and logged once.
    with self._lock:
      if index in self._failed:
        return
      self._failed[index] = f"{type(error).__name__}: {error}"
      count = len(self._failed)
    if count <= _LOG_FIRST or count % _LOG_EVERY == 0:
      logging.warning("%s: skipping example %d (%s), %d skipped so far: %s: %s. Its row "
                      "is marked invalid (it holds the next readable example, so that "
                      "training batches keep their size).", type(self).__name__, index,
                      self._example_name(index), self.num_skipped, type(error).__name__,
                      error)

  def count_readable(self) -> int:
    """Decodes every example now and returns how many decode (failures are recorded as
    in reading): for small sources, whose count must be exact before training."""
    readable = 0
    for index in range(len(self)):
      try:
        self._load(index)
        readable += 1
      except Exception as error:  # noqa: BLE001  (any failure means "unreadable")
        self._record_decode_failure(index, error)
    return readable

  def _example_name(self, index: int) -> str:
    return f"#{index}"

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(path={self.path!r}, examples={len(self)}, "
            f"skipped={self.num_skipped})")


# -------------------------------------------------------------- image folder


def _walk_images(root: str) -> list[str]:
  """Relative paths (posix separators) of image files under `root` (local or gs://), sorted.

  Dot-files and dot-directories are ignored: they are editor and OS debris (e.g.
  macOS '._x.jpg' resource forks), not images. Sorting the relative path strings
  makes the order identical on every host and every file system.
  """
  found = []
  for directory, subdirs, names in files.walk(root):
    subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    for name in names:
      if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      found.append(epath.Path(directory, name).relative_to(root).as_posix())
  return sorted(found)


class FolderSource(ImageSource):
  """Every image file under a directory tree, in sorted relative-path order.

  Args:
    path: root directory; any depth; extensions .jpg .jpeg .png .bmp .webp (any case).
    label_path: optional root of a parallel tree of label maps: image `a/b/x.jpg` pairs
      with `label_path/a/b/x.png` (single-channel class indices, same H×W as the
      image). An image without a readable label map is skipped and counted.
    class_labels: if True, the class label is the image's first-level subdirectory,
      numbered by sorted name (as torchvision's ImageFolder does); every image must
      then lie inside a subdirectory.
    class_names: the classes in label order, to keep labels consistent between a
      train and an eval folder; by default the sorted first-level subdirectories.
    probe_files: check each file's header when building (one open per file, in
      parallel), so that unreadable files are left out of the index up front.
    num_workers: threads for that check.
  """

  def __init__(self, path: str, *, label_path: str | None = None,
               class_labels: bool = False, class_names: Sequence[str] | None = None,
               probe_files: bool = True, num_workers: int = 8):
    super().__init__()
    self.path = os.fspath(path)
    self.label_path = os.fspath(label_path) if label_path else None
    if not epath.Path(self.path).is_dir():
      raise ValueError(f"image folder {self.path!r} does not exist or is not a directory.")
    if self.label_path is not None and not epath.Path(self.label_path).is_dir():
      raise ValueError(f"label map folder {self.label_path!r} does not exist or is not a "
                       "directory.")
    relative_paths = _walk_images(self.path)
    if not relative_paths:
      raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                       f"{self.path!r}.")

    self.has_label_maps = self.label_path is not None
    self.has_labels = bool(class_labels)
    if self.has_labels:
      self.class_names = self._resolve_class_names(relative_paths, class_names)
      self.num_classes = len(self.class_names)

    if probe_files:
      with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        reasons = list(pool.map(lambda rel: _probe(*self._file_pair(rel)), relative_paths))
    else:
      reasons = [None] * len(relative_paths)
    self.skipped_files = [(rel, why) for rel, why in zip(relative_paths, reasons) if why]
    self.relative_paths = [rel for rel, why in zip(relative_paths, reasons) if not why]
    self._num_skipped_at_build = len(self.skipped_files)
    for rel, why in self.skipped_files[:_LOG_FIRST]:
      logging.warning("FolderSource(%s): skipping %s: %s", self.path, rel, why)
    if not self.relative_paths:
      first, why = self.skipped_files[0]
      raise ValueError(f"no readable images under {self.path!r}: all {len(relative_paths)} "
                       f"image files were skipped as unreadable (first: {first}: {why}).")
    if self.has_labels:
      index_of = {name: i for i, name in enumerate(self.class_names)}
      self.labels = np.asarray([index_of[rel.split("/", 1)[0]] for rel in self.relative_paths],
                               np.int32)
    logging.info("FolderSource(%s): %d images, %d skipped as unreadable%s.", self.path,
                 len(self.relative_paths), self._num_skipped_at_build,
                 f", {self.num_classes} classes" if self.has_labels else "")

  def _resolve_class_names(self, relative_paths, class_names):
    at_root = [rel for rel in relative_paths if "/" not in rel]
    if at_root:
      raise ValueError(f"class_labels=True takes the class from the first-level "
                       f"subdirectory, but {len(at_root)} images lie directly in "
                       f"{self.path!r} (e.g. {at_root[0]!r}).")
    found = sorted({rel.split("/", 1)[0] for rel in relative_paths})
    if not class_names:
      return found
    class_names = list(class_names)
    unknown = sorted(set(found) - set(class_names))
    if unknown:
      raise ValueError(f"subdirectories {unknown} of {self.path!r} are not in class_names.")
    return class_names

  def _file_pair(self, relative: str) -> tuple[str, str | None]:
    image_path = os.path.join(self.path, relative)
    if self.label_path is None:
      return image_path, None
    stem = os.path.splitext(relative)[0]
    return image_path, os.path.join(self.label_path, stem + LABEL_MAP_EXTENSION)

  def __len__(self) -> int:
    return len(self.relative_paths)

  def _example_name(self, index: int) -> str:
    return self.relative_paths[index]

  def _unreadable_at_build(self) -> list[tuple[str, str]]:
    return list(self.skipped_files)

  def _load(self, index: int) -> Example:
    image_path, label_map_path = self._file_pair(self.relative_paths[index])
    example = {"image": decode_image(image_path)}
    if label_map_path is not None:
      label_map = decode_label_map(label_map_path)
      if label_map.shape != example["image"].shape[:2]:
        # A size mismatch means the pair is not aligned: resizing would hide the bug.
        raise ValueError(f"label map {label_map_path} is {label_map.shape}, but image "
                         f"{image_path} is {example['image'].shape[:2]}.")
      example["label_map"] = label_map
    if self.has_labels:
      example["label"] = self.labels[index]
    return example


# --------------------------------------------------------------------- TFDS


def tfds_prepare_instructions(name: str, data_dir: str | None,
                              manual_dir: str | None) -> str:
  """The steps that prepare a TFDS data set for random access (array_record)."""
  command = f"python -m rvq_jax.tools.prepare_tfds --name={name}"
  if data_dir:
    command += f" --data_dir={data_dir}"
  if manual_dir:
    command += f" --manual_dir={manual_dir}"
  return ("Prepare it once (any machine with internet for automatic downloads, or with "
          "the manually downloaded files for manual datasets; building needs TensorFlow, "
          "which requirements.txt installs), then copy the prepared folder to the data_dir:\n"
          f"    {command}\n"
          "rvq_jax reads with tfds.data_source (random access), which needs the "
          "array_record file format; it never downloads or prepares data itself.")


class TfdsSource(ImageSource):
  """A prepared TFDS data set, read by random access through `tfds.data_source`.

  TensorFlow is not needed to read (the array_record reader and PIL decode), only to
  prepare. Nothing is downloaded: `download=False`, and a data set that is not
  prepared is a ValueError naming the data set, the data_dir and the command
  (`python -m rvq_jax.tools.prepare_tfds`) that prepares it.

  Args:
    name: builder name with optional config and version, e.g. 'celeb_a_hq/256'.
    split: a TFDS split string, slices included, e.g. 'train[:27000]'.
    data_dir: TFDS data directory (local or gs://); None = TFDS's default
      ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    manual_dir: where the manually downloaded files live (CelebA-HQ); used only in
      the preparation instructions, since this class never prepares.
    image_key / label_key / label_map_key: feature names; the last two optional.
  """

  def __init__(self, name: str, *, split: str, data_dir: str | None = None,
               manual_dir: str | None = None, image_key: str = "image",
               label_key: str | None = None, label_map_key: str | None = None):
    super().__init__()
    import tensorflow_datasets as tfds  # Deferred: importing TFDS costs a second.

    self.name, self.split = name, split
    self.data_dir = data_dir or None
    self.image_key, self.label_key = image_key, label_key or None
    self.label_map_key = label_map_key or None
    try:
      self._data_source = tfds.data_source(name, split=split, data_dir=self.data_dir,
                                           download=False)
    except Exception as error:  # noqa: BLE001  (re-raised with the steps that fix it)
      raise self._explain_failure(tfds, error, manual_dir) from error
    self.path = f"tfds:{name}[{split}] in {self._resolved_data_dir(tfds)}"
    if len(self._data_source) == 0:
      raise ValueError(f"{self.path} is empty.")
    self.has_labels = self.label_key is not None
    self.has_label_maps = self.label_map_key is not None
    self._check_features(tfds)
    logging.info("TfdsSource: %s, %d examples.", self.path, len(self._data_source))

  def _resolved_data_dir(self, tfds) -> str:
    return self.data_dir or str(tfds.core.constants.DATA_DIR)

  def _explain_failure(self, tfds, error: Exception, manual_dir: str | None) -> Exception:
    data_dir = self._resolved_data_dir(tfds)
    steps = tfds_prepare_instructions(self.name, self.data_dir, manual_dir)
    if isinstance(error, tfds.core.registered.DatasetNotFoundError):
      return ValueError(f"TFDS has no data set named {self.name!r} "
                        f"({type(error).__name__}: {str(error).splitlines()[0]}).")
    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir)
      prepared = builder.is_prepared()
      file_format = str(builder.info.file_format.value) if prepared else None
      manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    except Exception:  # noqa: BLE001  (the original error is chained below)
      prepared, file_format, manual = False, None, None
    if not prepared:
      message = (f"TFDS data set {self.name!r} is not prepared in data_dir {data_dir!r} "
                 f"(rvq_jax never downloads: download=False).\n{steps}")
      if manual:
        message += (f"\n{self.name} is a manual-download data set; put its files in the "
                    f"manual_dir ({manual_dir or '<manual_dir>'}) first:\n"
                    f"{manual.strip()}")
      return ValueError(message)
    if file_format != "array_record":
      return ValueError(f"TFDS data set {self.name!r} in {data_dir!r} is prepared as "
                        f"{file_format!r}, but random access needs array_record. Rebuild "
                        f"it into another data_dir:\n{steps}")
    return ValueError(f"could not open TFDS data set {self.name!r} split {self.split!r} in "
                      f"{data_dir!r}: {type(error).__name__}: {error}")

  def _check_features(self, tfds) -> None:
    try:
      features = self._data_source.dataset_info.features
      names = set(features.keys())
    except Exception:  # noqa: BLE001  (mocked sources may lack the info; reads still fail clearly)
      return
    for role, key in (("image_key", self.image_key), ("label_key", self.label_key),
                      ("label_map_key", self.label_map_key)):
      if key is not None and key not in names:
        raise ValueError(f"{role}={key!r} is not a feature of {self.name!r}; features: "
                         f"{sorted(names)}.")
    if self.label_key is not None:
      self.num_classes = getattr(features[self.label_key], "num_classes", None)

  def __len__(self) -> int:
    return len(self._data_source)

  def _load(self, index: int) -> Example:
    record = self._data_source[index]
    where = f"{self.path} example {index}"
    example = {"image": _to_rgb_uint8(record[self.image_key], where)}
    if self.label_map_key is not None:
      label_map = np.asarray(record[self.label_map_key])
      if label_map.ndim == 3 and label_map.shape[-1] == 1:
        label_map = label_map[..., 0]
      if label_map.shape != example["image"].shape[:2]:
        raise ValueError(f"{where}: label map {label_map.shape} and image "
                         f"{example['image'].shape[:2]} differ in size.")
      example["label_map"] = label_map.astype(np.int32)
    if self.label_key is not None:
      example["label"] = np.int32(record[self.label_key])
    return example


# ------------------------------------------------------------ embedded photos

# Real RGB photographs that ship inside the scikit-image wheel (read from the
# installed package, never through skimage's downloader). Held out by photo: eval
# crops come from photos never seen in training. The stereo pair motorcycle_left /
# motorcycle_right are near-duplicates, so both stay on the train side. Left out:
# the synthetic images (color, phantom, chessboard), grayscale ones, and
# hubble_deep_field / retina, which are mostly black background.
EMBEDDED_PHOTOS = {
    "astronaut": "astronaut.png",                 # 512×512
    "rocket": "rocket.jpg",                       # 427×640
    "motorcycle_left": "motorcycle_left.png",     # 500×741
    "motorcycle_right": "motorcycle_right.png",   # 500×741
    "immunohistochemistry": "ihc.png",            # 512×512 micrograph
    "chelsea": "chelsea.png",                     # 300×451
    "coffee": "coffee.png",                       # 400×600
}
EMBEDDED_TRAIN_PHOTOS = ("astronaut", "rocket", "motorcycle_left", "motorcycle_right",
                         "immunohistochemistry")
EMBEDDED_EVAL_PHOTOS = ("chelsea", "coffee")

_photo_cache: dict[str, np.ndarray] = {}
_photo_cache_lock = threading.Lock()


def load_embedded_photo(name: str) -> np.ndarray:
  """One embedded photograph as read-only uint8 (H, W, 3); cached after first use."""
  with _photo_cache_lock:
    if name not in _photo_cache:
      import skimage.data  # Deferred: only the embedded source needs scikit-image.

      path = os.path.join(os.path.dirname(skimage.data.__file__), EMBEDDED_PHOTOS[name])
      if not os.path.isfile(path):  # Inside an installed package: always local.
        raise ValueError(f"embedded photo {name!r} is not in the installed scikit-image "
                         f"wheel (looked for {path}); install scikit-image>=0.24 from a "
                         "wheel, or use source='folder' or 'tfds'.")
      photo = decode_image(path)
      photo.setflags(write=False)  # Shared between threads and sources.
      _photo_cache[name] = photo
    return _photo_cache[name]


class EmbeddedPhotoSource(ImageSource):
  """A fixed set of square crops of the photographs shipped with scikit-image.

  Example i is a crop of photo `photos[i % len(photos)]`; its window (side between a
  quarter of the photo's shorter side, but at least `min_crop_size`, and the whole
  shorter side) is drawn from (crop_seed, photo, i // len(photos)) only. So the data
  set is fixed like a real one: the eval crops are the same in every run and for
  every training seed, and training randomness comes from the per-epoch
  augmentation on top.

  Args:
    split: 'train' (EMBEDDED_TRAIN_PHOTOS) or 'eval' (EMBEDDED_EVAL_PHOTOS).
    crops_per_photo: examples per photo; len = crops_per_photo * number of photos.
    min_crop_size: smallest crop side in pixels (use the training image size, so
      crops are not upsampled).
    crop_seed: which fixed set of crops; not the training seed, on purpose.
  """

  def __init__(self, split: str = "train", *, crops_per_photo: int = 128,
               min_crop_size: int = 64, crop_seed: int = 0):
    super().__init__()
    if split not in ("train", "eval"):
      raise ValueError(f"embedded split must be 'train' or 'eval', got {split!r}.")
    if crops_per_photo < 1:
      raise ValueError(f"crops_per_photo must be >= 1, got {crops_per_photo}.")
    self.photo_names = EMBEDDED_TRAIN_PHOTOS if split == "train" else EMBEDDED_EVAL_PHOTOS
    self.path = f"embedded:{split}({', '.join(self.photo_names)})"
    self.photos = [load_embedded_photo(name) for name in self.photo_names]
    self.crops_per_photo = int(crops_per_photo)
    self.min_crop_size = int(min_crop_size)
    self.crop_seed = int(crop_seed)

  def __len__(self) -> int:
    return self.crops_per_photo * len(self.photos)

  def crop_window(self, index: int) -> tuple[int, int, int]:
    """(top, left, side) of example `index` in its photo's pixel coordinates."""
    photo_index, crop_index = index % len(self.photos), index // len(self.photos)
    height, width = self.photos[photo_index].shape[:2]
    shorter = min(height, width)
    smallest = min(shorter, max(self.min_crop_size, math.ceil(0.25 * shorter)))
    rng = np.random.default_rng([EMBEDDED_CROP_STREAM, self.crop_seed, photo_index,
                                 crop_index])
    u_side, u_top, u_left = rng.random(3)
    side = smallest + int(u_side * (shorter - smallest + 1))
    side = min(side, shorter)
    top = int(u_top * (height - side + 1))
    left = int(u_left * (width - side + 1))
    return top, left, side

  def photo_of(self, index: int) -> str:
    return self.photo_names[index % len(self.photos)]

  def _example_name(self, index: int) -> str:
    return f"{self.photo_of(index)} crop {index // len(self.photos)}"

  def _load(self, index: int) -> Example:
    top, left, side = self.crop_window(index)
    photo = self.photos[index % len(self.photos)]
    return {"image": photo[top:top + side, left:left + side]}


# ------------------------------------------------------------------- IDX files

# Fashion-MNIST's classes, in label order (Xiao et al. 2017).
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# Where Debian's `dataset-fashion-mnist` package installs the four original files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
  """An IDX file (LeCun's MNIST format; `.gz` or plain) as a NumPy array.

  Header: two zero bytes, a type code, the number of dimensions n, then n big-endian
  uint32 sizes; the data follow in C order. Raises ValueError on anything else.
  """
  import gzip  # Deferred: only IDX sources read gzip.

  with epath.Path(path).open("rb") as f:
    data = gzip.GzipFile(fileobj=f).read() if path.endswith(".gz") else f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}).")
  dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  offset = 4 + 4 * ndim
  expected = offset + math.prod(shape) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(f"{path}: the header says {shape} {dtype} ({expected} bytes), the file "
                     f"has {len(data)} bytes.")
  return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def idx_file(directory: str, stem: str) -> str:
  """The path of IDX file `stem` (gzipped or not) in `directory`; FileNotFoundError
  with the ways to get Fashion-MNIST's files if it is missing."""
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if files.is_file(path):
      return path
  raise FileNotFoundError(
      f"no {stem}.gz (or {stem}) in {directory}. Fashion-MNIST's files come with Debian's "
      "package: `apt-get update && apt-get install -y dataset-fashion-mnist` (installs "
      f"them in {FASHION_MNIST_DIR}); or point data.idx_path at a folder holding them; or, "
      "with internet access, use TFDS instead: data.source='tfds', data.name="
      "'fashion_mnist', data.label_key='label', data.eval_split='test'.")


class IdxSource(ImageSource):
  """Labelled grayscale images from IDX files (Fashion-MNIST, MNIST), held in memory.

  The single channel is replicated to RGB, so the tokenizer, LPIPS and VGG see the
  3-channel images they were built for (an RGB image with R = G = B), and the
  decoder's three outputs are read back the same way. With `pad_to` > the image side,
  each image is centred on a black canvas of that side (Fashion-MNIST's background is
  black, so 28 → 32 keeps every pixel as it is instead of resampling).

  Args:
    directory: the folder with `<split>-images-idx3-ubyte(.gz)` and the labels file.
    split: 'train' (train-*) or 'eval' (t10k-*).
    pad_to: side of the canvas (0 = none).
    class_names: the label names (for sample grids); their count is `num_classes`.
  """

  has_labels = True

  def __init__(self, directory: str = FASHION_MNIST_DIR, *, split: str = "train",
               pad_to: int = 0, class_names: Sequence[str] = FASHION_MNIST_CLASSES):
    super().__init__()
    if split not in IDX_FILES:
      raise ValueError(f"IDX split must be 'train' or 'eval', got {split!r}.")
    image_stem, label_stem = IDX_FILES[split]
    image_path = idx_file(directory, image_stem)
    self.path = image_path
    images = read_idx(image_path)
    labels = read_idx(idx_file(directory, label_stem))
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(f"{image_path}: expected uint8 images [N, H, W], got {images.dtype} "
                       f"{images.shape}.")
    if labels.shape != images.shape[:1]:
      raise ValueError(f"{directory}: {images.shape[0]} images but labels of shape "
                       f"{labels.shape}.")
    self.class_names = tuple(class_names)
    self.num_classes = len(self.class_names)
    if labels.size and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
      raise ValueError(f"{directory}: labels outside [0, {self.num_classes}).")
    height, width = images.shape[1:]
    if pad_to and pad_to < max(height, width):
      raise ValueError(f"pad_to={pad_to} is smaller than the {height}×{width} images.")
    self.pad_to = int(pad_to)
    self.images, self.labels = images, labels.astype(np.int32)

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def _load(self, index: int) -> Example:
    image = self.images[index]
    if self.pad_to:
      height, width = image.shape
      top, left = (self.pad_to - height) // 2, (self.pad_to - width) // 2
      canvas = np.zeros((self.pad_to, self.pad_to), np.uint8)
      canvas[top:top + height, left:left + width] = image
      image = canvas
    return {"image": np.repeat(image[..., None], 3, axis=-1),
            "label": np.int32(self.labels[index])}

