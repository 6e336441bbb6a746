"""The data layer: determinism, per-host slices, resume, corrupt files, alignment, TFDS errors."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from rvq_jax import data

# Distinct colours for labels 0..9, so an image pixel tells which label it shows.
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                    [10, 10, 10], [250, 250, 250]], np.uint8)
HEIGHT, WIDTH = 40, 48
NUM_IMAGES = 12


def _write_labeled_folder(root, *, block: int):
  """12 images (HEIGHT×WIDTH) in class folders 'cat'/'dog', image = PALETTE[label map]."""
  rng = np.random.default_rng(0)
  for i in range(NUM_IMAGES):
    relative = f"{'cat' if i % 2 else 'dog'}/img_{i:02d}"
    coarse = rng.integers(0, len(PALETTE), (HEIGHT // block, WIDTH // block))
    label_map = np.kron(coarse, np.ones((block, block), np.int64)).astype(np.uint8)
    for folder, array in (("images", PALETTE[label_map]), ("labels", label_map)):
      os.makedirs(root / folder / os.path.dirname(relative), exist_ok=True)
      Image.fromarray(array).save(root / folder / f"{relative}.png")
  return str(root / "images"), str(root / "labels")


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
  """Labels change every pixel: any misalignment of image and label map shows."""
  return _write_labeled_folder(tmp_path_factory.mktemp("pixel"), block=1)


@pytest.fixture(scope="module")
def block_folder(tmp_path_factory):
  """Labels in 8×8 blocks: regions survive resizing."""
  return _write_labeled_folder(tmp_path_factory.mktemp("block"), block=8)


def _folder_config(images, labels, **overrides):
  config = data.get_default_config()
  config.source = "folder"
  config.path, config.label_path = images, labels
  config.class_labels = True
  config.image_size = 32
  config.batch_size = 4
  config.resize_shorter_side_max = 48  # Scale jitter: every random draw is exercised.
  config.num_workers = 2
  config.update(overrides)
  return config


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(first, second):
  assert first.keys() == second.keys()
  for key in first:
    np.testing.assert_array_equal(first[key], second[key], err_msg=key)


# ------------------------------------------------------------- determinism


def test_train_batches_are_fixed_by_the_seed(block_folder):
  config = _folder_config(*block_folder)
  make = lambda seed: data.create_dataset(config, split="train", process_index=0,
                                          process_count=1, seed=seed)
  run_a, run_b, other_seed = _take(make(0), 4), _take(make(0), 4), _take(make(1), 4)
  for batch_a, batch_b in zip(run_a, run_b):
    _assert_batches_equal(batch_a, batch_b)
  assert not all(np.array_equal(a["index"], c["index"]) for a, c in zip(run_a, other_seed))
  first = run_a[0]
  assert first["image"].shape == (4, 32, 32, 3) and first["image"].dtype == np.float32
  assert first["label_map"].shape == (4, 32, 32) and first["label_map"].dtype == np.int32
  assert first["label"].dtype == np.int32 and first["valid"].all()
  # 12 examples, batch 4: epoch 0 is 3 batches covering every example once.
  assert sorted(np.concatenate([b["index"] for b in run_a[:3]])) == list(range(NUM_IMAGES))


def test_augmentation_depends_only_on_seed_epoch_and_index():
  config = data.PreprocessConfig(image_size=16, resize_shorter_side_max=32)
  image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
  run = lambda seed, epoch, index: data.preprocess_example(
      {"image": image}, config, seed=seed, epoch=epoch, index=index)["image"]
  np.testing.assert_array_equal(run(0, 1, 5), run(0, 1, 5))
  assert not np.array_equal(run(0, 1, 5), run(0, 2, 5))
  assert not np.array_equal(run(0, 1, 5), run(0, 1, 6))
  eval_config = data.PreprocessConfig(image_size=16, resize_shorter_side_max=32, training=False)
  eval_run = lambda epoch: data.preprocess_example({"image": image}, eval_config, seed=epoch,
                                                   epoch=epoch, index=0)["image"]
  np.testing.assert_array_equal(eval_run(0), eval_run(3))


# ------------------------------------------------------------- multi-host


def test_two_processes_read_disjoint_slices_that_make_up_the_global_batch(block_folder):
  config = _folder_config(*block_folder)
  make = lambda index, count: data.create_dataset(config, split="train", process_index=index,
                                                  process_count=count, seed=3)
  whole, host0, host1 = make(0, 1), make(0, 2), make(1, 2)
  assert host0.per_process_batch_size == 2
  for _ in range(5):  # Crosses the epoch boundary at step 3.
    global_batch, part0, part1 = next(whole), next(host0), next(host1)
    assert not set(part0["index"]) & set(part1["index"])
    joined = {key: np.concatenate([part0[key], part1[key]]) for key in part0}
    _assert_batches_equal(joined, global_batch)


def test_batch_must_divide_by_process_count(block_folder):
  with pytest.raises(ValueError, match="not divisible"):
    data.create_dataset(_folder_config(*block_folder, batch_size=6), split="train",
                        process_index=0, process_count=4)


# ------------------------------------------------------------------ resume


def test_restore_continues_exactly_where_an_uninterrupted_run_is(block_folder):
  config = _folder_config(*block_folder)
  make = lambda: data.create_dataset(config, split="train", process_index=0,
                                     process_count=1, seed=7)
  uninterrupted = _take(make(), 8)

  interrupted = make()
  _take(interrupted, 4)  # Prefetching has already decoded steps beyond 4.
  state = json.loads(json.dumps(interrupted.get_state()))  # As a checkpoint stores it.
  assert state["step"] == 4
  interrupted.close()

  resumed = make()
  resumed.restore(state)
  for expected in uninterrupted[4:]:
    _assert_batches_equal(next(resumed), expected)

  resumed.restore({"step": 1})  # Going back on a live iterator drops its prefetch.
  _assert_batches_equal(next(resumed), uninterrupted[1])

  other_batch = data.create_dataset(_folder_config(*block_folder, batch_size=2),
                                    split="train", process_index=0, process_count=1, seed=7)
  with pytest.raises(ValueError, match="global_batch_size"):
    other_batch.restore(state)


def test_eval_is_one_padded_pass_in_order(block_folder):
  config = _folder_config(*block_folder, eval_path=block_folder[0],
                          eval_label_path=block_folder[1], eval_batch_size=8)
  eval_iterator = data.create_dataset(config, split="eval", process_index=0,
                                      process_count=1, seed=0)
  batches = list(eval_iterator)
  assert len(batches) == 2
  valid = np.concatenate([b["valid"] for b in batches])
  indices = np.concatenate([b["index"] for b in batches])
  assert valid.sum() == NUM_IMAGES and list(indices[valid]) == list(range(NUM_IMAGES))
  eval_iterator.reset()
  _assert_batches_equal(next(eval_iterator), batches[0])
  # A batch size kept outside the data config (config.eval.batch_size) overrides it.
  overridden = data.create_dataset(config, split="eval", process_index=0, process_count=1,
                                   batch_size=6)
  assert overridden.global_batch_size == 6 and overridden.num_steps == 2


# ---------------------------------------------------------- corrupt files


def test_corrupt_files_are_skipped_and_counted(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), np.uint8)).save(tmp_path / f"ok_{i}.png")
  (tmp_path / "garbage.png").write_bytes(b"this is not an image")
  (tmp_path / "empty.jpg").write_bytes(b"")
  whole = (tmp_path / "ok_0.png").read_bytes()
  # Passes the header check at build time, fails when decoded.
  (tmp_path / "truncated.png").write_bytes(whole[:len(whole) // 2])
  (tmp_path / "notes.txt").write_text("not an image extension: ignored, not counted")

  source = data.FolderSource(str(tmp_path))
  assert len(source) == 5 and source.num_skipped == 2
  assert {name for name, _ in source.skipped_files} == {"empty.jpg", "garbage.png"}
  truncated = source.relative_paths.index("truncated.png")
  example = source[truncated]  # Falls back to the next readable image.
  np.testing.assert_array_equal(example["image"], source[(truncated + 1) % len(source)]["image"])
  assert source.num_skipped == 3
  source[truncated]  # Counted once per file, not once per read.
  assert source.num_skipped == 3


def test_all_corrupt_or_empty_folder_is_a_clear_error(tmp_path):
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  for i in range(3):
    (corrupt / f"bad_{i}.jpg").write_bytes(b"\xff\xd8 broken")
  with pytest.raises(ValueError, match=f"no readable images under '{corrupt}'"):
    data.FolderSource(str(corrupt))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=f"no image files .* under '{empty}'"):
    data.FolderSource(str(empty))


# ---------------------------------------------------------------- embedded


def test_embedded_source_holds_out_whole_photos_and_yields_unit_range_images():
  config = data.get_default_config()
  config.update(image_size=48, batch_size=8, embedded_train_crops_per_photo=4,
                embedded_eval_crops_per_photo=4)
  train = data.create_dataset(config, split="train", process_index=0, process_count=1)
  evaluation = data.create_dataset(config, split="eval", process_index=0, process_count=1)
  train_photos = {train.source.photo_of(i) for i in range(len(train.source))}
  eval_photos = {evaluation.source.photo_of(i) for i in range(len(evaluation.source))}
  assert train_photos == set(data.EMBEDDED_TRAIN_PHOTOS)
  assert eval_photos == set(data.EMBEDDED_EVAL_PHOTOS) and not train_photos & eval_photos
  for batch in (next(train), next(evaluation)):
    image = batch["image"]
    assert image.shape == (8, 48, 48, 3) and image.dtype == np.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.1
  # The eval set is fixed: it does not depend on the training seed.
  again = data.create_dataset(config, split="eval", process_index=0, process_count=1, seed=9)
  _assert_batches_equal(next(again), next(iter(data.create_dataset(
      config, split="eval", process_index=0, process_count=1, seed=0))))


# ---------------------------------------------------------------- alignment


def test_label_maps_follow_their_images_through_crop_and_flip(pixel_folder):
  # Shorter side kept at 40 px: crops and flips are exact pixel copies, so every pixel
  # of the image must show the colour of its label.
  config = _folder_config(*pixel_folder, resize_shorter_side=HEIGHT, resize_shorter_side_max=0)
  iterator = data.create_dataset(config, split="train", process_index=0, process_count=1)
  flips_seen = set()
  for batch in _take(iterator, 6):
    pixels = np.round((batch["image"] + 1) * 127.5).astype(np.uint8)
    np.testing.assert_array_equal(pixels, PALETTE[batch["label_map"]])
    for row, index in enumerate(batch["index"]):
      raw = iterator.source[int(index)]["label_map"]
      flips_seen.add(not _is_window_of(batch["label_map"][row], raw))
      assert batch["label"][row] == iterator.source.labels[int(index)]
  assert flips_seen == {True, False}


def _is_window_of(window, array):
  size = window.shape[0]
  return any(np.array_equal(window, array[top:top + size, left:left + size])
             for top in range(array.shape[0] - size + 1)
             for left in range(array.shape[1] - size + 1))


def test_resized_label_maps_use_nearest_and_match_the_image(block_folder):
  config = _folder_config(*block_folder, resize_shorter_side=0, resize_shorter_side_max=0)
  batch = next(data.create_dataset(config, split="train", process_index=0, process_count=1))
  labels = np.arange(len(PALETTE))
  assert set(np.unique(batch["label_map"])) <= set(labels)  # Nearest: no blended classes.
  pixels = (batch["image"] + 1) * 127.5
  nearest_colour = np.argmin(((pixels[..., None, :] - PALETTE) ** 2).sum(-1), axis=-1)
  # 40 → 32 px bicubic blurs block edges; away from them the colour is the label's.
  assert np.mean(nearest_colour == batch["label_map"]) > 0.9


# --------------------------------------------------------------------- TFDS


def test_missing_tfds_dataset_names_the_dataset_dir_and_command(tmp_path):
  config = data.get_default_config()
  config.update(source="tfds", name="celeb_a_hq/256", data_dir=str(tmp_path),
                manual_dir="/data/celebahq_manual")
  with pytest.raises(ValueError) as error:
    data.create_dataset(config, split="train", process_index=0, process_count=1)
  message = str(error.value)
  for fragment in ("celeb_a_hq/256", str(tmp_path), "rvq_jax.tools.prepare_tfds",
                   "--manual_dir=/data/"
                   "celebahq_manual", "array_record", "not prepared"):
    assert fragment in message
  assert not any(tmp_path.rglob("*.array_record*"))  # Nothing was downloaded or built.


def test_tfds_source_reads_without_tensorflow(tmp_path):
  import tensorflow_datasets as tfds

  config = data.get_default_config()
  config.update(source="tfds", name="celeb_a_hq/256", data_dir=str(tmp_path), image_size=32,
                batch_size=4)
  with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
    batch = next(data.create_dataset(config, split="train", process_index=0, process_count=1))
  assert batch["image"].shape == (4, 32, 32, 3)
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


# ------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, match", [
    ({"image_sise": 64}, "Did you mean 'image_size'"),
    ({"source": "webdataset"}, "source must be one of"),
    ({"source": "folder"}, "needs data config field path"),
    ({"source": "tfds"}, "needs data config field name"),
    ({"resize_shorter_side": 100}, "resize_shorter_side"),
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
])
def test_config_errors_are_eager_and_clear(overrides, match):
  config = dict(data.get_default_config().to_dict(), **overrides)
  with pytest.raises(ValueError, match=match):
    data.validate_config(config, split="train")


# ------------------------------------------------------------ global arrays


def test_to_global_array_shards_the_batch_over_the_data_axis(block_folder):
  config = _folder_config(*block_folder, batch_size=8)
  batch = next(data.create_dataset(config, split="train", process_index=0, process_count=1))
  mesh = jax.make_mesh((8,), ("data",))
  global_batch = data.to_global_array(batch, NamedSharding(mesh, P("data", None, None, None)))
  assert global_batch["image"].shape == (8, 32, 32, 3)
  assert global_batch["label"].shape == (8,) and global_batch["label_map"].shape == (8, 32, 32)
  for key in batch:
    np.testing.assert_array_equal(np.asarray(global_batch[key]), batch[key])
  shard_rows = {shard.data.shape[0] for shard in global_batch["image"].addressable_shards}
  assert shard_rows == {1} and len(global_batch["image"].addressable_shards) == 8
