"""What a person sees: grids upscaled by whole pixels, with captions and row labels."""
import numpy as np
import pytest

from rvq_jax.data import factory
from rvq_jax.train import reporting


def _images(count=6, side=8):
  return np.random.default_rng(0).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def test_small_images_are_upscaled_by_nearest_neighbour():
  images = _images(side=8)
  grid = reporting.image_grid(images, columns=3, pad=2, min_side=32)
  # 8 px → factor 4 → 32 px cells; every source pixel is a 4×4 block of the grid.
  assert grid.shape == (2 * (32 + 2) + 2, 3 * (32 + 2) + 2, 3)
  first = grid[2:34, 2:34]
  np.testing.assert_array_equal(first, np.repeat(np.repeat(images[0], 4, 0), 4, 1))
  # Images at least min_side are left as they are.
  big = reporting.image_grid(_images(side=40), columns=3, min_side=32)
  assert big.shape == (2 * 42 + 2, 3 * 42 + 2, 3)


def test_captions_and_row_labels_are_drawn_outside_the_images():
  images = _images(count=4, side=16)
  plain = reporting.image_grid(images, columns=2, min_side=16)
  captioned = reporting.image_grid(images, columns=2, min_side=16,
                                   captions=["Sandal", "Bag", "Coat", "Dress"],
                                   row_labels=["input", "reconstruction"])
  assert captioned.shape[0] > plain.shape[0] and captioned.shape[1] > plain.shape[1]
  label_width = captioned.shape[1] - plain.shape[1]
  cell = 16 + reporting._TEXT_HEIGHT + 2  # noqa: SLF001  (the layout under test)
  # The images are intact; the caption strip under the first one has dark text pixels.
  np.testing.assert_array_equal(captioned[2:18, label_width + 2:label_width + 18], images[0])
  caption_strip = captioned[18:cell, label_width + 2:label_width + 18]
  assert (caption_strip < 128).any()
  assert (captioned[:, :label_width] < 128).any()  # The row labels.
  with pytest.raises(ValueError, match="3 captions for 4 images"):
    reporting.image_grid(images, captions=["a", "b", "c"])


def test_class_names_for_captions():
  assert factory.class_names({"source": "idx"})[0] == "T-shirt/top"
  assert factory.class_names({"source": "folder", "class_names": ["cat", "dog"]}) == (
      "cat", "dog")
  assert factory.class_names({"source": "embedded"}) is None


def test_usage_statistics_match_hand_counts():
  counts = np.array([6, 2, 0, 0])  # p = (3/4, 1/4): H = log 4 − (3/4) log 3
  stats = reporting.usage_statistics(counts)
  assert stats["usage"] == 0.5 and stats["dead_codes"] == 2
  np.testing.assert_allclose(stats["perplexity"], np.exp(np.log(4) - 0.75 * np.log(3)))


def test_usage_plot_is_a_labelled_chart_with_one_curve_per_book():
  counts = np.zeros((2, 64))
  counts[0, :10] = np.arange(10, 0, -1)
  counts[1, :40] = 5
  plot = reporting.codebook_usage_plot(counts, title="usage", width=480, height=240)
  assert plot.shape == (240, 480, 3) and plot.dtype == np.uint8
  # Two differently coloured curves (matplotlib's first two cycle colours) are drawn.
  blue, orange = np.array([31, 119, 180]), np.array([255, 127, 14])
  for colour in (blue, orange):
    assert (np.abs(plot.astype(int) - colour).sum(-1) < 30).sum() > 20
  # Different counts give a different chart (the curves follow the data).
  other = reporting.codebook_usage_plot(counts[::-1], title="usage", width=480, height=240)
  assert not np.array_equal(plot, other)
