"""gs:// workdirs: every file rvq_jax reads or writes goes through epath (rvq_jax/files.py).

A fake gs:// (tests/fake_gcs.py) stores `gs://bucket/...` under a local folder and is
reached only through epath, so a file that arrives there was written through epath; an
OS-level write to a gs:// path would fail or appear as a `gs:` folder in the working
directory, which every test here checks stays empty.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from rvq_jax import files
from rvq_jax.metrics import fid as fid_lib
from rvq_jax.metrics import inception as inception_lib
from tests import fake_gcs

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


@pytest.fixture
def cwd(tmp_path, monkeypatch):
  """An empty working directory: a local `gs:` folder would show up in it."""
  directory = tmp_path / "cwd"
  directory.mkdir()
  monkeypatch.chdir(directory)
  return directory


def _images(folder, count, seed, size=(20, 24)):
  os.makedirs(folder, exist_ok=True)
  for index in range(count):
    pixels = np.random.default_rng(seed + index).integers(0, 256, size + (3,), np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"img{index}.png"))


def test_files_round_trip_on_gs_and_name_a_bad_archive(tmp_path, cwd):
  with fake_gcs.fake_gcs(tmp_path / "gcs") as gcs:
    files.write_json("gs://bucket/a/metrics.json", {"step": 3})
    files.save_npz("gs://bucket/a/tokens.npz", {"indices": np.arange(6).reshape(2, 3)})
    files.save_png("gs://bucket/a/images/grid.png", np.full((4, 5, 1), 7, np.uint8))
    np.testing.assert_array_equal(files.load_npz("gs://bucket/a/tokens.npz")["indices"],
                                  np.arange(6).reshape(2, 3))
    assert files.is_file("gs://bucket/a/metrics.json")
    assert not files.is_file("gs://bucket/a/images")  # A directory.
    assert sorted(name for _, _, names in files.walk("gs://bucket/a") for name in names) == [
        "grid.png", "metrics.json", "tokens.npz"]
    files.write_bytes("gs://bucket/a/weights.npz", b"not a zip archive")
    with pytest.raises(ValueError, match="gs://bucket/a/weights.npz is not a readable .npz"):
      files.load_npz("gs://bucket/a/weights.npz")
    with pytest.raises(ValueError, match="must end in .npz"):
      files.save_npz("gs://bucket/a/tokens", {"x": np.zeros(1)})
    local = gcs.local("gs://bucket/a")
  with open(os.path.join(local, "metrics.json")) as f:
    assert json.load(f) == {"step": 3}
  assert np.asarray(Image.open(os.path.join(local, "images", "grid.png"))).max() == 7
  assert not list(cwd.iterdir())


def test_fid_reference_cache_on_gs_is_written_there_and_reused(tmp_path, cwd, reference_passes):
  """The review's bug: os.path.isfile was always False on gs:// and write_npz's abspath
  put the cache in ./gs:/..., so the statistics were recomputed on every evaluation."""
  data = dict(source="embedded", image_size=16, num_workers=1,
              embedded_eval_crops_per_photo=3, embedded_train_crops_per_photo=1)
  inception = inception_lib.random_inception(0, resize_to=75)
  with fake_gcs.fake_gcs(tmp_path / "gcs") as gcs:
    cache = "gs://bucket/run/fid_reference_eval.npz"
    mu, _ = fid_lib.reference_statistics(data, "eval", inception, cache, 4)
    again, _ = fid_lib.reference_statistics(data, "eval", inception, cache, 4)
    assert len(reference_passes) == 1  # The second call read the cache.
    np.testing.assert_array_equal(again, mu)
    assert os.path.isfile(gcs.local(cache))
  assert not list(cwd.iterdir())


_CONFIG = textwrap.dedent('''\
    from tests import tiny_configs

    def get_config(arg=None):
      config = tiny_configs.tiny_config(num_steps=2)
      config.stages = ("tokenizer", "ar")
      config.data.update(source="folder", path="gs://bucket/data/train",
                         eval_path="gs://bucket/data/eval")
      config.tokenizer.train.checkpoint_every = 1
      # A (random) FID Inception: the AR prior's evaluation caches the eval split's
      # statistics in the workdir.
      config.weights.update(random=True, inception="random")
      config.ar.model.update(width=32, depth=2, num_heads=2)
      config.ar.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=1,
                             eval_every=0, summary_every=0)
      config.ar.eval.update(batch_size=8, num_batches=1, generation_fd_vgg=False)
      config.ar.sample.num_samples = 4
      return config
''')

# What a run and the modes write, as the README's "What a run writes" lists it (the
# README must name each of these; `<step>` is the last step, 2).
ARTEFACTS = (
    "tokenizer/checkpoints/<step>/",
    "tokenizer/export/",
    "tokenizer/events.out.tfevents.*",
    "tokenizer/images/reconstructions_<step>.png",
    "tokenizer/images/eval_codebook_usage_<step>.png",
    "tokenizer/metrics.json",
    "tokenizer/eval_metrics.json",
    "tokenizer/tokens_<split>.npz",
    "ar/checkpoints/<step>/",
    "ar/export/",
    "ar/events.out.tfevents.*",
    "ar/images/samples_<step>.png",
    "ar/metrics.json",
    "ar/eval_metrics.json",
    "ar/samples/sample_<index>.png",
    "ar/samples/samples.npz",
    "fid_reference_eval.npz",
)


def _expand(pattern: str) -> str:
  return (pattern.replace("<step>", "0000002" if pattern.endswith(".png") else "2")
          .replace("<split>", "eval").replace("<index>", "00000"))


def test_train_eval_encode_sample_reconstruct_on_a_gs_workdir(tmp_path, cwd):
  """`python -m rvq_jax.main` end to end with --workdir=gs://bucket/run, data, inputs and
  outputs on gs:// too: every artefact lands in the bucket where the README says, the
  checkpoints and TensorBoard get the gs:// paths, and nothing is written locally."""
  root = tmp_path / "gcs"
  _images(root / "bucket" / "data" / "train", 8, seed=0)
  _images(root / "bucket" / "data" / "eval", 8, seed=100)
  _images(root / "bucket" / "photos" / "sub", 2, seed=200)
  config = tmp_path / "gcs_config.py"
  config.write_text(_CONFIG)
  common = [f"--config={config}", "--workdir=gs://bucket/run"]
  runs = [common,  # tokenizer, then the AR prior
          [*common, "--mode=eval"],
          [*common, "--mode=eval", "--stage=ar"],  # Reads the cached FID statistics.
          [*common, "--mode=encode", "--split=eval"],
          [*common, "--mode=sample", "--stage=ar", "--num_samples=2"],
          [*common, "--mode=reconstruct", "--input=gs://bucket/photos",
           "--output=gs://bucket/recon"],
          common]  # Both stages finished: main reads their metrics.json and skips them.
  record = tmp_path / "record.json"
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "_gcs_workdir_main.py"), str(root),
       str(record), json.dumps(runs)], cwd=cwd, env=env, capture_output=True, text=True,
      timeout=1500, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

  run = root / "bucket" / "run"
  for pattern in ARTEFACTS:
    found = sorted(run.glob(_expand(pattern).rstrip("/")))
    assert found, f"{pattern} is missing; the run wrote {sorted(run.rglob('*'))}"
  assert (run / "tokenizer" / "checkpoints" / "2" / "state").is_dir()
  with np.load(run / "tokenizer" / "tokens_eval.npz") as tokens:
    assert tokens["indices"].shape == (8, 4, 4)
  with np.load(run / "ar" / "samples" / "samples.npz") as samples:
    assert len(samples["tokens"]) == 2
  assert json.loads((run / "tokenizer" / "eval_metrics.json").read_text())["step"] == 2
  # The stage's evaluation wrote the reference statistics once; --mode=eval read them.
  reference = fid_lib.load_reference(str(run / "fid_reference_eval.npz"))
  assert reference.count == 8
  assert sorted(os.listdir(root / "bucket" / "recon")) == ["sub_img0.png", "sub_img1.png"]

  recorded = json.loads(record.read_text())
  assert recorded["orbax"] and all(d.startswith("gs://bucket/run/") for d in recorded["orbax"])
  assert set(recorded["tensorboard"]) == {"gs://bucket/run/tokenizer", "gs://bucket/run/ar"}
  assert not list(cwd.iterdir()), "files were written to the working directory"

  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  for pattern in ARTEFACTS:
    assert f"`{pattern}`" in readme, f"README's 'What a run writes' does not list {pattern}"
