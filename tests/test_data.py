"""The data layer: determinism, per-host slices, resume, corrupt files, alignment, TFDS errors."""
import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from rvq_jax import data
from rvq_jax.data import factory
from rvq_jax.data import token_arrays

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


# ------------------------------------------------------------ grain pipeline


def _write_tokens(path, num=12, with_labels=True):
  """A token file as --mode=encode writes it: example i has tokens all equal to i."""
  arrays = {"indices": np.broadcast_to(np.arange(num, dtype=np.int32)[:, None, None],
                                       (num, 2, 3)).copy()}
  if with_labels:
    arrays["label"] = (np.arange(num) % 3).astype(np.int32)
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture()
def token_file(tmp_path):
  return _write_tokens(tmp_path / "tokens.npz")


def _tokens(path, *, split="train", batch_size=4, process_index=0, process_count=1, seed=0):
  return token_arrays.create_token_dataset(
      path, split=split, batch_size=batch_size, process_index=process_index,
      process_count=process_count, seed=seed)


@pytest.mark.parametrize("saved_on, restored_on", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_resume_from_every_step_matches_an_uninterrupted_run(block_folder, saved_on,
                                                             restored_on):
  """Saved after k steps on `saved_on` processes, restored in fresh iterators on
  `restored_on`: the next batches (pixels, crops and flips included) are the ones an
  uninterrupted run on `restored_on` processes reads, across epoch boundaries."""
  config = _folder_config(*block_folder)
  make = lambda index, count: data.create_dataset(config, split="train",
                                                  process_index=index,
                                                  process_count=count, seed=5)
  uninterrupted = [_take(make(p, restored_on), 9) for p in range(restored_on)]
  for k in (0, 2, 3, 4, 6):  # 3 steps per epoch: 3 and 6 start epochs.
    states = []
    for p in range(saved_on):
      interrupted = make(p, saved_on)
      _take(interrupted, k)
      states.append(json.loads(json.dumps(interrupted.get_state())))
      interrupted.close()
    assert all(state == states[0] for state in states) and states[0]["step"] == k
    for p in range(restored_on):
      resumed = make(p, restored_on)
      resumed.restore(states[0])
      for expected in uninterrupted[p][k:k + 2]:
        _assert_batches_equal(next(resumed), expected)
      resumed.close()  # Closing stops the threads; the iterator still continues.
      _assert_batches_equal(next(resumed), uninterrupted[p][k + 2])


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_are_disjoint_blocks_of_the_global_batch(block_folder, split,
                                                                process_count):
  config = _folder_config(*block_folder, eval_path=block_folder[0],
                          eval_label_path=block_folder[1], eval_batch_size=8,
                          batch_size=8)
  make = lambda index, count: data.create_dataset(config, split=split, process_index=index,
                                                  process_count=count, seed=11)
  whole = make(0, 1)
  hosts = [make(p, process_count) for p in range(process_count)]
  steps = 2 if split == "eval" else 4  # Eval: 12 examples, the second batch half padding.
  for step in range(steps):
    global_batch = next(whole)
    parts = [next(host) for host in hosts]
    indices, valid = whole.global_batch_indices(step)
    np.testing.assert_array_equal(global_batch["index"], indices)
    np.testing.assert_array_equal(global_batch["valid"], valid)
    for host, part in zip(hosts, parts):
      local_indices, local_valid = host.local_batch_indices(step)
      np.testing.assert_array_equal(part["index"], local_indices)
      np.testing.assert_array_equal(part["valid"], local_valid)
      np.testing.assert_array_equal(host.global_batch_indices(step)[0], indices)
    real = [set(part["index"][part["valid"]]) for part in parts]
    assert sum(map(len, real)) == len(set().union(*real))  # Disjoint.
    joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    _assert_batches_equal(joined, global_batch)
  if split == "eval":
    for iterator in [whole, *hosts]:
      with pytest.raises(StopIteration):
        next(iterator)


def test_shuffle_differs_across_epochs_and_seeds_and_is_reproducible(token_file):
  def epochs(seed, count=3):
    iterator = _tokens(token_file, seed=seed)
    batches = _take(iterator, 3 * count)  # 12 examples, batch 4: 3 steps per epoch.
    return [np.concatenate([b["index"] for b in batches[3 * e:3 * e + 3]])
            for e in range(count)]

  run, again, other = epochs(0), epochs(0), epochs(1)
  for epoch, order in enumerate(run):
    assert sorted(order) == list(range(12))  # Every example once per epoch.
    np.testing.assert_array_equal(order, again[epoch])
    np.testing.assert_array_equal(order, data.epoch_permutation(12, 0, epoch))
    assert not np.array_equal(order, other[epoch])
  assert not np.array_equal(run[0], run[1]) and not np.array_equal(run[1], run[2])
  # grain reseeds epoch e with shuffle_seed + e; the seed hash keeps run seeds 0 and 1
  # from sharing shifted epochs.
  assert not np.array_equal(run[1], other[0])
  # Tokens carry their example: the batch holds what the source holds at 'index'.
  batch = next(_tokens(token_file, seed=3))
  np.testing.assert_array_equal(batch["tokens"][:, 0, 0], batch["index"])
  np.testing.assert_array_equal(batch["label"], batch["index"] % 3)


def test_augmentation_in_the_pipeline_is_seeded_by_seed_epoch_and_index(block_folder):
  config = _folder_config(*block_folder)
  iterator = data.create_dataset(config, split="train", process_index=0, process_count=1,
                                 seed=2)
  preprocess = data.preprocess_config(data.validate_config(config), training=True)
  images = {}
  for step, batch in enumerate(_take(iterator, 6)):
    epoch = step // iterator.steps_per_epoch
    for row, index in enumerate(batch["index"]):
      expected = data.preprocess_example(iterator.source[int(index)], preprocess, seed=2,
                                         epoch=epoch, index=int(index))
      np.testing.assert_array_equal(batch["image"][row], expected["image"])
      images.setdefault(int(index), []).append(batch["image"][row])
  # The same example is augmented differently in epochs 0 and 1.
  assert all(not np.array_equal(*pair) for pair in images.values())


def test_iterator_state_is_a_small_json_dict(token_file):
  iterator = _tokens(token_file, seed=4)
  _take(iterator, 5)
  state = iterator.get_state()
  assert json.loads(json.dumps(state)) == state
  assert state["step"] == 5 and all(isinstance(v, (int, str)) for v in state.values())
  assert len(json.dumps(state)) < 200
  with pytest.raises(ValueError, match="seed"):
    _tokens(token_file, seed=5).restore(state)
  # A state saved before the grain pipeline (no 'order') resumes at its step.
  legacy = {key: value for key, value in state.items() if key != "order"}
  resumed = _tokens(token_file, seed=4)
  resumed.restore(legacy)
  assert resumed.get_state() == state


def test_num_workers_do_not_change_the_batches(block_folder):
  batches = [
      _take(data.create_dataset(_folder_config(*block_folder, num_workers=workers,
                                               prefetch_batches=prefetch),
                                split="train", process_index=0, process_count=1, seed=1), 4)
      for workers, prefetch in ((1, 0), (3, 2))]
  config = data.validate_config(_folder_config(*block_folder))
  in_calling_thread = data.BatchIterator(  # num_workers=0: no read threads at all.
      data.create_source(config, split="train"),
      data.preprocess_config(config, training=True), global_batch_size=4, seed=1,
      num_workers=0)
  batches.append(_take(in_calling_thread, 4))
  for other in batches[1:]:
    for first, second in zip(batches[0], other):
      _assert_batches_equal(first, second)


class _FlakySource:
  """Example i = {'x': [i, i]}; reading `broken` raises while `failing` is set."""

  path = "memory"

  def __init__(self, size, broken):
    self.size, self.broken, self.failing = size, broken, True

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    if self.failing and index == self.broken:
      raise OSError(f"transient read error at {index}")
    return {"x": np.full((2,), index, np.int32)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_failed_read_leaves_the_iterator_at_its_step(num_workers):
  make = lambda source: data.BatchIterator(source, None, global_batch_size=4, seed=0,
                                           num_workers=num_workers)
  expected = _take(make(_FlakySource(10, broken=-1)), 6)
  step_of = next(step for step, b in enumerate(expected) if 7 in b["index"])
  source = _FlakySource(10, broken=7)
  iterator = make(source)
  for batch in expected[:step_of]:
    _assert_batches_equal(next(iterator), batch)
  with pytest.raises(OSError, match="transient"):
    next(iterator)
  assert iterator.get_state()["step"] == step_of
  source.failing = False
  for batch in expected[step_of:]:
    _assert_batches_equal(next(iterator), batch)


def test_token_eval_is_one_padded_ordered_pass_and_train_resumes(tmp_path):
  path = _write_tokens(tmp_path / "tokens.npz", num=10, with_labels=False)
  parts = [_tokens(path, split="eval", process_index=p, process_count=2) for p in range(2)]
  batches = [list(part) for part in parts]
  assert [len(b) for b in batches] == [3, 3]  # ceil(10 / 4) steps.
  joined = [np.concatenate([b0["index"], b1["index"]]) for b0, b1 in zip(*batches)]
  valid = np.concatenate([np.concatenate([b0["valid"], b1["valid"]])
                          for b0, b1 in zip(*batches)])
  assert list(np.concatenate(joined)[valid]) == list(range(10)) and valid.sum() == 10
  assert set(batches[0][0]) == {"tokens", "index", "valid"}
  assert parts[0].element_spec["tokens"].shape == (2, 2, 3)

  uninterrupted = _take(_tokens(path, seed=9), 7)
  interrupted = _tokens(path, seed=9)
  _take(interrupted, 3)
  resumed = _tokens(path, seed=9)
  resumed.restore(json.loads(json.dumps(interrupted.get_state())))
  for expected in uninterrupted[3:]:
    _assert_batches_equal(next(resumed), expected)


# ------------------------------------------------------------------- IDX files


def _write_idx(path, array, *, compress=True):
  """An IDX file written from its definition (magic, dims, big-endian sizes, data)."""
  import gzip
  codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
  array = np.asarray(array)
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  opener = gzip.open if compress else open
  with opener(str(path) + (".gz" if compress else ""), "wb") as f:
    f.write(payload)


def _tiny_idx(tmp_path, num_train=10, num_eval=6):
  rng = np.random.default_rng(0)
  data = {}
  for split, (images, labels), count in (("train", IDX_STEMS["train"], num_train),
                                         ("eval", IDX_STEMS["eval"], num_eval)):
    pixels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
    classes = (np.arange(count) % 10).astype(np.uint8)
    _write_idx(tmp_path / images, pixels, compress=split == "train")
    _write_idx(tmp_path / labels, classes, compress=split == "train")
    data[split] = (pixels, classes)
  return data


IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "eval": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def test_read_idx_reads_what_the_format_defines_and_rejects_the_rest(tmp_path):
  from rvq_jax.data import read_idx
  array = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) - 5
  _write_idx(tmp_path / "a", array, compress=False)
  _write_idx(tmp_path / "b", array.astype(np.uint8) % 7)
  np.testing.assert_array_equal(read_idx(str(tmp_path / "a")), array)
  np.testing.assert_array_equal(read_idx(str(tmp_path / "b.gz")), array.astype(np.uint8) % 7)
  (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
  with pytest.raises(ValueError, match="not an IDX file"):
    read_idx(str(tmp_path / "bad"))
  (tmp_path / "short").write_bytes((tmp_path / "a").read_bytes()[:-4])
  with pytest.raises(ValueError, match=r"the header says \(2, 3, 4\)"):
    read_idx(str(tmp_path / "short"))


def test_idx_source_gives_labelled_rgb_images_padded_without_resampling(tmp_path):
  data = _tiny_idx(tmp_path)
  config = dict(source="idx", idx_path=str(tmp_path), image_size=32, idx_pad_to=32,
                random_crop=False, random_flip=False, num_workers=1)
  iterator = factory.create_dataset(config, split="eval", process_index=0, process_count=1,
                                    batch_size=4)
  batches = list(iterator)
  valid = np.concatenate([b["valid"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])[valid]
  labels = np.concatenate([b["label"] for b in batches])[valid]
  pixels, classes = data["eval"]
  np.testing.assert_array_equal(labels, classes)  # The t10k files, in order.
  assert images.shape == (6, 32, 32, 3)
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Gray replicated to RGB.
  uint8 = np.round((images[..., 0] + 1) * 127.5)
  np.testing.assert_array_equal(uint8[:, 2:30, 2:30], pixels)  # Centred, not resampled.
  assert (uint8[:, :2] == 0).all() and (uint8[:, :, 30:] == 0).all()
  source = factory.create_source(config, split="train")
  assert len(source) == 10 and source.num_classes == 10 and source.has_labels
  assert source.class_names[9] == "Ankle boot"


def test_missing_idx_files_name_the_package_and_the_tfds_alternative(tmp_path):
  config = dict(source="idx", idx_path=str(tmp_path), image_size=32)
  with pytest.raises(FileNotFoundError) as error:
    factory.create_source(config, split="train")
  assert "apt-get install -y dataset-fashion-mnist" in str(error.value)
  assert "data.source='tfds'" in str(error.value)
  with pytest.raises(ValueError, match="pad_to=20 is smaller"):
    _tiny_idx(tmp_path)
    factory.create_source(dict(config, idx_pad_to=20), split="train")
