"""Reads pickled dicts of NumPy arrays without running code from the file.

A pickle can name any importable callable (`os.system`, `builtins.eval`, ...) and have
the unpickler call it. `SafeUnpickler` resolves only the handful of globals that NumPy
arrays and plain containers are rebuilt from, and refuses every other one before it is
imported, so a hostile file fails with `pickle.UnpicklingError` and nothing of it runs.

Admitted globals (and why each is safe):

* `numpy._core.multiarray._reconstruct` (also spelled `numpy.core.multiarray`, as NumPy 1
  wrote it): makes an empty `ndarray` of a given subtype; the data then arrives through
  `ndarray.__setstate__` (pickle's BUILD). The subtype can only be an admitted class,
  i.e. `numpy.ndarray` itself.
* `numpy.ndarray`: the class passed to `_reconstruct`.
* `numpy.dtype`: builds a dtype from its string code ("f4") and state.
* `numpy._core.multiarray.scalar` (or `numpy.core.multiarray.scalar`): a NumPy scalar
  (np.float32(1)) from its dtype and raw bytes.
* `numpy._core.numeric._frombuffer` (or `numpy.core.numeric._frombuffer`): protocol 5's
  array constructor, `np.frombuffer` on bytes already in the file (object dtypes are
  refused by NumPy there).
* `_codecs.encode`, restricted to the "latin1" codec: protocol 2 pickles (Python 2
  compatible) store array bytes as text and turn them back into bytes with it. Any other
  codec is refused.
* `collections.OrderedDict`: a plain container.

Lists, dicts, tuples, strings, numbers and bytes need no global at all.
"""
from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
from typing import Any

import numpy as np
from etils import epath

_LATIN1 = {"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"}


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
  """`_codecs.encode` for the one use NumPy's protocol-2 pickles make of it."""
  if not isinstance(text, str) or str(encoding).lower() not in _LATIN1:
    raise pickle.UnpicklingError(
        f"_codecs.encode is admitted only to turn text into bytes with latin1, not "
        f"{type(text).__name__} with {encoding!r}."
    )
  return codecs.encode(text, "latin1", errors)


# The callables themselves, taken from NumPy objects' own reduce tuples so that they are
# right for the installed NumPy version whichever module path the file names.
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
_SCALAR = np.float32(0).__reduce__()[0]
_FROMBUFFER = np.ones(1, np.float32).__reduce_ex__(5)[0]

ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class SafeUnpickler(pickle.Unpickler):
  """A `pickle.Unpickler` that resolves only `ALLOWED_GLOBALS` (see the module docstring).

  Args:
    file: a binary file object.
    source: the file's name, for error messages.
  """

  def __init__(self, file, *, source: str = "<pickle>"):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"{self._source} refers to the global {module}.{name}, which is not one of the "
          "NumPy array and container constructors this reader admits; the file was not "
          "loaded (a pickle naming other globals can run arbitrary code)."
      ) from None

  def persistent_load(self, pid: Any) -> Any:
    raise pickle.UnpicklingError(
        f"{self._source} uses pickle persistent ids ({pid!r}), which this reader refuses."
    )


def loads(data: bytes, *, source: str = "<bytes>") -> Any:
  """Unpickles `data` with `SafeUnpickler`."""
  return SafeUnpickler(io.BytesIO(data), source=source).load()


def load(path: str | os.PathLike) -> Any:
  """Unpickles the file at `path` with `SafeUnpickler`."""
  path = os.fspath(path)
  with epath.Path(path).open("rb") as file:
    return SafeUnpickler(file, source=path).load()
