"""gs:// for tests: `gs://bucket/x` is stored at `<root>/bucket/x`, reached only through epath.

`etils.epath.testing.mock_epath()` swaps every scheme's backend for the OS backend with
the functions given; here each maps gs:// arguments to the local root (and results back
to gs://). An OS-level open of a gs:// path is not redirected: it fails, or creates a
`gs:` folder in the working directory, which the tests look for.

Two writers take gs:// paths without epath, and are redirected at their entry points:
orbax's CheckpointManager (TensorStore opens gs:// on its own) and TensorBoard's event
writer (tf.io.gfile). Each records the directory it was given, so a test can check that
it received the gs:// path.

With TensorFlow installed, etils 1.15 sends gs:// to its tf.io.gfile backend whatever
`mock_epath` installed; the context below turns that choice off, as EPATH_USE_TF=0 would.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from unittest import mock

PREFIX = "gs://"


@dataclasses.dataclass
class FakeGcs:
  root: str
  orbax_dirs: list[str] = dataclasses.field(default_factory=list)
  tensorboard_dirs: list[str] = dataclasses.field(default_factory=list)

  def local(self, path) -> str:
    """Where the fake stores `path` (unchanged when it is not gs://)."""
    path = os.fspath(path)
    return os.path.join(self.root, path[len(PREFIX):]) if path.startswith(PREFIX) else path

  def remote(self, path) -> str:
    """The gs:// name of a path under the root (unchanged otherwise)."""
    path = os.fspath(path)
    if path == self.root or path.startswith(self.root + os.sep):
      return PREFIX + os.path.relpath(path, self.root)
    return path


@contextlib.contextmanager
def fake_gcs(root) -> Iterator[FakeGcs]:
  import orbax.checkpoint as ocp
  from clu import metric_writers
  from etils import epath
  from etils.epath import gpath
  from etils.epath import testing

  gcs = FakeGcs(os.path.abspath(os.fspath(root)))
  os.makedirs(gcs.root, exist_ok=True)

  def one(original, path, *args, **kwargs):
    return original(gcs.local(path), *args, **kwargs)

  def two(original, path, destination, *args, **kwargs):
    return original(gcs.local(path), gcs.local(destination), *args, **kwargs)

  # Results name gs:// paths only for a gs:// query: orbax, redirected below, lists its
  # (local) directory under the root and must get local paths back.
  def glob(original, pattern):
    found = original(gcs.local(pattern))
    return [gcs.remote(f) for f in found] if os.fspath(pattern).startswith(PREFIX) else found

  def walk(original, top, **kwargs):
    remote = os.fspath(top).startswith(PREFIX)
    for directory, subdirs, files in original(gcs.local(top), **kwargs):
      yield gcs.remote(directory) if remote else directory, subdirs, files

  real_writer = metric_writers.create_default_writer

  # Subclasses, not functions: the project subclasses CheckpointManager itself.
  class CheckpointManager(ocp.CheckpointManager):
    def __init__(self, directory, *args, **kwargs):
      gcs.orbax_dirs.append(os.fspath(directory))
      super().__init__(gcs.local(directory), *args, **kwargs)

  class StandardCheckpointer(ocp.StandardCheckpointer):
    """The params-only exports' writer and reader."""

    def save(self, directory, *args, **kwargs):
      gcs.orbax_dirs.append(os.fspath(directory))
      return super().save(epath.Path(gcs.local(directory)), *args, **kwargs)

    def restore(self, directory, *args, **kwargs):
      return super().restore(epath.Path(gcs.local(directory)), *args, **kwargs)

    def metadata(self, directory, *args, **kwargs):
      return super().metadata(epath.Path(gcs.local(directory)), *args, **kwargs)

  def default_writer(logdir=None, **kwargs):
    if logdir is not None:
      gcs.tensorboard_dirs.append(os.fspath(logdir))
      logdir = gcs.local(logdir)
    return real_writer(logdir, **kwargs)

  with contextlib.ExitStack() as stack:
    stack.enter_context(mock.patch.object(gpath, "_is_tf_installed", lambda: False))
    stack.enter_context(testing.mock_epath(
        open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
        rmtree=one, stat=one, copy=two, rename=two, replace=two, glob=glob, walk=walk))
    stack.enter_context(mock.patch.object(ocp, "CheckpointManager", CheckpointManager))
    stack.enter_context(mock.patch.object(ocp, "StandardCheckpointer", StandardCheckpointer))
    stack.enter_context(mock.patch.object(metric_writers, "create_default_writer",
                                          default_writer))
    yield gcs
