"""Per-example preprocessing: resize the shorter side, crop, flip, scale to [-1, 1].

All randomness of an example comes from a numpy generator seeded by
(seed, epoch, example index), never from a shared stream, so the result does not
depend on which host reads the example, in which thread, or in which order: the same
global run gives the same pixels on 1 host or 64.

A label map goes through the same crop and flip as its image, resized with nearest
neighbour (class indices must not be blended).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

AUGMENT_STREAM = 0x617567  # "aug": first word of every augmentation seed sequence.


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How raw examples become fixed-size training or eval examples.

  Attributes:
    image_size: output side S; outputs are S×S.
    resize_shorter_side: the shorter side is resized to this before cropping
      (>= image_size); 0 means image_size, i.e. the largest centred/random square.
    resize_shorter_side_max: if larger than resize_shorter_side, training draws the
      shorter side uniformly from [resize_shorter_side, resize_shorter_side_max]
      (scale jitter, FQGAN's 256..320 for 256 crops); eval always uses the minimum.
    random_crop: training crops at a random position (eval always centre-crops).
    random_flip: training flips horizontally with probability 1/2 (never in eval).
    training: selects the training (random) or eval (deterministic) behaviour.
  """
  image_size: int
  resize_shorter_side: int = 0
  resize_shorter_side_max: int = 0
  random_crop: bool = True
  random_flip: bool = True
  training: bool = True

  def __post_init__(self):
    if self.image_size < 1:
      raise ValueError(f"image_size must be >= 1, got {self.image_size}.")
    if self.resize_shorter_side and self.resize_shorter_side < self.image_size:
      raise ValueError(f"resize_shorter_side ({self.resize_shorter_side}) must be 0 or >= "
                       f"image_size ({self.image_size}), else the crop would not fit.")
    if self.resize_shorter_side_max and self.resize_shorter_side_max < self.shorter_side_min:
      raise ValueError(f"resize_shorter_side_max ({self.resize_shorter_side_max}) must be 0 "
                       f"or >= resize_shorter_side ({self.shorter_side_min}).")

  @property
  def shorter_side_min(self) -> int:
    return self.resize_shorter_side or self.image_size

  @property
  def shorter_side_max(self) -> int:
    return max(self.shorter_side_min, self.resize_shorter_side_max)


@dataclasses.dataclass(frozen=True)
class CropGeometry:
  """Where the output comes from: a box in source pixels (x0, y0, x1, y1), maybe flipped."""
  box: tuple[float, float, float, float]
  flip: bool


def example_uniforms(seed: int, epoch: int, index: int) -> np.ndarray:
  """Four U[0, 1) draws (scale, top, left, flip) fixed by (seed, epoch, index).

  Always four, whatever the config, so switching e.g. flips off leaves the crops of
  every example unchanged.
  """
  rng = np.random.default_rng([AUGMENT_STREAM, seed % 2**63, epoch, index])
  return rng.random(4)


def crop_geometry(height: int, width: int, config: PreprocessConfig,
                  uniforms: np.ndarray) -> CropGeometry:
  """The crop box (in source pixels) and flip for an image of height × width.

  Equivalent to: resize so the shorter side is s, then cut an S×S window at (top,
  left) of the resized image; the box maps that window back to source pixels, so
  only the window is resampled.
  """
  size = config.image_size
  random = config.training
  lo, hi = config.shorter_side_min, config.shorter_side_max
  shorter_side = lo + int(uniforms[0] * (hi - lo + 1)) if random and hi > lo else lo
  shorter_side = min(shorter_side, hi)
  scale = shorter_side / min(height, width)
  # max() guards against rounding a long thin image below the crop size.
  resized_height = max(size, round(height * scale))
  resized_width = max(size, round(width * scale))
  if random and config.random_crop:
    top = int(uniforms[1] * (resized_height - size + 1))
    left = int(uniforms[2] * (resized_width - size + 1))
  else:
    top, left = (resized_height - size) // 2, (resized_width - size) // 2
  scale_y, scale_x = height / resized_height, width / resized_width
  box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
  flip = bool(random and config.random_flip and uniforms[3] < 0.5)
  return CropGeometry(box=box, flip=flip)


def resample_image(image: np.ndarray, box: tuple[float, float, float, float],
                   size: int) -> np.ndarray:
  """uint8 (H, W, 3) → uint8 (size, size, 3): bicubic over `box`, antialiased when shrinking."""
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC, box=box))


def resample_label_map(label_map: np.ndarray, box: tuple[float, float, float, float],
                       size: int) -> np.ndarray:
  """int (H, W) → int32 (size, size): nearest neighbour over `box`.

  Samples at output pixel centres, as PIL does for the image, so the two stay aligned.
  """
  height, width = label_map.shape
  x0, y0, x1, y1 = box
  centres = (np.arange(size) + 0.5) / size
  rows = np.clip(np.floor(y0 + centres * (y1 - y0)).astype(np.int64), 0, height - 1)
  cols = np.clip(np.floor(x0 + centres * (x1 - x0)).astype(np.int64), 0, width - 1)
  return label_map[rows[:, None], cols[None, :]].astype(np.int32)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] → float32 [-1, 1]."""
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def preprocess_example(example: dict[str, Any], config: PreprocessConfig, *, seed: int,
                       epoch: int, index: int) -> dict[str, np.ndarray]:
  """A raw source example → fixed-size arrays.

  Args:
    example: 'image' uint8 (H, W, 3); optional 'label_map' int (H, W) and 'label'.
    config: sizes and augmentation switches.
    seed, epoch, index: fix the randomness (index = the example's index in its source).

  Returns:
    'image' float32 (S, S, 3) in [-1, 1]; 'label_map' int32 (S, S) and 'label' int32 ()
    when present in the input.
  """
  image = example["image"]
  geometry = crop_geometry(image.shape[0], image.shape[1], config,
                           example_uniforms(seed, epoch, index))
  size = config.image_size
  image = resample_image(image, geometry.box, size)
  if geometry.flip:
    image = image[:, ::-1]
  out = {"image": normalize_image(image)}
  if "label_map" in example:
    label_map = resample_label_map(np.asarray(example["label_map"]), geometry.box, size)
    out["label_map"] = np.ascontiguousarray(label_map[:, ::-1] if geometry.flip else label_map)
  if "label" in example:
    out["label"] = np.int32(example["label"])
  return out


__all__ = [
    "PreprocessConfig", "CropGeometry", "example_uniforms", "crop_geometry",
    "resample_image", "resample_label_map", "normalize_image", "preprocess_example",
]
