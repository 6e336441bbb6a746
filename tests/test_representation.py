"""FQGAN's representation alignment: InfoNCE, the feature-prediction head, the teacher.

No teacher weights exist here: teachers have random weights, and the checks are
properties that hold whatever the weights (shapes, frozen variables, gradient flow,
strict loading round trips) or comparisons with direct NumPy evaluations.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rvq_jax import parallel
from rvq_jax.models import pretrained
from rvq_jax.models.pretrained import teachers
from rvq_jax.models.tokenizer import representation_head
from rvq_jax.ops.info_nce import info_nce
from rvq_jax.train import tokenizer_losses

# The smallest image that reaches VGG's block 5 (1×1 there): keeps the teacher cheap.
TEACHER_RESOLUTION = 16
CODE_DIM, HEAD_WIDTH, GRID = 8, 32, 4


def _numpy_info_nce(student, teacher, temperature):
  """−mean_i log softmax_j(ŝ_i·t̂_j / τ)[i], in float64."""
  s = np.asarray(student, np.float64)
  t = np.asarray(teacher, np.float64)
  s /= np.linalg.norm(s, axis=-1, keepdims=True)
  t /= np.linalg.norm(t, axis=-1, keepdims=True)
  logits = s @ t.T / temperature
  log_softmax = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
  return -np.mean(np.diag(log_softmax))


def _head(target_dim=None, dtype=jnp.float32, seed=0):
  return representation_head.FeaturePredictionHead(
      CODE_DIM, HEAD_WIDTH, num_blocks=2, num_heads=4, grid_size=GRID,
      target_dim=target_dim, dtype=dtype, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def built_teacher():
  """A VGG16 teacher with random weights, built once (random init takes seconds on CPU).

  Tests must not modify it; those that need their own copy load one from `teacher_file`.
  """
  return teachers.build_teacher("vgg16", resolution=TEACHER_RESOLUTION, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def teacher_file(built_teacher, tmp_path_factory):
  """`built_teacher`'s weights in the converter's format: fresh teachers load from it
  (through the real loading path) in a tenth of the time a build takes."""
  teacher = built_teacher
  path = tmp_path_factory.mktemp("teacher") / "vgg16.npz"
  pretrained.save_params(teacher.backbone, path)
  return str(path)


def _teacher(path, dtype=jnp.float32):
  return teachers.load_teacher("vgg16", path, resolution=TEACHER_RESOLUTION, dtype=dtype)


def _batch(batch=4, seed=0, image_size=20):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
  subcode = rng.normal(size=(batch, GRID, GRID, CODE_DIM)).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(subcode)


# ------------------------------------------------------------------------- info_nce


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(2, 6, 5)).astype(np.float32)
  for temperature in (1.0, 0.3):
    got = info_nce(jnp.asarray(student), jnp.asarray(teacher), temperature=temperature)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), _numpy_info_nce(student, teacher, temperature),
                               rtol=1e-5)
  # bfloat16 inputs: float32 math on the rounded inputs.
  student16, teacher16 = jnp.asarray(student, jnp.bfloat16), jnp.asarray(teacher, jnp.bfloat16)
  got = info_nce(student16, teacher16)
  assert got.dtype == jnp.float32
  want = _numpy_info_nce(np.asarray(student16, np.float32), np.asarray(teacher16, np.float32),
                         1.0)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_info_nce_limits():
  batch = 6
  orthogonal = jnp.eye(batch, 10) * 3.0  # distinct, orthogonal rows (norm ≠ 1 on purpose)
  assert float(info_nce(orthogonal, orthogonal, temperature=0.01)) < 1e-6
  identical = jnp.ones((batch, 10))
  np.testing.assert_allclose(float(info_nce(identical, identical)), math.log(batch),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="temperature"):
    info_nce(identical, identical, temperature=0.0)
  with pytest.raises(ValueError, match="same shape"):
    info_nce(identical, identical[:, :5])


def test_info_nce_is_global_under_shard_map_and_sharded_jit():
  mesh = parallel.make_mesh((8, 1, 1))
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(2, 16, 6)).astype(np.float32)  # 2 rows per device
  want = _numpy_info_nce(student, teacher, 0.5)
  sharding = NamedSharding(mesh, P(("data",)))
  student_sharded = jax.device_put(student, sharding)
  teacher_sharded = jax.device_put(teacher, sharding)

  mapped = jax.jit(jax.shard_map(
      lambda s, t: info_nce(s, t, temperature=0.5, axis_name="data"),
      mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P()))
  np.testing.assert_allclose(float(mapped(student_sharded, teacher_sharded)), want, rtol=1e-5)
  unsharded = info_nce(jnp.asarray(student), jnp.asarray(teacher), temperature=0.5)
  np.testing.assert_allclose(float(unsharded), want, rtol=1e-5)
  global_jit = jax.jit(lambda s, t: info_nce(s, t, temperature=0.5))
  np.testing.assert_allclose(float(global_jit(student_sharded, teacher_sharded)), want,
                             rtol=1e-5)
  # The student gradient through the shard_map (all_gather, pmean) is the global one.
  np.testing.assert_allclose(
      np.asarray(jax.grad(mapped)(student_sharded, teacher_sharded)),
      np.asarray(jax.grad(lambda s: info_nce(s, jnp.asarray(teacher), temperature=0.5))(
          jnp.asarray(student))), rtol=1e-5, atol=1e-7)
  # Without axis_name each device sees only its own 2 rows (FQGAN's per-GPU loss): a
  # different value, so the checks above really test the gather.
  local = jax.jit(jax.shard_map(
      lambda s, t: info_nce(s, t, temperature=0.5)[None],
      mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))
  local_mean = float(jnp.mean(local(student_sharded, teacher_sharded)))
  assert abs(local_mean - want) > 0.1


def test_info_nce_gradient_flows_to_student_only():
  rng = np.random.default_rng(2)
  student, teacher = (jnp.asarray(a) for a in rng.normal(size=(2, 5, 4)).astype(np.float32))
  grad_student, grad_teacher = jax.grad(info_nce, argnums=(0, 1))(student, teacher)
  assert np.all(np.asarray(grad_teacher) == 0)
  assert np.isfinite(np.asarray(grad_student)).all() and np.abs(grad_student).max() > 0


# ----------------------------------------------------------------------------- head


def test_head_output_shape_and_logical_axis_names():
  _, subcode = _batch(batch=3)
  head = _head()
  assert head(subcode).shape == (3, HEAD_WIDTH)
  projected = _head(target_dim=24)
  assert nnx.eval_shape(lambda head: head(subcode), projected).shape == (3, 24)
  assert _head(target_dim=HEAD_WIDTH).target_proj is None  # same width: no projection
  params = nnx.to_flat_state(nnx.state(projected, nnx.Param))
  assert len(params) > 10
  for path, variable in params:
    names = variable.get_metadata().get("out_sharding")
    name = ".".join(map(str, path))
    assert names is not None, f"{name} has no logical axis names"
    assert len(names) == variable.get_value().ndim, name
  assert projected.pos_embed.get_metadata()["out_sharding"] == ("position", "embed")
  assert projected.pos_embed.get_value().shape == (GRID * GRID + 1, HEAD_WIDTH)
  assert projected.input_proj_1.kernel.get_metadata()["out_sharding"] == ("code", "embed")
  with pytest.raises(ValueError, match="position embedding"):
    head(jnp.zeros((1, GRID + 1, GRID + 1, CODE_DIM)))


# ------------------------------------------------------------------------- teachers


def test_teacher_is_frozen_and_satisfies_the_protocol(built_teacher):
  teacher = built_teacher
  assert isinstance(teacher, teachers.Teacher)
  assert teacher.feature_dim == 512 and teacher.layer == "relu5_3"
  vgg19 = nnx.eval_shape(lambda: teachers.build_teacher("vgg19", rngs=nnx.Rngs(0)))
  assert vgg19.layer == "relu5_4" and vgg19.resolution == 224
  assert len(nnx.state(teacher, nnx.Param)) == 0
  weights = nnx.to_flat_state(nnx.state(teacher))
  assert len(weights) == 26  # 13 convolutions × (kernel, bias)
  assert all(type(variable) is pretrained.PretrainedWeight for _, variable in weights)
  images, _ = _batch(batch=2)  # 20×20, resized to 16×16 inside
  features = teacher(images)
  assert features.shape == (2, 512) and features.dtype == jnp.float32
  with pytest.raises(ValueError, match="no layer 'relu6_1'"):
    teachers.VGGGlobalTeacher(teacher.backbone, layer="relu6_1")
  with pytest.raises(ValueError, match="Unknown teacher 'clip'"):
    teachers.build_teacher("clip", rngs=nnx.Rngs(0))


def test_resize_images():
  images = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  resized = teachers.resize_images(images, 8)
  assert resized.shape == (2, 8, 8, 3)
  # Nearest: every output pixel is an input pixel (each repeated 2×2 here).
  np.testing.assert_array_equal(resized[:, ::2, ::2], images)
  np.testing.assert_array_equal(resized[:, 1::2, 1::2], images)
  assert teachers.resize_images(images, None) is images
  assert teachers.resize_images(images, 4) is images


def test_missing_teacher_file_names_file_and_converter_command(tmp_path):
  missing = tmp_path / "nowhere" / "vgg16.npz"
  with pytest.raises(FileNotFoundError) as error:
    teachers.load_teacher("vgg16", missing)
  message = str(error.value)
  assert str(missing) in message
  assert "python -m rvq_jax.tools.convert_weights --network vgg16" in message


def test_load_teacher_round_trips_saved_weights(teacher_file, tmp_path):
  teacher = _teacher(teacher_file)
  # The file holds the backbone in the converter's key scheme (features.N.kernel, ...).
  assert "features.0.kernel" in pretrained.read_npz(teacher_file)
  assert all(type(variable) is pretrained.PretrainedWeight
             for _, variable in nnx.to_flat_state(nnx.state(teacher)))
  # Perturb, save, load: the loaded teacher has exactly the saved weights.
  kernel = teacher.backbone.features["0"].kernel
  kernel.set_value(kernel.get_value() + 1.0)
  path = tmp_path / "vgg16.npz"
  pretrained.save_params(teacher.backbone, path)
  loaded = teachers.load_teacher("vgg16", str(path), resolution=TEACHER_RESOLUTION)
  original_arrays = pretrained.module_arrays(teacher)
  loaded_arrays = pretrained.module_arrays(loaded)
  assert original_arrays.keys() == loaded_arrays.keys()
  for name in original_arrays:
    np.testing.assert_array_equal(loaded_arrays[name], original_arrays[name])
  images, _ = _batch(batch=2)
  np.testing.assert_array_equal(np.asarray(loaded(images)), np.asarray(teacher(images)))
  # '' (the config default) means $RVQ_JAX_WEIGHTS_DIR/<kind>.npz.
  os.environ[pretrained.WEIGHTS_DIR_ENV_VAR] = str(tmp_path)
  try:
    from_dir = teachers.load_teacher("vgg16", "", resolution=TEACHER_RESOLUTION)
  finally:
    del os.environ[pretrained.WEIGHTS_DIR_ENV_VAR]
  np.testing.assert_array_equal(pretrained.module_arrays(from_dir)["backbone.features.0.kernel"],
                                original_arrays["backbone.features.0.kernel"])
  # A file for the other depth is rejected whole.
  with pytest.raises(pretrained.WeightMismatchError):
    teachers.load_teacher("vgg19", str(path), resolution=TEACHER_RESOLUTION)


# ----------------------------------------------------------------------------- loss


def test_representation_loss_gradients_reach_head_and_subcode_not_teacher(teacher_file):
  head = _head(target_dim=512)
  teacher = _teacher(teacher_file)
  images, subcode = _batch()

  def loss_fn(head, teacher, subcode):
    return tokenizer_losses.representation_loss(head, teacher, images, subcode)

  # Jitted: an eager backward pass through VGG dispatches op by op and is far slower.
  grad_fn = nnx.jit(nnx.value_and_grad(
      loss_fn, argnums=(0, nnx.DiffState(1, pretrained.PretrainedWeight), 2), has_aux=True))
  (loss, metrics), (grad_head, grad_teacher, grad_subcode) = grad_fn(head, teacher, subcode)
  head_leaves = jax.tree.leaves(nnx.state(grad_head))
  assert head_leaves and all(np.isfinite(np.asarray(g)).all() for g in head_leaves)
  # Every head parameter (the CLS token included) takes part in the prediction.
  assert all(np.abs(np.asarray(g)).max() > 0 for g in head_leaves)
  teacher_leaves = jax.tree.leaves(nnx.state(grad_teacher))
  assert len(teacher_leaves) == 26
  assert all(np.all(np.asarray(g) == 0) for g in teacher_leaves)
  # The loss trains the encoder branch too, through the sub-code.
  assert np.abs(np.asarray(grad_subcode)).max() > 0

  assert set(metrics) == {"representation_nce", "representation_cosine"}
  assert 0.0 <= float(loss) <= math.log(4) + 2.0
  with pytest.raises(ValueError, match="target_dim=512"):  # shapes only: no compute
    nnx.eval_shape(lambda head: tokenizer_losses.representation_loss(
        head, teacher, images, subcode), _head())


def test_representation_loss_under_nnx_jit_in_bfloat16(teacher_file):
  images, subcode = _batch()
  step = nnx.jit(lambda head, teacher, images, subcode:
                 tokenizer_losses.representation_loss(head, teacher, images, subcode,
                                                      temperature=0.5))
  loss32, _ = step(_head(target_dim=512), _teacher(teacher_file), images, subcode)
  head16 = _head(target_dim=512, dtype=jnp.bfloat16)
  teacher16 = _teacher(teacher_file, dtype=jnp.bfloat16)
  loss16, metrics16 = step(head16, teacher16, images.astype(jnp.bfloat16),
                           subcode.astype(jnp.bfloat16))
  assert loss16.dtype == jnp.float32 and metrics16["representation_cosine"].dtype == jnp.float32
  assert np.isfinite(float(loss16))
  # Same weights (bf16 compute, float32 storage): the losses agree to bf16 accuracy.
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=0.05)
