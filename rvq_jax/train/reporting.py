"""What a running job shows: a progress line, TensorBoard scalars and images, PNG files.

Only process 0 writes files and TensorBoard events (one copy of each, whatever the
process count; checkpoints are different: every process writes its own shards, see
`checkpoint.py`). Every process may log; with more than one process each log line
names the one that speaks ("[tokenizer p1/4]"). Paths may be local or gs:// (etils
epath), so a pod can write its summaries to the bucket that holds its checkpoints.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Mapping
from typing import Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

from rvq_jax import files


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


def image_grid(images: np.ndarray, columns: int | None = None, pad: int = 2, *,
               min_side: int = 128, captions: Sequence[str] | None = None,
               row_labels: Sequence[str] | None = None) -> np.ndarray:
  """[N, H, W, C] uint8 images → one uint8 grid a person can read.

  Each image is upscaled by the nearest integer factor that makes its longer side at
  least `min_side` pixels (nearest neighbour: the pixels stay visible, nothing is
  invented), `captions[i]` is written under image i (e.g. its class), and
  `row_labels[r]` left of row r (e.g. 'input', 'reconstruction').
  """
  count, height, width, channels = images.shape
  factor = max(1, math.ceil(min_side / max(height, width)))
  if factor > 1:
    images = np.repeat(np.repeat(images, factor, axis=1), factor, axis=2)
    height, width = height * factor, width * factor
  columns = columns or int(math.ceil(math.sqrt(count)))
  rows = int(math.ceil(count / columns))
  caption_height = _TEXT_HEIGHT if captions is not None else 0
  label_width = (max(_text_width(label) for label in row_labels) + 2 * pad
                 if row_labels else 0)
  cell_height = height + caption_height + pad
  grid = np.full((rows * cell_height + pad, label_width + columns * (width + pad) + pad,
                  channels), 255, np.uint8)
  for index in range(count):
    row, column = divmod(index, columns)
    top, left = pad + row * cell_height, label_width + pad + column * (width + pad)
    grid[top:top + height, left:left + width] = images[index]
  texts = []
  if captions is not None:
    if len(captions) != count:
      raise ValueError(f"{len(captions)} captions for {count} images.")
    for index, caption in enumerate(captions):
      row, column = divmod(index, columns)
      texts.append((label_width + pad + column * (width + pad),
                    pad + row * cell_height + height, caption))
  for row, label in enumerate(row_labels or ()):
    texts.append((pad, pad + row * cell_height + height // 2 - _TEXT_HEIGHT // 2, label))
  return _draw_text(grid, texts) if texts else grid


# PIL's built-in bitmap font: no font file needed on any machine.
_TEXT_HEIGHT = 14


def _text_width(text: str) -> int:
  box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text,
                                                          font=ImageFont.load_default())
  return int(box[2] - box[0])


def _draw_text(grid: np.ndarray, texts: Sequence[tuple[int, int, str]]) -> np.ndarray:
  gray = grid.shape[-1] == 1
  image = Image.fromarray(grid[..., 0] if gray else grid)
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  for left, top, text in texts:
    draw.text((left, top + 1), text, fill=0 if gray else (0, 0, 0), font=font)
  out = np.asarray(image)
  return out[..., None] if gray else out


def usage_statistics(counts: np.ndarray) -> dict[str, float]:
  """Usage (fraction of codes with a count > 0), perplexity exp H(p) and dead codes of [K]."""
  counts = np.asarray(counts, np.float64)
  probs = counts / max(counts.sum(), 1.0)
  nonzero = probs[probs > 0]
  return {"usage": float((counts > 0).mean()),
          "perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum())),
          "dead_codes": float((counts == 0).sum())}


def codebook_usage_plot(counts: np.ndarray, *, title: str = "Codebook usage",
                        width: int = 720, height: int = 360) -> np.ndarray:
  """A labelled chart of code counts as a [height, width, 3] uint8 image (matplotlib).

  Codes are sorted by count (one curve per sub-codebook for factorized tokens), so the
  shape of the usage curve — a few codes taking everything, or a flat book — shows at
  a glance; the y axis is symmetric-log so unused codes (0) sit on the axis. The legend
  gives each book's usage, perplexity exp H(p) and dead codes.

  Args:
    counts: [K] or [M, K] token counts per code.
    title: the chart's title (e.g. the stage, the step and what was counted).
  """
  # Agg: no display; imported here so the library does not pay for matplotlib otherwise.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=False)
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  counts = np.atleast_2d(np.asarray(counts, np.float64))
  num_codes = counts.shape[1]
  dpi = 100
  figure, axes = plt.subplots(figsize=(width / dpi, height / dpi), dpi=dpi)
  try:
    ranks = np.arange(1, num_codes + 1)
    for book, book_counts in enumerate(counts):
      stats = usage_statistics(book_counts)
      label = (f"usage {100 * stats['usage']:.1f}% · perplexity {stats['perplexity']:.1f}"
               f" · dead {int(stats['dead_codes'])}/{num_codes}")
      if len(counts) > 1:
        label = f"book {book}: {label}"
      axes.step(ranks, np.sort(book_counts)[::-1], where="mid", label=label)
    axes.set_yscale("symlog", linthresh=1.0)
    axes.set_xlim(1, num_codes)
    axes.set_ylim(bottom=0)
    axes.set_xlabel(f"code rank (by count, K = {num_codes})")
    axes.set_ylabel("tokens")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
  finally:
    plt.close(figure)
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
    # Imported here: clu's writers import TensorFlow, which code that only builds and
    # times a step (benchmarks/accelerator.py on a machine without TensorFlow) never needs.
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
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
        files.save_png(self.image_dir / f"{name}_{step:07d}.png", image)

  def write_json(self, name: str, payload: Mapping) -> None:
    """`workdir/name` from process 0, replaced whole (a reader never sees half a file)."""
    if self.is_writer:
      files.write_json(epath.Path(self.workdir) / name, payload)

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()
