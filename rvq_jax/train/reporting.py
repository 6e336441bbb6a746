"""What a running job shows: a progress line, TensorBoard scalars and images, PNG files.

Only process 0 writes files and TensorBoard events (one copy of each, whatever the
process count; checkpoints are different: every process writes its own shards, see
`checkpoint.py`). Every process may log; with more than one process each log line
names the one that speaks ("[tokenizer p1/4]"). Paths may be local or gs:// (etils
epath), so a pod can write its summaries to the bucket that holds its checkpoints.
"""
from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from typing import Mapping

import jax
import numpy as np
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image


def to_host(array) -> np.ndarray:
  """A (possibly multi-process) jax.Array → the whole numpy array, on every process.

  `np.asarray` fails on an array whose shards live on other processes' devices (a batch
  split over a pod); those are gathered. Every process must call this together.
  """
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[..., H, W, C] float images in [-1, 1] → uint8 [0, 255]."""
  images = np.asarray(images, np.float32)
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """[N, H, W, C] uint8 images → one [rows·(H+pad), columns·(W+pad), C] uint8 grid."""
  count, height, width, channels = images.shape
  columns = columns or int(math.ceil(math.sqrt(count)))
  rows = int(math.ceil(count / columns))
  grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255,
                 np.uint8)
  for index in range(count):
    row, column = divmod(index, columns)
    top, left = pad + row * (height + pad), pad + column * (width + pad)
    grid[top:top + height, left:left + width] = images[index]
  return grid


def histogram_image(counts: np.ndarray, height: int = 128, max_width: int = 1024) -> np.ndarray:
  """A bar chart of code counts ([K]) as a [height, ≤max_width, 3] uint8 image.

  Codes are sorted by count so that the shape of the usage curve is visible at a glance;
  codes beyond `max_width` are grouped into bins of equal size (their mean).
  """
  counts = np.sort(np.asarray(counts, np.float64))[::-1]
  bins = int(math.ceil(len(counts) / max_width))
  padded = np.pad(counts, (0, (-len(counts)) % bins))
  bars = padded.reshape(-1, bins).mean(-1)
  scale = bars.max() if bars.max() > 0 else 1.0
  heights = np.round(bars / scale * (height - 1)).astype(int)
  image = np.full((height, len(bars), 3), 255, np.uint8)
  for column, bar in enumerate(heights):
    if bar > 0:
      image[height - bar:, column] = (40, 90, 200)
  return image


def progress_logger() -> logging.Logger:
  """The 'rvq_jax' logger: progress lines on stdout, independent of absl's verbosity.

  Libraries underneath (orbax, XLA) log a lot at INFO through absl; main turns absl down
  to warnings, and this logger keeps the job's own progress visible.
  """
  logger = logging.getLogger("rvq_jax")
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
  return logger


class Reporter:
  """Console progress, TensorBoard events and PNG files for one stage."""

  def __init__(self, workdir: str, stage: str, num_steps: int, start_step: int):
    self.workdir, self.stage, self.num_steps = workdir, stage, num_steps
    self.is_writer = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_writer, asynchronous=True)
    self.image_dir = epath.Path(workdir) / "images"
    if self.is_writer:
      self.image_dir.mkdir(parents=True, exist_ok=True)
    self._last_time, self._last_step = time.time(), start_step

  def _prefix(self) -> str:
    if jax.process_count() == 1:
      return f"[{self.stage}]"
    return f"[{self.stage} p{jax.process_index()}/{jax.process_count()}]"

  def log(self, message: str, *args) -> None:
    progress_logger().info("%s " + message, self._prefix(), *args)

  def progress(self, step: int, metrics: Mapping[str, float], keys: tuple[str, ...]) -> None:
    """One line: step, it/s, ETA and the key losses; scalars also go to TensorBoard."""
    now = time.time()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    remaining = (self.num_steps - step) / rate if rate > 0 else float("inf")
    eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if math.isfinite(remaining) else "?"
    shown = " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
    self.log("step %d/%d | %.2f it/s | ETA %s | %s", step, self.num_steps, rate, eta, shown)
    self.writer.write_scalars(step, {**metrics, "steps_per_second": rate})

  def scalars(self, step: int, metrics: Mapping[str, float]) -> None:
    self.writer.write_scalars(step, dict(metrics))

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 [H, W, C] images to TensorBoard and to `images/<name>_<step>.png`."""
    self.writer.write_images(step, {name: image[None] for name, image in images.items()})
    if self.is_writer:
      for name, image in images.items():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        (self.image_dir / f"{name}_{step:07d}.png").write_bytes(buffer.getvalue())

  def write_json(self, name: str, payload: Mapping) -> None:
    """`workdir/name` from process 0, replaced whole (a reader never sees half a file)."""
    if self.is_writer:
      path = epath.Path(self.workdir) / name
      temporary = path.parent / (path.name + ".tmp")
      temporary.write_text(json.dumps(payload, indent=2, sort_keys=True))
      temporary.replace(path)  # Atomic locally; a single object write on gs:// anyway.

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
