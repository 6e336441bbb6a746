"""A checkpoint outlives its topology: saved on 8 devices (data=4, fsdp=2), it restores
onto 4 devices, onto 1, and onto another mesh shape (data=2, fsdp=4), each array laid
out as the new mesh asks, and training goes on as if nothing had changed (same data
position and random keys, so the same losses as the uninterrupted 8-device run)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from rvq_jax import config as config_lib
from rvq_jax.train import loop
from rvq_jax.train.tokenizer_stage import TokenizerStage
from tests import tiny_configs

SAVED_MESH = (4, 2, 1)
TARGET_MESHES = {"4_devices": (4, 1, 1), "1_device": (1, 1, 1), "data2_fsdp4": (2, 4, 1)}


def tiny_config(mesh_shape, num_steps):
  # Stochastic quantization on (Reg-VQ's masked Gumbel sampling), so the random keys
  # after the restore must match too; the GAN phase would only add compile time.
  config = tiny_configs.tiny_config("regvq", num_steps=num_steps, mesh_shape=mesh_shape)
  config_lib.validate(config)
  return config


def _run(config, workdir):
  loop.run(TokenizerStage(config), loop.loop_config_from(config), workdir)
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


def _load(config, workdir):
  container, _, mesh, step = loop.load_trained(TokenizerStage(config),
                                               loop.loop_config_from(config), workdir)
  return nnx.to_pure_dict(nnx.state(container)), mesh, step


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(workdir with a checkpoint of step 2 on 8 devices, metrics of the straight 3-step run)."""
  tmp = tmp_path_factory.mktemp("topology")
  straight = _run(tiny_config(SAVED_MESH, 3), str(tmp / "straight"))
  _run(tiny_config(SAVED_MESH, 2), str(tmp / "saved"))
  return tmp / "saved", straight


def _copy_checkpoint(saved_dir, workdir):
  shutil.copytree(saved_dir / "checkpoints", workdir / "checkpoints")


@pytest.mark.parametrize("target", sorted(TARGET_MESHES))
def test_restore_onto_another_topology_is_exact_and_laid_out_for_it(saved, tmp_path, target):
  saved_dir, _ = saved
  original, original_mesh, step = _load(tiny_config(SAVED_MESH, 2), str(saved_dir))
  assert step == 2 and original_mesh.devices.size == 8
  restored, mesh, restored_step = _load(tiny_config(TARGET_MESHES[target], 2), str(saved_dir))
  assert restored_step == 2
  assert dict(mesh.shape) == dict(zip(("data", "fsdp", "model"), TARGET_MESHES[target]))
  devices = set(mesh.devices.flat)
  leaves = jax.tree.leaves(restored)
  assert leaves and all(set(leaf.sharding.device_set) == devices for leaf in leaves)
  # At least one array is split over the fsdp axis where the new mesh has one.
  if mesh.shape["fsdp"] > 1:
    assert any("fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec)) for leaf in leaves)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               original, restored)


@pytest.mark.parametrize("target", sorted(TARGET_MESHES))
def test_training_continues_on_another_topology_like_the_uninterrupted_run(saved, tmp_path,
                                                                            target):
  saved_dir, straight = saved
  workdir = tmp_path / "continued"
  _copy_checkpoint(saved_dir, workdir)
  continued = _run(tiny_config(TARGET_MESHES[target], 3), str(workdir))
  assert continued["step"] == straight["step"] == 3
  for name in ("train/loss", "train/l1", "train/quantizer", "train/grad_norm", "l1", "psnr"):
    np.testing.assert_allclose(continued[name], straight[name], rtol=2e-4, atol=1e-6,
                               err_msg=name)
