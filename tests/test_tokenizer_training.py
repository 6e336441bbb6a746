"""The tokenizer stage end to end on a tiny config: sharded equals single-device, resume
after SIGTERM equals an uninterrupted run, and the eval/reconstruct/encode modes work."""
import json
import os
import signal

import jax
import numpy as np
import pytest
from PIL import Image

from rvq_jax import config as config_lib
from rvq_jax.train import inference
from rvq_jax.train import loop
from rvq_jax.train.tokenizer_stage import TokenizerStage
from tests import tiny_configs


def tiny_config(kind="regvq", **train):
  config = tiny_configs.tiny_config(kind)
  config.tokenizer.loss.update(perceptual_weight=0.5, pcl_weight=0.1, pcl_num_locations=8,
                               disc_start=0)
  if kind in ("fq", "regfq"):
    config.tokenizer.loss.update(representation_weight=0.5, teacher_resolution=32)
    config.tokenizer.model.update(representation_head_width=32, representation_head_blocks=1,
                                  representation_head_heads=2)
  config.tokenizer.train.checkpoint_every = 1
  config.tokenizer.train.update(**train)
  config_lib.validate(config)
  return config


def _run(config, workdir, stage=None):
  return loop.run(stage or TokenizerStage(config), loop.loop_config_from(config), workdir)


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def _params(config, workdir):
  container, _, _, _ = loop.load_trained(TokenizerStage(config),
                                         loop.loop_config_from(config), workdir)
  from flax import nnx
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(container.model, nnx.Param)))


def _fraction_close(a, b, rtol=1e-3, atol=1e-6):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  close = sum(int(np.isclose(x, y, rtol=rtol, atol=atol).sum()) for x, y in zip(leaves_a, leaves_b))
  return close / sum(x.size for x in leaves_a)


def test_one_sharded_step_equals_the_single_device_step(tmp_path):
  """Two steps with every loss on (L1, LPIPS, PCL, prior KL, GAN): mesh data=4, fsdp=2 vs
  one device. Losses and gradient norms agree closely. Adam moves every parameter by
  about ±lr in its first steps, whatever the size of its gradient, so a parameter whose
  gradient is pure rounding noise may move either way: parameters are compared by the
  fraction that agree, which a wrong sharding would drive far below 1."""
  single = tiny_config()
  sharded = tiny_config()
  sharded.mesh.shape = (4, 2, 1)
  _run(single, str(tmp_path / "single"))
  _run(sharded, str(tmp_path / "sharded"))
  a, b = _metrics(str(tmp_path / "single")), _metrics(str(tmp_path / "sharded"))
  for name in ("train/loss", "train/l1", "train/lpips", "train/pcl", "train/quantizer/prior_kl",
               "train/d_loss", "train/gan_weight", "train/grad_norm", "train/d_grad_norm",
               "psnr", "lpips", "usage"):
    np.testing.assert_allclose(b[name], a[name], rtol=2e-4, atol=1e-6, err_msg=name)
  # rFD-VGG (LPIPS's VGG16 is there): 8 examples in 512 dimensions, so float32 sums that
  # add up in another order move it more than the means above.
  assert np.isfinite(a["rfd_vgg"]) and a["rfd_vgg"] > 0
  np.testing.assert_allclose(b["rfd_vgg"], a["rfd_vgg"], rtol=1e-2)
  agree = _fraction_close(_params(single, str(tmp_path / "single")),
                          _params(sharded, str(tmp_path / "sharded")))
  assert agree > 0.995, agree
  # The final evaluation drew the held-out codebook usage chart.
  chart = np.asarray(Image.open(tmp_path / "single" / "images" /
                                "eval_codebook_usage_0000002.png"))
  assert chart.shape[0] >= 240 and chart.shape[1] >= 480


def _discriminator_params(config, workdir):
  container, _, _, step = loop.load_trained(TokenizerStage(config),
                                            loop.loop_config_from(config), workdir)
  from flax import nnx
  assert not jax.tree.leaves(nnx.state(container.discriminator, nnx.Not(nnx.Param)))
  return step, jax.tree.map(np.asarray,
                            nnx.to_pure_dict(nnx.state(container.discriminator, nnx.Param)))


@pytest.mark.slow
def test_batch_norm_discriminator_trains_sharded_like_single_device_and_resumes(tmp_path):
  """tokenizer.loss.disc_norm='batch' with disc_init='taming', GAN from step 0: two steps
  on mesh data=4, fsdp=2 match one device (D's batch statistics are the global batch's);
  the checkpoint restores D (parameters only) and a resumed run trains on."""
  def config(mesh_shape, num_steps=2):
    config = tiny_config(num_steps=num_steps)
    config.tokenizer.loss.update(perceptual_weight=0.0, pcl_weight=0.0, disc_norm="batch",
                                 disc_init="taming")
    config.mesh.shape = mesh_shape
    config_lib.validate(config)
    return config

  single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
  _run(config((1, 1, 1)), single)
  _run(config((4, 2, 1)), sharded)
  a, b = _metrics(single), _metrics(sharded)
  for name in ("train/loss", "train/d_loss", "train/gan_weight", "train/d_grad_norm",
               "train/logits_real", "train/logits_fake", "train/grad_norm"):
    np.testing.assert_allclose(b[name], a[name], rtol=2e-4, atol=1e-6, err_msg=name)
  step, d_single = _discriminator_params(config((1, 1, 1)), single)
  _, d_sharded = _discriminator_params(config((4, 2, 1)), sharded)
  assert step == 2 and _fraction_close(d_single, d_sharded) > 0.995
  _run(config((1, 1, 1), num_steps=3), single)  # resumes from step 2
  step, d_resumed = _discriminator_params(config((1, 1, 1)), single)
  assert step == 3 and np.isfinite(_metrics(single)["train/d_loss"])
  assert _fraction_close(d_resumed, d_single) < 0.5  # D trained on


class _SigtermAt(TokenizerStage):
  """The tokenizer stage whose data iterator delivers SIGTERM before batch `at`."""

  def __init__(self, config, at):
    super().__init__(config)
    self.at = at

  def train_iterator(self, process_index, process_count):
    iterator = super().train_iterator(process_index, process_count)
    outer = self

    class Wrapped:
      def __next__(self):
        if iterator.get_state()["step"] == outer.at:
          os.kill(os.getpid(), signal.SIGTERM)
        return next(iterator)

      def get_state(self):
        return iterator.get_state()

      def restore(self, state):
        iterator.restore(state)

      def close(self):
        iterator.close()

    return Wrapped()


def test_sigterm_then_restart_continues_like_an_uninterrupted_run(tmp_path):
  config = tiny_config(num_steps=4, checkpoint_every=100)
  # The VGG-based losses are the slow part on a CPU and play no role in resuming.
  config.tokenizer.loss.update(perceptual_weight=0.0, pcl_weight=0.0)
  _run(config, str(tmp_path / "straight"))
  workdir = str(tmp_path / "interrupted")
  with pytest.raises(SystemExit):
    _run(config, workdir, stage=_SigtermAt(config, at=2))
  _run(config, workdir)
  a, b = _metrics(str(tmp_path / "straight")), _metrics(workdir)
  for name in ("train/loss", "train/l1", "train/d_loss", "train/quantizer/prior_kl", "l1",
               "psnr"):
    np.testing.assert_allclose(b[name], a[name], rtol=1e-5, err_msg=name)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               _params(config, str(tmp_path / "straight")), _params(config, workdir))


def test_train_evaluate_reconstruct_and_encode(tmp_path):
  """FQ: the factorized encoder, VQ sub-quantizers, factorized tokens [B, h, w, M]."""
  kind = "fq"
  config = tiny_config(kind)
  # The perceptual losses are covered by the sharded test.
  config.tokenizer.loss.update(perceptual_weight=0.0, pcl_weight=0.0)
  workdir = str(tmp_path / "run")
  final = _run(config, workdir)
  assert {"l1", "psnr", "ssim", "usage", "perplexity"} <= set(final)
  assert np.isfinite(_metrics(workdir)["train/representation"])
  assert 0 < final["usage"] <= 1

  metrics = inference.evaluate(TokenizerStage(config), loop.loop_config_from(config), workdir)
  assert metrics["step"] == 2
  np.testing.assert_allclose(metrics["psnr"], final["psnr"], rtol=1e-5)

  images_dir = tmp_path / "images"
  (images_dir / "sub").mkdir(parents=True)
  for index in range(3):
    pixels = np.random.default_rng(index).integers(0, 255, (20, 24, 3), np.uint8)
    Image.fromarray(pixels).save(images_dir / "sub" / f"photo{index}.png")
  written = inference.reconstruct(config, workdir, str(images_dir), str(tmp_path / "out"))
  assert written == 3
  assert Image.open(tmp_path / "out" / "sub_photo0.png").size == (16, 16)

  output = inference.encode(config, workdir, "eval", str(tmp_path / "tokens.npz"))
  tokens = np.load(output)
  grid = 16 // 4
  want_shape = (8, grid, grid) + ((2,) if kind == "fq" else ())
  assert tokens["indices"].shape == want_shape
  assert tokens["indices"].min() >= 0 and tokens["indices"].max() < 16
  np.testing.assert_array_equal(tokens["index"], np.arange(8))


def test_config_errors_are_reported_before_building_anything():
  config = tiny_config()
  config.data.image_size = 18
  with pytest.raises(ValueError, match="image_size=18 is not divisible by the downsampling"):
    config_lib.validate(config)
  config = tiny_config()
  config.tokenizer.quantizer.regvq.mask_ratio = 1.5
  with pytest.raises(ValueError, match=r"mask_ratio=1.5 must lie in \[0, 1\]"):
    config_lib.validate(config)
  for key, value in (("disc_norm", "layer"), ("disc_init", "xavier")):
    config = tiny_config()
    config.tokenizer.loss[key] = value
    with pytest.raises(ValueError, match=rf"tokenizer.loss.{key}='{value}': choose from"):
      config_lib.validate(config)
  config = tiny_config()
  config.lock()  # As main's config flag does.
  with pytest.raises(AttributeError):
    config.tokenizer.quantizer.regvq.mask_ratoi = 0.4  # A typo is an error, not a new key.
  with pytest.raises(ValueError, match="unknown config variant"):
    config_lib.parse_arg("tokenizer,regvqq")


@pytest.mark.parametrize("use_gan", [False, True], ids=["no_gan", "gan"])
def test_ema_codebook_updates_inside_the_loops_step(use_gan):
  """The EMA codebook (cosine codes) writes its own state in the forward pass, inside the
  step's gradient trace. One jitted step of the loop must carry that state out: the new
  counts and sums equal a NumPy EMA of the initial model's unit encoder outputs, assigned
  to their nearest codes by brute force, and the codebook is their smoothed mean, unit
  length. Both generator paths (one backward pass; the VJP with the GAN's weight) run."""
  import jax.numpy as jnp

  config = tiny_configs.tiny_config("vq", num_steps=1)
  decay = 0.9
  config.tokenizer.quantizer.vq.update(use_ema=True, normalize=True, ema_decay=decay)
  config.tokenizer.loss.disc_start = 0 if use_gan else 10**9
  config_lib.validate(config)
  stage = TokenizerStage(config)
  prepared = loop.prepare(stage, loop.loop_config_from(config))
  iterator = stage.train_iterator(0, 1)
  with jax.set_mesh(prepared.mesh):
    state = prepared.init_state()
    model = prepared.merge(state).model
    quantizer = model.quantizer
    cluster_size = np.asarray(quantizer.cluster_size[...], np.float64)
    embed_sum = np.asarray(quantizer.embed_sum[...], np.float64)
    codes = np.asarray(quantizer.codebook[...], np.float64)
    batch = next(iterator)
    z = np.asarray(model.quantizer_input(jnp.asarray(batch["image"])), np.float64)
    z = z.reshape(-1, z.shape[-1])
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    indices = np.argmin(((z[:, None] - codes[None]) ** 2).sum(-1), axis=-1)
    assert stage.phase(0) == use_gan
    new_state, metrics = prepared.train_step(stage.phase(0))(
        state, prepared.constants(), loop.global_batch(batch, prepared.mesh),
        jax.random.key(0), jnp.asarray(0, jnp.int32))
    assert np.isfinite(float(metrics["loss"]))
    new_quantizer = prepared.merge(new_state).model.quantizer
  num_codes = codes.shape[0]
  one_hot = np.eye(num_codes)[indices]
  want_size = decay * cluster_size + (1 - decay) * one_hot.sum(0)
  want_sum = decay * embed_sum + (1 - decay) * one_hot.T @ z
  np.testing.assert_allclose(new_quantizer.cluster_size[...], want_size, rtol=1e-5)
  np.testing.assert_allclose(new_quantizer.embed_sum[...], want_sum, rtol=1e-4, atol=1e-6)
  total = want_size.sum()
  smoothed = (want_size + 1e-5) / (total + num_codes * 1e-5) * total
  want_codes = want_sum / smoothed[:, None]
  want_codes /= np.linalg.norm(want_codes, axis=-1, keepdims=True)
  np.testing.assert_allclose(new_quantizer.codebook[...], want_codes, rtol=1e-4, atol=1e-6)
  assert not np.allclose(want_codes, codes, atol=1e-3)  # The step moved the codebook.
  if hasattr(iterator, "close"):
    iterator.close()
