"""Both prior stages end to end on tiny configs: sharded equals single-device, tokens
from a file equal tokens made on the fly, class conditions with guidance, eval and
`sample` mode, and the config checks for priors."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from rvq_jax import config as config_lib
from rvq_jax.train import inference
from rvq_jax.train import loop
from rvq_jax.train import prior_inference
from rvq_jax.train import stages
from rvq_jax.train.prior_stage import PriorStage
from rvq_jax.train.tokenizer_stage import build_tokenizer
from tests import tiny_configs

PRIORS = ("ar", "diffusion")


def _class_folder(root, num_classes=2, per_class=8, size=16):
  """Images whose class (subfolder) shows in their colour, so a prior can learn it."""
  for label in range(num_classes):
    folder = root / f"class{label}"
    folder.mkdir(parents=True)
    for index in range(per_class):
      rng = np.random.default_rng(100 * label + index)
      pixels = rng.integers(0, 64, (size, size, 3)).astype(np.uint8)
      pixels[..., label % 3] += 160
      Image.fromarray(pixels).save(folder / f"{index}.png")
  return str(root)


def tiny_config(kind="regvq", *, condition="none", data_path="", **train):
  config = tiny_configs.tiny_config(kind, num_steps=1)
  if data_path:
    config.data.update(source="folder", path=data_path, eval_path=data_path,
                       class_labels=condition == "class")
  config.tokenizer.train.checkpoint_every = 1
  config.prior.update(condition=condition, num_classes=2 if condition != "none" else 0)
  for name in PRIORS:
    prior = config[name]
    prior.model.update(width=32, depth=2, num_heads=2)
    prior.train.update(batch_size=8, num_steps=2, log_every=1, checkpoint_every=1,
                       eval_every=0, summary_every=0)
    prior.train.update(**train)
    # FD-VGG samples and runs a (random) VGG16 in every evaluation: only the test of the
    # generation metrics turns it on.
    prior.eval.update(batch_size=8, num_batches=1, generation_fd_vgg=False)
    prior.sample.num_samples = 4
  config.diffusion.model.num_timesteps = 8
  config_lib.validate(config)
  return config


def _random_tokenizer(config):
  return build_tokenizer(config, rngs=nnx.Rngs(7))


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("kind", PRIORS)
def test_sharded_prior_steps_equal_single_device_steps(tmp_path, kind):
  """Two steps on mesh data=4 × fsdp=2 vs one device; tokens made on the fly by the
  (frozen, random) tokenizer, so the sharded step also tokenizes a sharded batch."""
  single = tiny_config()
  sharded = tiny_config()
  sharded.mesh.shape = (4, 2, 1)
  for config, name in ((single, "single"), (sharded, "sharded")):
    stage = PriorStage(config, kind, _random_tokenizer(config))
    loop.run(stage, loop.loop_config_from(config, kind), str(tmp_path / name))
  a, b = _metrics(str(tmp_path / "single")), _metrics(str(tmp_path / "sharded"))
  names = ["train/loss", "train/grad_norm", "bits_per_token"]
  names += ["train/nll"] if kind == "ar" else ["train/vlb", "train/aux"]
  for name in names:
    np.testing.assert_allclose(b[name], a[name], rtol=2e-4, atol=1e-6, err_msg=name)


def test_class_conditional_priors_from_token_files_with_guidance(tmp_path):
  """tokenizer → encode (tokens + labels) → both priors on the token file, with a
  learned null class and guided sampling → eval → `sample` mode writes images."""
  data = _class_folder(tmp_path / "data")
  config = tiny_config(condition="class", data_path=data)
  workdir = str(tmp_path / "run")
  loop.run(stages.build(config, "tokenizer"), loop.loop_config_from(config),
           os.path.join(workdir, "tokenizer"))
  tokens_path = inference.encode(config, os.path.join(workdir, "tokenizer"), "train",
                                 str(tmp_path / "tokens.npz"))
  arrays = np.load(tokens_path)
  assert arrays["indices"].shape == (16, 4, 4)
  np.testing.assert_array_equal(np.sort(arrays["label"]), [0] * 8 + [1] * 8)

  config.unlock()
  config.prior.update(train_tokens=tokens_path, eval_tokens=tokens_path)
  for name in PRIORS:
    config[name].loss.condition_dropout = 0.5
    config[name].sample.guidance_scale = 2.0
  config_lib.validate(config)
  for name in PRIORS:
    stage_dir = os.path.join(workdir, name)
    final = loop.run(stages.build(config, name, workdir=workdir),
                     loop.loop_config_from(config, name), stage_dir)
    assert np.isfinite(final["bits_per_token"]) and final["bits_per_token"] > 0
    # A fresh stage object re-evaluates the checkpoint: the same number.
    again = inference.evaluate(stages.build(config, name, workdir=workdir),
                               loop.loop_config_from(config, name), stage_dir)
    np.testing.assert_allclose(again["bits_per_token"], final["bits_per_token"], rtol=1e-5)
    output = prior_inference.sample(stages.build(config, name, workdir=workdir), config,
                                    stage_dir, 5, str(tmp_path / f"samples_{name}"))
    written = sorted(p for p in os.listdir(output) if p.endswith(".png"))
    assert len(written) == 5
    assert Image.open(os.path.join(output, written[0])).size == (16, 16)
    samples = np.load(os.path.join(output, "samples.npz"))
    assert samples["tokens"].shape == (5, 4, 4)
    assert samples["tokens"].min() >= 0 and samples["tokens"].max() < 16
    np.testing.assert_array_equal(samples["condition"], [0, 1, 0, 1, 0])


def test_factorized_tokens_train_both_priors(tmp_path):
  """FQ tokens [B, h, w, M]: both priors train, evaluate and sample M sub-tokens."""
  config = tiny_config("fq", num_steps=1)
  tokenizer = _random_tokenizer(config)
  for name in PRIORS:
    stage = PriorStage(config, name, tokenizer)
    final = loop.run(stage, loop.loop_config_from(config, name), str(tmp_path / name))
    assert np.isfinite(final["bits_per_token"])
    container, constants, mesh, _ = loop.load_trained(stage, loop.loop_config_from(config, name),
                                                      str(tmp_path / name))
    summary = stage.summarize(container, constants, next(stage.eval_batches(0, 1)), 1)
    assert summary["samples"].dtype == np.uint8


def test_prior_training_from_a_token_file_equals_on_the_fly_tokens(tmp_path):
  """The same tokens reach the prior either way: one AR step on a file written by
  `encode` of the eval split equals one step tokenizing that split on the fly."""
  config = tiny_config()
  workdir = str(tmp_path / "run")
  loop.run(stages.build(config, "tokenizer"), loop.loop_config_from(config),
           os.path.join(workdir, "tokenizer"))
  tokens_path = inference.encode(config, os.path.join(workdir, "tokenizer"), "eval",
                                 str(tmp_path / "eval_tokens.npz"))
  on_the_fly = stages.build(config, "ar", workdir=workdir)
  config.unlock()
  config.prior.eval_tokens = tokens_path
  from_file = stages.build(config, "ar", workdir=workdir)
  batch_fly = next(on_the_fly.eval_batches(0, 1))
  batch_file = next(from_file.eval_batches(0, 1))
  constants = on_the_fly.constants()
  tokens_fly, _ = on_the_fly.inputs(constants, batch_fly)
  tokens_file, _ = from_file.inputs(constants, batch_file)
  np.testing.assert_array_equal(np.asarray(tokens_file), np.asarray(tokens_fly))


def test_prior_config_errors():
  config = tiny_config()
  config.ar.model.num_heads = 3
  with pytest.raises(ValueError, match="ar.model.width=32 is not divisible"):
    config_lib.validate(config)
  config = tiny_config()
  config.diffusion.sample.num_steps = 9
  with pytest.raises(ValueError, match="num_steps=9 must lie in"):
    config_lib.validate(config)
  config = tiny_config()
  config.ar.sample.guidance_scale = 3.0
  with pytest.raises(ValueError, match="needs a condition"):
    config_lib.validate(config)
  config = tiny_config()
  config.prior.condition = "class"
  with pytest.raises(ValueError, match="num_classes > 0"):
    config_lib.validate(config)


def test_prior_without_a_trained_tokenizer_names_the_command(tmp_path):
  config = tiny_config()
  with pytest.raises(FileNotFoundError, match="Train it first"):
    stages.build(config, "ar", workdir=str(tmp_path))


def test_prior_eval_reports_generation_metrics(tmp_path, monkeypatch):
  """With an FID Inception and a VGG16 (random weights here), eval adds gFID and IS, and
  gFD-VGG, precision and recall, of one sample per held-out example against the eval
  split's cached reference statistics."""
  from rvq_jax.metrics import fid as fid_lib
  config = tiny_config()
  config.weights.update(random=True, inception="random")
  config.ar.eval.generation_fd_vgg = True
  # 2 eval photos × 4 crops: 8 eval examples; the cap keeps the features of 5 samples.
  config.ar.eval.max_manifold_examples = 5
  stage = PriorStage(config, "ar", _random_tokenizer(config),
                     fid_reference_path=str(tmp_path / "reference.npz"),
                     fd_vgg_reference_path=str(tmp_path / "fd_vgg_reference.npz"))
  distances = []
  real_distance = fid_lib.frechet_distance

  def recording_distance(*args):
    distances.append(args)
    return real_distance(*args)

  monkeypatch.setattr(fid_lib, "frechet_distance", recording_distance)
  final = loop.run(stage, loop.loop_config_from(config, "ar"), str(tmp_path / "ar"))
  assert np.isfinite(final["gfid"]) and final["gfid"] >= 0
  assert final["inception_score"] >= 1.0
  assert np.isfinite(final["gfd_vgg"]) and final["gfd_vgg"] >= 0
  assert 0 <= final["precision"] <= 1 and 0 <= final["recall"] <= 1
  # Each reference is the eval split's statistics, written once to its cache file.
  by_dimension = {len(args[2]): args for args in distances}
  for path, dimension in (("reference.npz", 2048), ("fd_vgg_reference.npz", 512)):
    reference = fid_lib.load_reference(str(tmp_path / path))
    np.testing.assert_array_equal(by_dimension[dimension][2], reference.mu)
    np.testing.assert_array_equal(by_dimension[dimension][3], reference.sigma)
  # The FD-VGG file also keeps the first 5 eval examples' features: the real set of
  # precision/recall, as many as the samples kept.
  assert fid_lib.load_reference(str(tmp_path / "fd_vgg_reference.npz")).rows.shape == (5, 512)


def test_fashion_mnist_runlocal_trains_all_stages_on_idx_files(tmp_path):
  """configs/fashion_mnist.py:runlocal end to end, on small IDX files written here: the
  tokenizer, then class-conditional AR and diffusion priors with guidance."""
  import gzip
  import importlib.util

  def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(header + array.tobytes())

  rng = np.random.default_rng(0)
  for images, labels, count in (("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 32),
                                ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 16)):
    write_idx(tmp_path / images, rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / labels, (np.arange(count) % 10).astype(np.uint8))
  path = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "fashion_mnist.py")
  spec = importlib.util.spec_from_file_location("configs_fashion_mnist", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  config.unlock()
  config.data.update(idx_path=str(tmp_path), num_workers=1)
  config.mesh.shape = (1, 1, 1)
  for stage in config_lib.STAGES:
    config[stage].train.update(num_steps=2, log_every=1, eval_every=0, summary_every=0)
  for stage in config_lib.PRIOR_STAGES:
    # Sampling and VGG16 in every prior evaluation would double this test's time; the
    # generation metrics have their own test above. The classifier metrics are checked
    # here, with a classifier that answers class 0 whatever it sees.
    config[stage].eval.update(generation_fd_vgg=False, num_batches=2)
  config.weights.update(random=True, classifier="random")
  config_lib.validate(config)
  workdir = str(tmp_path / "run")
  tokenizer = stages.build(config, "tokenizer")
  loop.run(tokenizer, loop.loop_config_from(config, "tokenizer"), os.path.join(workdir,
                                                                               "tokenizer"))
  # runlocal: eval batches of 8; the t10k labels are 0..9 repeating over 16 images.
  eval_labels = (np.arange(16) % 10)[:2 * config.ar.eval.batch_size]
  for name in PRIORS:
    stage = stages.build(config, name, workdir=workdir)
    assert stage.condition_kind == "class"
    head = stage._classifier.network.head
    head.kernel[...] = jnp.zeros_like(head.kernel[...])
    head.bias[...] = jnp.zeros_like(head.bias[...]).at[0].set(1.0)
    stage._classifier_state = nnx.state(stage._classifier.network)
    metrics = loop.run(stage, loop.loop_config_from(config, name), os.path.join(workdir, name))
    assert np.isfinite(metrics["bits_per_token"])
    assert os.path.exists(os.path.join(workdir, name, "images"))
    # Samples drawn for label y count as correct iff y == 0: the metric must see the
    # conditions the samples were generated for, in order.
    assert metrics["class_accuracy"] == pytest.approx(np.mean(eval_labels == 0))
    assert np.isfinite(metrics["fd_classifier"]) and metrics["fd_classifier"] >= 0
