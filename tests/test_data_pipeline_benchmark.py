"""benchmarks/data_pipeline.py on a tiny image folder: the timed pipeline is the loop's,
its counts are the batches it really read, and the record and table have every field."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import data_pipeline
from rvq_jax.data import factory as data_factory
from rvq_jax.train import loop

BATCH = 8  # Divisible by the 8 simulated devices of the loop's mesh.


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  folder = data_pipeline.write_image_folder(str(tmp_path_factory.mktemp("images")), 24,
                                            size=48, fmt="jpeg")
  config = data_pipeline.dataset_config("folder256", folder=folder)
  config.data.update(image_size=32, num_workers=2, prefetch_batches=1)
  config.tokenizer.train.batch_size = BATCH
  return config


def _assert_same_batch(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_the_timed_iterator_is_the_loops_for_every_worker_setting(config):
  # What TokenizerStage.train_iterator builds.
  with data_factory.create_dataset(config.data, split="train", process_index=0,
                                   process_count=1, seed=config.seed,
                                   batch_size=BATCH) as loop_iterator:
    expected = [next(loop_iterator) for _ in range(4)]  # 24 images: crosses an epoch.
  for workers, prefetch in ((0, 0), (1, 2), (2, 1)):
    with data_pipeline.iterator_for(config, num_workers=workers,
                                    prefetch_batches=prefetch) as iterator:
      assert (iterator.num_workers, iterator.prefetch_batches) == (workers, prefetch)
      for want in expected:
        _assert_same_batch(next(iterator), want)


@pytest.mark.parametrize("workers", [0, 2])
def test_measure_pipeline_counts_what_it_read(config, workers):
  iterator = data_pipeline.iterator_for(config, num_workers=workers, prefetch_batches=1)
  row = data_pipeline.measure_pipeline(iterator, data_pipeline.loop_mesh(config),
                                       warmup_batches=2, min_batches=5, min_seconds=0.0)
  assert row["batches"] == 5 and row["batch"] == BATCH
  assert row["images"] == row["batches"] * BATCH
  # The iterator really advanced by the warm-up and timed batches, no more, no less.
  assert iterator.get_state()["step"] == row["warmup_batches"] + row["batches"]
  assert row["num_workers"] == workers and row["prefetch_batches"] == 1
  assert row["seconds"] > 0
  assert row["images_per_s"] == pytest.approx(row["images"] / row["seconds"])
  for key in ("images_per_s", "iterator_images_per_s", "next_s_per_batch",
              "transfer_s_per_batch", "cpu_ms_per_image"):
    assert row[key] > 0, key
  json.dumps(row)


def test_worker_settings_include_the_configs_own(config):
  own = (config.data.num_workers, config.data.prefetch_batches)
  for quick in (True, False):
    settings = data_pipeline.worker_settings(config, quick)
    assert own in settings and (0, 0) in settings
    assert len(settings) == len(set(settings))


def test_fed_steps_and_the_table(config):
  mesh = data_pipeline.loop_mesh(config)
  iterator = data_pipeline.iterator_for(config, num_workers=2, prefetch_batches=1)
  first = next(iterator)
  batch = loop.global_batch(first, mesh)

  def step(state, constants, batch, key, step):
    del constants, key, step
    return state + 1, {"loss": jnp.mean(batch["image"])}

  with jax.set_mesh(mesh):
    compiled = jax.jit(step).lower(jnp.zeros(()), None, batch, None, None).compile()
  built = {"compiled": compiled, "state": jnp.zeros(()),
           "constants": None, "batch": batch, "key": None, "step": None, "mesh": mesh,
           "compile_s": 0.1, "gflop_per_step": 1.0, "phase": "False", "batch_size": BATCH}
  step_row = data_pipeline.measure_step(built, 2)
  assert step_row["steps"] == 2 and step_row["images_per_s"] > 0
  fed = data_pipeline.measure_fed_steps(built, iterator, steps_per_block=2, rounds=2)
  # 1 warm-up + 2 timed, then 2 rounds of a fed and a fixed block of 2 steps.
  assert int(built["state"]) == 3 + 2 * 2 * 2
  assert iterator.get_state()["step"] == 1 + 2 * 2  # The first batch, then one per fed step.
  assert len(fed["fed_times_s"]) == len(fed["fixed_times_s"]) == 2
  assert fed["fed_step_s"] > 0 and fed["slowdown"] > 0

  pipeline_row = data_pipeline.measure_pipeline(
      data_pipeline.iterator_for(config, num_workers=2, prefetch_batches=1), mesh,
      warmup_batches=1, min_batches=2, min_seconds=0.0)
  entry = {"dataset": "folder256", "source": "folder", "image_size": 32, "batch": BATCH,
           "config_workers": {"num_workers": 2, "prefetch_batches": 1},
           "pipeline": [pipeline_row], "step": {**step_row, "model": "config"},
           "ratio_config_workers": pipeline_row["images_per_s"] / step_row["images_per_s"],
           "ratio_min_setting": 1.0, "break_even_tflop_per_s": 1.0, "fed": fed}
  record = {"settings": {"quick": False, "folder_images": 24, "min_seconds": 0.0},
            "environment": {"description": "test", "jax": jax.__version__},
            "datasets": [entry]}
  text = data_pipeline.markdown(record)
  assert text.startswith(data_pipeline.BEGIN) and text.endswith(data_pipeline.END)
  assert "| folder256 | folder | 32 | 8 | 2 (config) | 1 |" in text
  assert f"| {pipeline_row['cpu_ms_per_image']:.2f} |" in text
  json.dumps(record)
