"""Bad inputs a new user tries: each ends in a clear error that names the key, file or
value and the fix, before anything compiles, with a non-zero exit and any checkpoint
untouched; and inputs that can be skipped (unreadable images) are skipped and reported,
never given another image's output.

The command-line cases start `python -m rvq_jax.main` with `tests/cli_config.py`: a
user sees one `rvq_jax: error:` line on stderr (exit 2), no traceback, no log line
repeating it.
"""
import io
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from rvq_jax import config as config_lib
from rvq_jax import parallel
from rvq_jax.data import factory as data_factory
from rvq_jax.data import sources
from rvq_jax.data.iterator import BatchIterator
from rvq_jax.models import pretrained
from rvq_jax.train import checkpoint as checkpoint_lib
from rvq_jax.train import inference
from rvq_jax.train import loop
from rvq_jax.train.tokenizer_stage import TokenizerStage
from tests import test_loop
from tests import tiny_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "tests/cli_config.py"


def _main(*args, timeout=600):
  """`python -m rvq_jax.main ARGS` on one CPU device; the CompletedProcess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  for name in ("RVQ_JAX_COORDINATOR", "RVQ_JAX_INIT"):
    env.pop(name, None)
  return subprocess.run([sys.executable, "-m", "rvq_jax.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _one_error_line(result) -> str:
  """The single `rvq_jax: error:` message of a failed run (exit 2, nothing else of it)."""
  stderr = result.stderr
  assert result.returncode == 2, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  assert "cannot schedule new futures" not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("rvq_jax: error:")]
  assert len(errors) == 1, stderr[-3000:]
  # Printed once: not also as an absl error log line (E1201 12:00:00 ...).
  assert not re.search(r"^E\d{4} ", stderr, re.MULTILINE), stderr[-3000:]
  return stderr[stderr.index("rvq_jax: error:"):]


def _images(folder, count, size=24, *, seed=0):
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for index in range(count):
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
        folder / f"img{index}.png")
  return str(folder)


def _truncated_png(path, *, seed=99):
  """A PNG cut in half: it passes the header check, and fails to decode."""
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 24, 3), np.uint8)).save(
      buffer, format="PNG")
  path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])


# ------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  return _images(tmp_path_factory.mktemp("images"), 10)


CLI_CASES = {
    "misspelt key": (["--config.tokenizer.quantizer.regvq.mask_ratoi=0.4"],
                     ["'mask_ratoi'", "--config.tokenizer.quantizer.regvq.mask_ratoi",
                      "'mask_ratio'"]),
    "negative learning rate": (["--config.tokenizer.optim.learning_rate=-1e-4"],
                               ["tokenizer.optim.learning_rate=-0.0001", "> 0"]),
    "nan learning rate": (["--config.ar.optim.learning_rate=nan"],
                          ["ar.optim.learning_rate=nan", "finite"]),
    "negative loss weight": (["--config.tokenizer.loss.l1_weight=-1"],
                             ["tokenizer.loss.l1_weight=-1.0", ">= 0"]),
    "adapter heads": (["--config.tokenizer.quantizer.kind=fq",
                       "--config.tokenizer.model.adapter_heads=5"],
                      ["tokenizer.model.adapter_heads=5", "adapter width 64",
                       "tokenizer.model.ch=32"]),
    "no eval folder": (["--config.data.source=folder", "--config.data.path={images}"],
                       ["eval_path", "'eval' split"]),
    "missing eval folder": (["--config.data.source=folder", "--config.data.path={images}",
                             "--config.data.eval_path={missing}"],
                            ["data.eval_path='{missing}'", "does not exist"]),
    "missing train folder": (["--config.data.source=folder", "--config.data.path={missing}",
                              "--config.data.eval_path={images}"],
                             ["data.path='{missing}'", "does not exist"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_a_bad_config_is_one_error_line_before_anything_is_built(tmp_path, image_folder,
                                                                 case):
  args, wanted = CLI_CASES[case]
  names = dict(images=image_folder, missing=str(tmp_path / "no_such_folder"))
  workdir = tmp_path / "run"
  result = _main(f"--config={CONFIG}", f"--workdir={workdir}",
                 *(arg.format(**names) for arg in args))
  message = _one_error_line(result)
  for text in wanted:
    assert text.format(**names) in message, message
  assert not workdir.exists(), "it must stop before creating anything"


def test_a_missing_config_file_is_one_error_line(tmp_path):
  message = _one_error_line(_main("--config=configs/no_such_config.py",
                                  f"--workdir={tmp_path}"))
  assert "configs/no_such_config.py" in message and "No such file" in message


def test_a_prior_without_a_tokenizer_is_one_error_line(tmp_path):
  """The error, and nothing after it: no orbax thread failing at interpreter exit."""
  message = _one_error_line(_main(f"--config={CONFIG}:ar", f"--workdir={tmp_path}"))
  assert "no tokenizer export or checkpoint" in message and "Train it first" in message
  assert not (tmp_path / "ar").exists()


def test_untrained_stages_warn_and_sample_says_where_it_wrote(tmp_path):
  """num_steps=0 marks a stage finished with its initial model: said on stderr. The
  `sample` mode then prints where it wrote what, and those files exist."""
  workdir = tmp_path / "run"
  result = _main(f"--config={CONFIG}:tokenizer,ar", f"--workdir={workdir}",
                 "--config.tokenizer.train.num_steps=0", "--config.ar.train.num_steps=0")
  assert result.returncode == 0, result.stderr[-3000:]
  for stage in ("tokenizer", "ar"):
    assert re.search(rf"{stage}\.train\.num_steps=0: .*untrained", result.stderr), stage
  output = tmp_path / "samples"
  result = _main(f"--config={CONFIG}:tokenizer,ar", f"--workdir={workdir}", "--mode=sample",
                 "--stage=ar", "--num_samples=2", f"--output={output}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"wrote 2 ar samples to {output}" in result.stdout, result.stdout
  assert sorted(os.listdir(output)) == ["sample_00000.png", "sample_00001.png",
                                        "samples.npz"]


# ------------------------------------------------------------------- config


def test_every_rate_weight_and_schedule_value_is_checked():
  """A NaN passes `x < 0` tests and a negative rate trains by gradient ascent: every
  rate, weight and schedule value is checked for a finite value and its sign, by name."""
  bad = {
      "tokenizer.optim.learning_rate": (0.0, float("nan")),
      "tokenizer.optim.disc_learning_rate": (-1e-4, float("inf")),
      "ar.optim.learning_rate": (-3e-4, float("nan")),
      "diffusion.optim.weight_decay": (-0.01, float("nan")),
      "tokenizer.optim.b2": (1.0, float("nan")),
      "tokenizer.optim.grad_clip": (-1.0, float("nan")),
      "tokenizer.optim.warmup_steps": (-5,),
      "tokenizer.loss.perceptual_weight": (-1.0, float("nan")),
      "tokenizer.loss.disc_factor": (-1.0,),
      "tokenizer.loss.pcl_tau": (0.0, float("nan")),
      "tokenizer.loss.disc_start": (-1,),
      "diffusion.loss.aux_weight": (-5e-4, float("nan")),
      "tokenizer.quantizer.regvq.prior_kl_weight": (float("nan"),),
      "tokenizer.quantizer.regvq.temperature_start": (float("nan"),),
      "tokenizer.train.ema_decay": (float("nan"),),
      "ar.train.eval_every": (-1,),
  }
  for key, values in bad.items():
    for value in values:
      config = config_lib.base_config()
      *parents, leaf = key.split(".")
      block = config
      for parent in parents:
        block = block[parent]
      block[leaf] = value
      with pytest.raises(ValueError) as error:
        config_lib.validate(config)
      assert f"{key}={value!r}" in str(error.value) or f"{key}={value}" in str(error.value), (
          key, value, str(error.value))
  config_lib.validate(config_lib.base_config())  # The defaults pass.


def test_messages_name_the_keys_and_values():
  config = config_lib.base_config()
  config.tokenizer.quantizer.update(num_codes=0, code_dim=-2)
  config.mesh.axes = ("data", "model")
  with pytest.raises(ValueError) as error:
    config_lib.validate(config)
  message = str(error.value)
  assert "tokenizer.quantizer.num_codes=0" in message
  assert "tokenizer.quantizer.code_dim=-2" in message
  assert "mesh.shape=(-1, 1, 1)" in message and "mesh.axes=('data', 'model')" in message


def test_a_mesh_that_leaves_devices_idle_is_warned_about(caplog):
  assert jax.device_count() == 8
  with caplog.at_level("WARNING"):
    mesh = parallel.make_mesh((3, 1, 1))
  assert mesh.devices.size == 3
  assert any("uses 3 of the 8 devices" in record.getMessage() for record in caplog.records)
  caplog.clear()
  with caplog.at_level("WARNING"):
    parallel.make_mesh((-1, 1, 1))
  assert not any("devices" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------- data


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
  ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
  buffer = io.BytesIO()
  Image.fromarray(ramp).save(buffer, format="PNG")
  with Image.open(io.BytesIO(buffer.getvalue())) as image:
    assert image.mode.startswith("I")  # PIL reads it as 16-bit, the case under test.
  decoded = sources.decode_image(buffer.getvalue())
  assert decoded.shape == (64, 64, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])
  np.testing.assert_allclose(decoded[..., 0], ramp / 257.0, atol=0.5 + 1e-6)
  assert (decoded == 255).mean() < 0.01  # Clipping made ~99 % of these pixels 255.


def test_a_folder_of_corrupt_files_says_so(tmp_path):
  """A truncated PNG passes the header check; too few examples for a batch are decoded
  at once, so the error reports unreadable files, not a small folder."""
  folder = tmp_path / "corrupt"
  folder.mkdir()
  _truncated_png(folder / "cut.png")
  (folder / "text.png").write_bytes(b"not an image")
  config = dict(source="folder", path=str(folder), eval_path=str(folder), image_size=16,
                batch_size=8, num_workers=1)
  with pytest.raises(ValueError) as error:
    data_factory.create_dataset(config, split="train", process_index=0, process_count=1)
  message = str(error.value)
  assert "no readable examples" in message and str(folder) in message
  assert "2 image files are unreadable" in message
  _images(folder, 3)
  with pytest.raises(ValueError, match="has 3 readable examples .*fewer than the global "
                                       "batch size 8"):
    data_factory.create_dataset(config, split="train", process_index=0, process_count=1)


def test_a_weight_file_that_is_not_a_zip_is_named(tmp_path):
  path = tmp_path / "vgg16_lpips.npz"
  path.write_bytes(b"\x80\x04 a pickle, or anything else")
  with pytest.raises(ValueError) as error:
    pretrained.read_npz(path)
  assert str(path) in str(error.value) and "allow_pickle" not in str(error.value)
  with pytest.raises(FileNotFoundError):
    pretrained.read_npz(tmp_path / "missing.npz")


def test_an_unreadable_example_leaves_an_invalid_row_not_a_duplicate(tmp_path):
  """The row of a file that fails to decode keeps the batch's shape but is invalid, so
  no evaluation counts it and no inference gives it an output."""
  folder = tmp_path / "mixed"
  _images(folder, 4)
  _truncated_png(folder / "img1_cut.png")  # Sorted between img1 and img2: index 2.
  source = sources.FolderSource(str(folder))
  assert source.relative_paths[2] == "img1_cut.png"
  preprocess = data_factory.preprocess_config(
      data_factory.validate_config(dict(image_size=16)), training=False)
  with BatchIterator(source, preprocess, global_batch_size=8, shuffle=False, num_epochs=1,
                     drop_remainder=False, num_workers=0) as batches:
    batch = next(batches)
  np.testing.assert_array_equal(batch["index"][:5], [0, 1, 2, 3, 4])
  np.testing.assert_array_equal(batch["valid"], [True, True, False, True, True] + [False] * 3)
  assert [name for name, _ in source.unreadable()] == ["img1_cut.png"]


# ----------------------------------------------------------- inference modes


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
  config = tiny_configs.tiny_config("regvq", num_steps=1)
  config_lib.validate(config)
  workdir = str(tmp_path_factory.mktemp("tokenizer"))
  loop.run(TokenizerStage(config), loop.loop_config_from(config), workdir)
  return config, workdir


def test_reconstruct_and_encode_skip_corrupt_inputs_and_report_them(tmp_path,
                                                                    trained_tokenizer,
                                                                    caplog):
  config, workdir = trained_tokenizer
  clean = tmp_path / "clean"
  _images(clean, 5)
  mixed = tmp_path / "mixed"
  _images(mixed, 5)
  _truncated_png(mixed / "img0_bad.png")  # Index 1: between img0 and img1.

  assert inference.reconstruct(config, workdir, str(clean), str(tmp_path / "out_clean")) == 5
  with caplog.at_level("WARNING"):
    written = inference.reconstruct(config, workdir, str(mixed), str(tmp_path / "out_mixed"))
  assert written == 5
  assert sorted(os.listdir(tmp_path / "out_mixed")) == sorted(os.listdir(tmp_path / "out_clean"))
  for name in os.listdir(tmp_path / "out_clean"):  # Each image got its own output.
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out_mixed" / name)),
                                  np.asarray(Image.open(tmp_path / "out_clean" / name)))
  assert any("img0_bad.png" in record.getMessage() and "no output" in record.getMessage()
             for record in caplog.records)

  def encoded(folder):
    folder_config = config.copy_and_resolve_references()
    folder_config.data.update(source="folder", path=str(folder), eval_path=str(folder))
    return np.load(inference.encode(folder_config, workdir, "eval", str(folder) + ".npz"))

  want, got = encoded(clean), encoded(mixed)
  # Source indices: clean 0..4; mixed 0, 2..5 (1 is the corrupt file), the same images.
  np.testing.assert_array_equal(got["index"], [0, 2, 3, 4, 5])
  np.testing.assert_array_equal(got["indices"], want["indices"])


# --------------------------------------------------------------------- loop


class _FailingEval(test_loop._Stage):
  """The toy stage whose evaluation fails (bad eval data found late)."""

  def eval_batches(self, process_index, process_count):
    raise ValueError("the eval split cannot be read")


def test_an_exception_never_loses_the_save_of_its_step(tmp_path):
  """Evaluation and a checkpoint fall on the same step, asynchronously saved: the
  evaluation fails, and the checkpoint is complete (no `*.orbax-checkpoint-tmp`)."""
  workdir = str(tmp_path / "run")
  config = test_loop._config(checkpoint_every=2, eval_every=2, asynchronous_checkpoints=True)
  with pytest.raises(ValueError, match="cannot be read"):
    loop.run(_FailingEval(), config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  _, _, _, step = loop.load_trained(test_loop._Stage(), test_loop._config(), workdir)
  assert step == 2


class _WiderContainer(nnx.Module):
  def __init__(self, rngs):
    self.model = nnx.Linear(4, 2, rngs=rngs)
    self.optimizer = nnx.Optimizer(self.model, optax.sgd(0.1), wrt=nnx.Param)


class _Wider(test_loop._Stage):
  """The toy stage with another architecture: two outputs instead of one."""

  def create(self, rngs):
    return _WiderContainer(rngs)


class _Counted(test_loop._Batches):
  def __init__(self, num_examples):
    super().__init__()
    self.num_examples = num_examples

  def get_state(self):
    return {"step": self.step, "num_examples": self.num_examples}


class _OtherData(test_loop._Stage):
  def __init__(self, num_examples):
    super().__init__()
    self.num_examples = num_examples

  def train_iterator(self, process_index, process_count):
    return _Counted(self.num_examples)


def _files(directory):
  return {os.path.join(root, name): os.path.getmtime(os.path.join(root, name))
          for root, _, names in os.walk(directory) for name in names}


def test_resuming_after_an_architecture_change_names_the_parameter(tmp_path):
  workdir = str(tmp_path / "run")
  loop.run(test_loop._Stage(), test_loop._config(num_steps=2), workdir)
  before = _files(os.path.join(workdir, "checkpoints"))
  with pytest.raises(checkpoint_lib.CheckpointMismatchError) as error:
    loop.run(_Wider(), test_loop._config(num_steps=4), workdir)
  message = str(error.value)
  assert "model/kernel has shape (4, 1) in the checkpoint, (4, 2) in this config" in message
  assert "new --workdir" in message and "strict=False" not in message
  assert _files(os.path.join(workdir, "checkpoints")) == before


def test_resuming_after_a_data_change_says_what_changed_and_the_flag(tmp_path):
  workdir = str(tmp_path / "run")
  loop.run(_OtherData(10), test_loop._config(num_steps=2), workdir)
  before = _files(os.path.join(workdir, "checkpoints"))
  with pytest.raises(ValueError) as error:
    loop.run(_OtherData(12), test_loop._config(num_steps=4), workdir)
  message = str(error.value)
  assert "num_examples 10 → 12" in message and "--accept_data_change" in message
  assert "Restore {'step'" not in message
  assert _files(os.path.join(workdir, "checkpoints")) == before
  # The documented way on: continue from the checkpoint's step with the new data.
  loop.run(_OtherData(12), test_loop._config(num_steps=4, accept_data_change=True), workdir)
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["step"] == 4
