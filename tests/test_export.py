"""Params-only exports and the public API over them (`rvq_jax.Tokenizer`, `rvq_jax.Prior`):
they give exactly what the training stages compute (the EMA weights when kept), on any
mesh and batch size; the priors and the inference modes use them and need no pretrained
network's file; an older run without exports gets them from its checkpoints; and the
README's example runs on a trained run."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import rvq_jax
from rvq_jax import config as config_lib
from rvq_jax import export as export_lib
from rvq_jax import parallel
from rvq_jax.train import inference
from rvq_jax.train import loop
from rvq_jax.train import prior_inference
from rvq_jax.train import prior_stage
from rvq_jax.train import stages
from rvq_jax.train import tokenizer_stage
from rvq_jax.train.prior_stage import sample_options
from rvq_jax.train.prior_stage import sample_tokens
from tests import tiny_configs

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _config():
  """Tiny tokenizer with an EMA copy (decay 0.5: after 2 steps it differs from the model)
  and tiny priors; no generation metrics in their evaluation."""
  config = tiny_configs.tiny_config(num_steps=2)
  config.tokenizer.train.update(ema_decay=0.5, checkpoint_every=1)
  for name in ("ar", "diffusion"):
    prior = config[name]
    prior.model.update(width=32, depth=2, num_heads=2)
    prior.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=1,
                       eval_every=0, summary_every=0)
    prior.eval.update(batch_size=8, num_batches=1, generation_fd_vgg=False)
    prior.sample.num_samples = 4
  config.diffusion.model.num_timesteps = 8
  config_lib.validate(config)
  return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A trained tokenizer and AR prior in <root>/runs/demo, as `main` leaves them."""
  root = tmp_path_factory.mktemp("export_run")
  workdir = root / "runs" / "demo"
  config = _config()
  loop.run(stages.build(config, "tokenizer"), loop.loop_config_from(config),
           str(workdir / "tokenizer"))
  loop.run(stages.build(config, "ar", workdir=str(workdir)), loop.loop_config_from(config, "ar"),
           str(workdir / "ar"))
  return types.SimpleNamespace(root=root, workdir=workdir, config=config)


def _single_device_mesh():
  return parallel.make_mesh((1, 1, 1), parallel.DEFAULT_MESH_AXES)


def _trained_tokenizer(config, workdir):
  """The tokenizer stage's train state from its last checkpoint, as evaluation sees it."""
  stage = tokenizer_stage.TokenizerStage(config)
  container, _, _, step = loop.load_trained(stage, loop.loop_config_from(config),
                                            str(workdir / "tokenizer"))
  return stage, container, step


def _eval_images(stage):
  batch = next(stage.eval_batches(0, 1))
  return np.asarray(batch["image"])  # [8, 16, 16, 3] in [-1, 1]


def _pure(module, drop=()):
  variables = nnx.to_pure_dict(nnx.state(module))
  for name in drop:
    variables.pop(name, None)
  return jax.tree.map(np.asarray, variables)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_finished_tokenizer_exports_its_ema_weights(run):
  metadata = export_lib.read_metadata(run.workdir / "tokenizer" / "export")
  assert (metadata["kind"], metadata["step"], metadata["weights"]) == ("tokenizer", 2, "ema")
  assert metadata["tokens"] == {"vocab_size": 16, "num_subtokens": 1, "grid_size": [4, 4]}
  _, container, step = _trained_tokenizer(run.config, run.workdir)
  assert step == 2
  # The public loader accepts the stage's directory as well as the export folder.
  tokenizer = rvq_jax.Tokenizer.load(run.workdir / "tokenizer", mesh=_single_device_mesh())
  exported = _pure(tokenizer.module)
  _assert_trees_equal(exported, _pure(container.ema_model))
  model = _pure(container.model)
  assert any(not np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(model))), (
      "the EMA copy equals the model: the test cannot tell which was exported")
  # Only the weights: no discriminator or optimizer state in the export.
  assert set(exported) == set(model)


def test_encode_and_decode_equal_what_training_computes(run):
  """encode = the tokens the prior stage trains on, reconstruct = the tokenizer stage's
  eval reconstructions, decode(encode(x)) = those up to float rounding: on one device,
  on 8 (a batch padded from 5 rows) and on data=4 × fsdp=2 in chunks of 3."""
  stage, container, _ = _trained_tokenizer(run.config, run.workdir)
  images = _eval_images(stage)
  reference = np.clip(np.asarray(nnx.jit(lambda m, x: m(x, deterministic=True)[0])(
      stage.eval_model(container), images)), -1, 1)
  prior = stages.build(run.config, "ar", workdir=str(run.workdir))
  training_tokens = jax.jit(lambda constants, batch: prior.inputs(constants, batch)[0])(
      prior.constants(), {"image": images})
  training_tokens = np.asarray(training_tokens).reshape(len(images), 4, 4)

  tokenizer = rvq_jax.Tokenizer.load(run.workdir / "tokenizer" / "export",
                                     mesh=_single_device_mesh())
  tokens = tokenizer.encode(images)
  assert tokens.dtype == jnp.int32 and tokens.shape == (8, 4, 4)
  np.testing.assert_array_equal(np.asarray(tokens), training_tokens)
  np.testing.assert_allclose(np.asarray(tokenizer.reconstruct(images)), reference, atol=1e-6)
  decoded = np.asarray(tokenizer.decode(tokens))
  np.testing.assert_allclose(decoded, reference, atol=1e-5)
  assert decoded.min() >= -1 and decoded.max() <= 1

  everywhere = rvq_jax.Tokenizer.load(run.workdir / "tokenizer" / "export")  # 8 devices
  assert everywhere.mesh.devices.size == 8
  np.testing.assert_array_equal(np.asarray(everywhere.encode(images[:5])), training_tokens[:5])
  # uint8 images are mapped to [-1, 1] as the data pipeline does.
  pixels = np.round((images + 1) * 127.5).astype(np.uint8)
  np.testing.assert_array_equal(
      np.asarray(everywhere.encode(pixels)),
      np.asarray(tokenizer.encode(pixels.astype(np.float32) / 127.5 - 1)))
  as_uint8 = everywhere.decode(tokens[:5], uint8=True)
  assert as_uint8.dtype == jnp.uint8
  # Off by one at most where float rounding on 8 devices crosses a .5.
  np.testing.assert_allclose(np.asarray(as_uint8, np.float32),
                             np.round((decoded[:5] + 1) * 127.5), atol=1)

  mesh = parallel.make_mesh((4, 2, 1), parallel.DEFAULT_MESH_AXES)
  sharded = rvq_jax.Tokenizer.load(run.workdir / "tokenizer", mesh=mesh, batch_size=3)
  np.testing.assert_allclose(np.asarray(sharded.reconstruct(images)), reference, atol=1e-5)


def test_any_batch_size_compiles_once_and_bad_inputs_are_named(run):
  tokenizer = rvq_jax.Tokenizer.load(run.workdir / "tokenizer", mesh=_single_device_mesh(),
                                     batch_size=4)
  images = np.zeros((8, 16, 16, 3), np.float32)
  for count in (1, 3, 5, 8):
    assert tokenizer.encode(images[:count]).shape == (count, 4, 4)
  assert tokenizer._encode._cache_size() == 1  # noqa: SLF001  (one padded shape: 4 rows)
  with pytest.raises(ValueError, match=r"images must be \[B, 16, 16, 3\]"):
    tokenizer.encode(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="float in .* or uint8"):
    tokenizer.encode(np.zeros((2, 16, 16, 3), np.int32))
  with pytest.raises(ValueError, match=r"tokens must lie in \[0, 16\)"):
    tokenizer.decode(np.full((2, 4, 4), 16))
  with pytest.raises(ValueError, match=r"tokens must be \[B, 4, 4\]"):
    tokenizer.decode(np.zeros((2, 16), np.int32))
  with pytest.raises(ValueError, match="not a tokenizer's"):
    rvq_jax.Tokenizer.load(run.workdir / "ar" / "export")


def test_prior_export_samples_what_the_trained_prior_samples(run):
  """Prior.load finds its tokenizer; its weights are the last checkpoint's model, and
  sample(seed) equals the stage's own sampling with that key: deterministic, in range,
  decoded by the tokenizer."""
  metadata = export_lib.read_metadata(run.workdir / "ar" / "export")
  assert metadata["step"] == 2 and metadata["condition"] == "none"
  assert metadata["tokenizer"]["path"] == str((run.workdir / "tokenizer" / "export").absolute())
  prior = rvq_jax.Prior.load(run.workdir / "ar" / "export", mesh=_single_device_mesh())
  assert prior.tokenizer is not None and prior.tokenizer.step == 2
  stage = stages.build(run.config, "ar", workdir=str(run.workdir))
  container, _, _, _ = loop.load_trained(stage, loop.loop_config_from(run.config, "ar"),
                                         str(run.workdir / "ar"))
  _assert_trees_equal(_pure(prior.module), _pure(container.model))

  first = prior.sample(5, seed=3)
  assert first.tokens.shape == (5, 4, 4) and first.tokens.dtype == jnp.int32
  tokens = np.asarray(first.tokens)
  assert tokens.min() >= 0 and tokens.max() < 16
  assert first.images.shape == (5, 16, 16, 3)
  np.testing.assert_array_equal(np.asarray(first.images),
                                np.asarray(prior.tokenizer.decode(first.tokens)))
  again = prior.sample(5, seed=3)
  np.testing.assert_array_equal(np.asarray(again.tokens), tokens)
  np.testing.assert_array_equal(np.asarray(again.images), np.asarray(first.images))
  assert not np.array_equal(np.asarray(prior.sample(5, seed=4, decode=False).tokens), tokens)
  options = tuple(sorted(sample_options(run.config, "ar").items()))
  np.testing.assert_array_equal(
      np.asarray(sample_tokens(container.model, jax.random.key(3), None, stage.layout, 5,
                               options)), tokens)
  with pytest.raises(ValueError, match="takes no option"):
    prior.sample(2, num_steps=3)
  with pytest.raises(ValueError, match="'none' takes condition=None"):
    prior.sample(2, condition=np.zeros(2, np.int32))


def test_class_conditions_are_checked_and_steer_the_samples():
  """A class-conditional prior (random weights, no run needed): labels outside
  [0, num_classes) and a missing tokenizer are named; a guidance scale reaches the
  sampler (different samples for the same seed)."""
  config = _config()
  layout = export_lib.layout_of({"tokens": {"vocab_size": 16, "num_subtokens": 1,
                                            "grid_size": [4, 4]}})
  metadata = export_lib.prior_metadata(kind="ar", settings=config.ar, condition="class",
                                       num_classes=2, layout=layout, step=0, tokenizer=None)
  module = export_lib.prior_module(metadata, rngs=nnx.Rngs(0))
  prior = rvq_jax.Prior(module, metadata, _single_device_mesh(), None,
                        tokenizer_searched=("nowhere/tokenizer/export",))
  with pytest.raises(ValueError, match=r"condition values must lie in \[0, 2\)"):
    prior.sample(3, condition=[0, 1, 2], decode=False)
  with pytest.raises(ValueError, match="needs a condition"):
    prior.sample(3, decode=False)
  with pytest.raises(ValueError, match="no tokenizer .* nowhere/tokenizer/export"):
    prior.sample(3, condition=[0, 1, 1])
  plain = prior.sample(3, condition=[0, 1, 1], seed=1, decode=False).tokens
  assert plain.shape == (3, 4, 4) and samples_in_range(plain, 16)
  guided = prior.sample(3, condition=[0, 1, 1], seed=1, decode=False, guidance_scale=3.0)
  assert not np.array_equal(np.asarray(guided.tokens), np.asarray(plain))


def samples_in_range(tokens, vocab_size):
  tokens = np.asarray(tokens)
  return tokens.min() >= 0 and tokens.max() < vocab_size


def test_a_run_without_exports_gets_them_from_its_checkpoints(run, tmp_path, monkeypatch):
  """A copy of the run without its export folders (an older run): the public loader
  says how to make one; a prior writes the tokenizer's from its checkpoint reading the
  weights alone (no training stage), `--mode=export`'s function the prior's; both equal
  the exports written at the end of training."""
  workdir = tmp_path / "old"
  for stage in ("tokenizer", "ar"):
    shutil.copytree(run.workdir / stage, workdir / stage,
                    ignore=shutil.ignore_patterns("export"))
  with pytest.raises(FileNotFoundError, match="--mode=export"):
    rvq_jax.Tokenizer.load(workdir / "tokenizer")

  def no_training_stage(*args, **kwargs):
    raise AssertionError("the tokenizer's training stage was built")

  monkeypatch.setattr(tokenizer_stage.TokenizerStage, "__init__", no_training_stage)
  tokenizer, path = prior_stage.load_tokenizer(run.config, str(workdir / "tokenizer"))
  assert path == str(workdir / "tokenizer" / "export")
  _assert_trees_equal(_pure(tokenizer), _pure(rvq_jax.Tokenizer.load(
      run.workdir / "tokenizer", mesh=_single_device_mesh()).module))
  assert export_lib.read_metadata(path)["weights"] == "ema"

  path = stages.export(run.config, "ar", str(workdir))
  old, new = rvq_jax.Prior.load(path), rvq_jax.Prior.load(run.workdir / "ar")
  _assert_trees_equal(_pure(old.module), _pure(new.module))
  assert old.tokenizer.path == workdir / "tokenizer" / "export"
  assert old.step == new.step == 2


def test_export_mode_writes_every_trained_stages_export(run, tmp_path):
  """`python -m rvq_jax.main --mode=export` on a run without exports: one line per stage
  with a checkpoint, and exports that load; on a workdir without checkpoints, one error
  line and exit status 2."""
  workdir = tmp_path / "old"
  for stage in ("tokenizer", "ar"):
    shutil.copytree(run.workdir / stage, workdir / stage,
                    ignore=shutil.ignore_patterns("export"))
  config_file = tmp_path / "config.py"
  config_file.write_text("from tests.test_export import _config\n\n\n"
                         "def get_config():\n  return _config()\n")
  root = pathlib.Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}

  def main(workdir):
    return subprocess.run([sys.executable, "-m", "rvq_jax.main", f"--config={config_file}",
                           f"--workdir={workdir}", "--mode=export"], cwd=root, env=env,
                          capture_output=True, text=True, check=False, timeout=600)

  done = main(workdir)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines() == [
      f"rvq_jax: tokenizer: params-only export written to {workdir / 'tokenizer' / 'export'}",
      f"rvq_jax: ar: params-only export written to {workdir / 'ar' / 'export'}"]
  prior = rvq_jax.Prior.load(workdir / "ar")
  assert prior.tokenizer.path == workdir / "tokenizer" / "export" and prior.step == 2
  failed = main(tmp_path / "empty")
  assert failed.returncode == 2
  assert "rvq_jax: error: --mode=export: no stage" in failed.stderr


def test_priors_and_inference_modes_need_no_pretrained_weight_file(run, tmp_path,
                                                                  monkeypatch):
  """The paper's setting: LPIPS in the tokenizer's loss, no weight file anywhere. A
  diffusion prior over the trained tokenizer trains and exports, and encode,
  reconstruct and sample run, without building the tokenizer's training stage."""
  monkeypatch.delenv("RVQ_JAX_WEIGHTS_DIR", raising=False)
  missing = str(tmp_path / "missing")
  config = _config()
  config.weights.update(random=False, lpips=f"{missing}/vgg16_lpips.npz",
                        vgg19=f"{missing}/vgg19.npz", teacher=f"{missing}/teacher.npz",
                        inception=f"{missing}/inception_fid.npz",
                        classifier=f"{missing}/classifier.npz")
  config.tokenizer.loss.perceptual_weight = 1.0
  config.prior.tokenizer_workdir = str(run.workdir / "tokenizer")
  with pytest.raises(FileNotFoundError, match="vgg16_lpips"):
    tokenizer_stage.TokenizerStage(config)  # What the priors used to build.

  workdir = tmp_path / "run"
  stage = stages.build(config, "diffusion", workdir=str(workdir))
  final = loop.run(stage, loop.loop_config_from(config, "diffusion"), str(workdir / "diffusion"))
  assert np.isfinite(final["bits_per_token"])
  prior = rvq_jax.Prior.load(workdir / "diffusion", mesh=_single_device_mesh())
  samples = prior.sample(3, seed=0, num_steps=4)
  assert samples.tokens.shape == (3, 4, 4) and samples.images.shape == (3, 16, 16, 3)
  # The diffusion prior's loss history (a buffer, not a parameter) is exported too.
  container, _, _, _ = loop.load_trained(stage, loop.loop_config_from(config, "diffusion"),
                                         str(workdir / "diffusion"))
  _assert_trees_equal(_pure(prior.module), _pure(container.model))

  output = prior_inference.sample(stages.build(config, "diffusion", workdir=str(workdir)),
                                  config, str(workdir / "diffusion"), 3,
                                  str(tmp_path / "samples"))
  assert len([p for p in os.listdir(output) if p.endswith(".png")]) == 3
  tokens_file = inference.encode(config, str(run.workdir / "tokenizer"), "eval",
                                 str(tmp_path / "tokens.npz"))
  encoded = np.load(tokens_file)["indices"]
  assert encoded.shape[1:] == (4, 4) and encoded.min() >= 0 and encoded.max() < 16
  photos = tmp_path / "photos"
  photos.mkdir()
  for index in range(2):
    Image.fromarray(np.random.default_rng(index).integers(0, 256, (20, 24, 3), np.uint8)
                    ).save(photos / f"{index}.png")
  assert inference.reconstruct(config, str(run.workdir / "tokenizer"), str(photos),
                               str(tmp_path / "reconstructions")) == 2


def readme_example() -> str:
  """The README's "Use a trained tokenizer in your own code" example."""
  match = re.search(r"<!-- example: trained-tokenizer -->\s*```python\n(.*?)```",
                    README.read_text(), flags=re.S)
  assert match, "the README lost its trained-tokenizer example"
  return match.group(1)


def test_readme_example_runs_on_a_trained_run(run, monkeypatch, capsys):
  monkeypatch.chdir(run.root)  # The example loads runs/demo/{tokenizer,ar}/export.
  exec(compile(readme_example(), "README.md", "exec"), {})
  assert "(4, 4, 4)" in capsys.readouterr().out
