"""VQGAN encoder/decoder, FQ adapters, PatchGAN discriminator and GAN losses.

Layers are checked against direct references (lax.conv, NumPy attention); whole networks
for shapes, jit, bfloat16, sharding and parameter annotations. Tiny configs keep the file
fast on a 2-core CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rvq_jax import parallel
from rvq_jax.models.layers import transformer
from rvq_jax.models.tokenizer import discriminator as disc_lib
from rvq_jax.models.tokenizer import factorized_adapter
from rvq_jax.models.tokenizer import vqgan
from rvq_jax.ops import gan_losses

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
            z_channels=8)
KNOWN_AXES = {None, "conv_in", "conv_out", "norm", "embed", "heads", "kv", "mlp", "position"}
CONV_DIMS = ("NHWC", "HWIO", "NHWC")


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _randomize_norm(norm, seed):
  """Non-trivial GroupNorm/LayerNorm affine parameters, so a reference must use them."""
  norm.scale[...] = 1.0 + 0.1 * _normal(seed, norm.scale.shape)
  norm.bias[...] = 0.1 * _normal(seed + 1, norm.bias.shape)


def _numpy_group_norm(x, scale, bias, groups, eps):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups).astype(np.float64)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _numpy_softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _config_for_factor(factor):
  """A tiny 32×32 config with downsampling factor `factor` and attention at the latent."""
  levels = factor.bit_length()  # f = 2**(levels − 1)
  return dict(ch=32, ch_mult=(1,) * (levels - 1) + (2,), num_res_blocks=1,
              attn_resolutions=(32 // factor,), resolution=32, z_channels=4)


def _apply(module_graphdef):
  return jax.jit(lambda state, x: nnx.merge(module_graphdef, state)(x))


def _call(module, *args):
  """module(*args) compiled as one program: much cheaper than op-by-op dispatch here."""
  return nnx.jit(lambda module, *args: module(*args))(module, *args)


# ------------------------------------------------------------------------ layers


def test_downsample_halves_size_and_matches_pad_then_strided_conv():
  layer = vqgan.Downsample(8, rngs=nnx.Rngs(0))
  layer.conv.bias[...] = _normal(1, (8,))
  x = _normal(2, (2, 10, 6, 8))
  out = _call(layer, x)
  assert out.shape == (2, 5, 3, 8)
  padded = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # taming's (0, 1, 0, 1)
  reference = jax.lax.conv_general_dilated(
      padded, layer.conv.kernel[...], (2, 2), "VALID", dimension_numbers=CONV_DIMS,
      precision=jax.lax.Precision.HIGHEST) + layer.conv.bias[...]
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_upsample_doubles_size_and_matches_nearest_then_conv():
  layer = vqgan.Upsample(8, rngs=nnx.Rngs(0))
  x = _normal(3, (2, 3, 5, 8))
  out = _call(layer, x)
  assert out.shape == (2, 6, 10, 8)
  nearest = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
  reference = jax.lax.conv_general_dilated(
      nearest, layer.conv.kernel[...], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=CONV_DIMS, precision=jax.lax.Precision.HIGHEST) + layer.conv.bias[...]
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_channels,out_channels", [(32, 32), (32, 64)])
def test_resnet_block_is_its_skip_when_the_last_conv_is_zero(in_channels, out_channels):
  block = vqgan.ResnetBlock(in_channels, out_channels, rngs=nnx.Rngs(0))
  assert (block.nin_shortcut is None) == (in_channels == out_channels)
  x = _normal(4, (2, 4, 4, in_channels))
  assert _call(block, x).shape == (2, 4, 4, out_channels)
  block.conv2.kernel[...] = jnp.zeros_like(block.conv2.kernel[...])
  block.conv2.bias[...] = jnp.zeros_like(block.conv2.bias[...])
  skip = x if block.nin_shortcut is None else _call(block.nin_shortcut, x)
  np.testing.assert_allclose(_call(block, x), skip, rtol=1e-6, atol=1e-6)


def test_resnet_block_dropout_is_random_in_training_and_off_in_a_deterministic_view():
  block = vqgan.ResnetBlock(32, dropout=0.5, rngs=nnx.Rngs(0))
  x = _normal(5, (1, 4, 4, 32))
  assert not np.allclose(_call(block, x), _call(block, x))
  evaluation = nnx.view(block, deterministic=True)
  np.testing.assert_array_equal(_call(evaluation, x), _call(evaluation, x))
  assert vqgan.ResnetBlock(32, rngs=nnx.Rngs(0)).dropout is None  # no RNG state by default


def test_attn_block_equals_numpy_single_head_softmax_attention():
  channels = 32
  block = vqgan.AttnBlock(channels, rngs=nnx.Rngs(0))
  _randomize_norm(block.norm, 6)
  for i, layer in enumerate((block.q, block.k, block.v, block.proj_out)):
    layer.bias[...] = 0.1 * _normal(10 + i, (channels,))
  x = np.asarray(_normal(7, (2, 3, 4, channels)), np.float64)
  out = _call(block, jnp.asarray(x, jnp.float32))

  h = _numpy_group_norm(x, np.asarray(block.norm.scale[...]), np.asarray(block.norm.bias[...]),
                        32, vqgan.NORM_EPSILON).reshape(2, 12, channels)
  project = lambda layer, t: t @ np.asarray(layer.kernel[...][0, 0]) + np.asarray(layer.bias[...])
  q, k, v = project(block.q, h), project(block.k, h), project(block.v, h)
  weights = _numpy_softmax(np.einsum("bqc,bkc->bqk", q, k) / np.sqrt(channels))
  reference = x + project(block.proj_out, weights @ v).reshape(x.shape)
  np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_self_attention_equals_numpy_multi_head_attention():
  width, heads, length = 32, 4, 5
  attention = transformer.SelfAttention(width, heads, rngs=nnx.Rngs(0))
  for i, layer in enumerate((attention.query, attention.key, attention.value, attention.out)):
    layer.bias[...] = 0.1 * _normal(20 + i, layer.bias.shape)
  x = np.asarray(_normal(8, (2, length, width)), np.float64)
  out = _call(attention, jnp.asarray(x, jnp.float32))

  def heads_of(layer):  # [B, L, heads, head_dim]
    return np.einsum("blc,chd->blhd", x, np.asarray(layer.kernel[...])) + np.asarray(
        layer.bias[...])

  q, k, v = heads_of(attention.query), heads_of(attention.key), heads_of(attention.value)
  weights = _numpy_softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(width // heads))
  mixed = np.einsum("bhqk,bkhd->bqhd", weights, v)
  reference = np.einsum("bqhd,hdc->bqc", mixed, np.asarray(attention.out.kernel[...]))
  reference += np.asarray(attention.out.bias[...])
  np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- whole networks


@pytest.mark.parametrize("factor", [4, 8, 16])
def test_encoder_and_decoder_shapes_for_each_downsampling_factor(factor):
  config = _config_for_factor(factor)
  encoder = vqgan.Encoder(**config, rngs=nnx.Rngs(0))
  decoder = vqgan.Decoder(**config, rngs=nnx.Rngs(1))
  assert encoder.downsampling_factor == decoder.upsampling_factor == factor
  x = _normal(9, (2, 32, 32, 3))
  z = _apply(nnx.graphdef(encoder))(nnx.state(encoder), x)
  assert z.shape == (2, 32 // factor, 32 // factor, 4)
  image = _apply(nnx.graphdef(decoder))(nnx.state(decoder), z)
  assert image.shape == (2, 32, 32, 3)
  assert np.isfinite(image).all()
  # Attention only where asked: at the latent resolution (last encoder level, mid blocks).
  assert [len(level.attn) for level in encoder.down] == [0] * (len(config["ch_mult"]) - 1) + [1]
  assert [len(level.attn) for level in decoder.up] == [0] * (len(config["ch_mult"]) - 1) + [2]


def test_encoder_decoder_run_in_bfloat16_under_jit_close_to_float32():
  x = _normal(10, (2, 16, 16, 3))
  outputs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    # Same seed → same float32 parameters; only the compute dtype differs.
    encoder = vqgan.Encoder(**TINY, dtype=dtype, rngs=nnx.Rngs(0))
    decoder = vqgan.Decoder(**TINY, dtype=dtype, rngs=nnx.Rngs(1))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(encoder, nnx.Param)))

    @nnx.jit
    def autoencode(encoder, decoder, x):
      z = encoder(x)
      return z, decoder(z)

    outputs[dtype] = autoencode(encoder, decoder, x)
  z16, image16 = outputs[jnp.bfloat16]
  assert z16.dtype == image16.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(image16, np.float32)).all()
  for low, high in zip(outputs[jnp.bfloat16], outputs[jnp.float32]):
    error = np.linalg.norm(np.asarray(low, np.float32) - high) / np.linalg.norm(high)
    assert error < 0.05


@pytest.mark.parametrize("overrides,message", [
    (dict(resolution=15, attn_resolutions=()),
     "15 is not divisible by the downsampling factor f=2"),
    (dict(ch=48), "divisible by the 32 GroupNorm groups"),
    (dict(ch_mult=()), "ch_mult must be a non-empty"),
    (dict(attn_resolutions=(4,)), r"attn_resolutions \(4,\) are not among"),
    (dict(dropout=1.0), "dropout must be in"),
    (dict(num_res_blocks=0), "num_res_blocks must be a positive int"),
])
def test_bad_autoencoder_config_raises_a_clear_value_error(overrides, message):
  config = {**TINY, **overrides}
  for network in (vqgan.Encoder, vqgan.Decoder):
    with pytest.raises(ValueError, match=message):
      network(**config, rngs=nnx.Rngs(0))


def test_bad_inputs_raise_value_errors():
  encoder = vqgan.Encoder(**{**TINY, "ch_mult": (1, 1, 2), "attn_resolutions": ()},
                          rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not divisible by the downsampling factor f=4"):
    encoder(jnp.zeros((1, 18, 16, 3)))
  with pytest.raises(ValueError, match=r"expected latents \[B, h, w, 8\]"):
    vqgan.Decoder(**TINY, rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 8, 4)))
  with pytest.raises(ValueError, match="num_branches"):
    factorized_adapter.FactorizedEncoder(num_branches=0, **TINY, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    factorized_adapter.FactorizedEncoder(num_branches=2, adapter_heads=5, **TINY,
                                         rngs=nnx.Rngs(0))


def _abstract_networks():
  """Every network, built abstractly (shapes and metadata only, no initialization)."""
  builders = {
      "encoder": lambda: vqgan.Encoder(**TINY, rngs=nnx.Rngs(0)),
      "decoder": lambda: vqgan.Decoder(**TINY, dropout=0.1, rngs=nnx.Rngs(0)),
      "factorized": lambda: factorized_adapter.FactorizedEncoder(
          num_branches=2, adapter_depth=1, **TINY, rngs=nnx.Rngs(0)),
  }
  for norm in disc_lib.DISCRIMINATOR_NORMS:
    builders[f"discriminator-{norm}"] = (
        lambda norm=norm: disc_lib.NLayerDiscriminator(ndf=32, norm=norm, rngs=nnx.Rngs(0)))
  for name, build in builders.items():
    yield name, nnx.eval_shape(build)


def test_every_parameter_names_its_logical_axes():
  for name, network in _abstract_networks():
    params = nnx.to_flat_state(nnx.state(network, nnx.Param))
    assert params, name
    for path, variable in params:
      names = variable.get_metadata().get("out_sharding")
      assert names is not None, (name, path)
      assert len(names) == len(variable.shape), (name, path, names)
      assert set(names) <= KNOWN_AXES, (name, path, names)


def test_factorized_encoder_returns_one_map_per_branch_with_separate_parameters():
  encoder = factorized_adapter.FactorizedEncoder(num_branches=3, adapter_depth=1, **TINY,
                                                 rngs=nnx.Rngs(0))
  x = _normal(11, (2, 16, 16, 3))
  graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)
  apply = jax.jit(lambda params: nnx.merge(graphdef, params, rest)(x))
  maps = apply(params)
  assert len(maps) == 3
  assert all(m.shape == (2, 8, 8, 8) for m in maps)
  assert not np.allclose(maps[0], maps[1])

  def maps_with_shifted_params(select):
    """The maps after adding 0.1 to every parameter of the submodule `select` picks."""
    shifted = nnx.clone(encoder)
    part = select(shifted)
    nnx.update(part, jax.tree.map(lambda p: p + 0.1, nnx.state(part, nnx.Param)))
    return apply(nnx.state(shifted, nnx.Param))

  # Branch 1's parameters drive branch 1 only; the trunk drives every branch.
  shifted_branch = maps_with_shifted_params(lambda e: e.adapters[1])
  np.testing.assert_array_equal(shifted_branch[0], maps[0])
  np.testing.assert_array_equal(shifted_branch[2], maps[2])
  assert not np.allclose(shifted_branch[1], maps[1])
  shifted_trunk = maps_with_shifted_params(lambda e: e.conv_in)
  assert not any(np.allclose(a, b) for a, b in zip(shifted_trunk, maps))


def test_factorized_adapter_rejects_a_grid_other_than_its_position_embedding():
  adapter = factorized_adapter.FactorizedAdapter(64, 8, 4, depth=1, rngs=nnx.Rngs(0))
  assert _call(adapter, _normal(12, (1, 4, 4, 64))).shape == (1, 4, 4, 8)
  with pytest.raises(ValueError, match=r"expects features \[B, 4, 4, 64\]"):
    adapter(_normal(12, (1, 8, 8, 64)))


def test_encoder_sharded_over_a_4x2_mesh_equals_single_device():
  encoder = vqgan.Encoder(**TINY, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(encoder)
  apply = _apply(graphdef)
  x = _normal(13, (8, 16, 16, 3))
  single = apply(state, x)

  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  shardings = parallel.state_shardings(state, mesh, rules=(("conv_out", "fsdp"),))
  sharded_state = jax.device_put(state, shardings)
  assert any("fsdp" in s.spec for s in jax.tree.leaves(shardings))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded = apply(sharded_state, x_sharded)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- discriminator


@pytest.mark.parametrize("norm", disc_lib.DISCRIMINATOR_NORMS)
def test_discriminator_outputs_one_logit_per_patch(norm):
  assert disc_lib.patch_grid_size(256, 3) == 30  # taming's 30×30 for 256×256
  model = disc_lib.NLayerDiscriminator(ndf=32, n_layers=3, norm=norm, rngs=nnx.Rngs(0))
  logits = _call(model, _normal(14, (2, 32, 48, 3)))
  assert logits.shape == (2, 2, 4, 1)  # 32 → 16 → 8 → 4 → 3 → 2; 48 → … → 4
  assert np.isfinite(logits).all()
  shallow = disc_lib.NLayerDiscriminator(ndf=32, n_layers=2, norm=norm, rngs=nnx.Rngs(0))
  assert _call(shallow, _normal(14, (1, 32, 32, 3))).shape == (1, 6, 6, 1)


def test_discriminator_group_norm_logits_do_not_depend_on_the_rest_of_the_batch():
  images = _normal(15, (4, 16, 16, 3))
  group = disc_lib.NLayerDiscriminator(ndf=32, n_layers=2, norm="group", rngs=nnx.Rngs(0))
  np.testing.assert_allclose(_call(group, images)[:2], _call(group, images[:2]), rtol=1e-5,
                             atol=1e-5)
  batch = disc_lib.NLayerDiscriminator(ndf=32, n_layers=2, norm="batch", rngs=nnx.Rngs(0))
  assert not np.allclose(_call(batch, images)[:2], _call(batch, images[:2]), atol=1e-3)


@nnx.jit
def _discriminator_layers(model, x):
  """D(x) layer by layer: ([(each norm's input, its standardized value before the affine
  map, its output)], the logits), and D(x) itself."""
  h = jax.nn.leaky_relu(model.conv_in(x), disc_lib.LEAKY_RELU_SLOPE)
  norms = []
  for block in model.blocks:
    pre = block.conv(h)
    out = block.norm(pre)
    norms.append((pre, block.norm.standardize(pre), out))
    h = jax.nn.leaky_relu(out, disc_lib.LEAKY_RELU_SLOPE)
  return norms, model.conv_out(h), model(x)


def test_batch_norm_discriminator_normalizes_every_call_with_its_own_batch():
  """taming's train-mode BatchNorm2d: real and fake batches, called separately, are
  each standardized per channel (mean 0, biased variance 1 over B, H, W) with their own
  statistics, before the affine map; D's state is its parameters alone."""
  model = nnx.jit(lambda: disc_lib.NLayerDiscriminator(
      ndf=32, n_layers=2, norm="batch", init="taming", rngs=nnx.Rngs(0)))()
  assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))  # no running stats
  real = _normal(21, (4, 16, 16, 3))
  fake = 3.0 * _normal(22, (4, 16, 16, 3)) + 2.0  # other statistics
  for images in (real, fake):
    norms, logits, called = _discriminator_layers(model, images)
    np.testing.assert_allclose(logits, called, rtol=1e-5, atol=1e-5)
    for block, (pre, z, out) in zip(model.blocks, norms):
      pre, z = np.asarray(pre, np.float64), np.asarray(z, np.float64)
      np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
      # σ²/(σ² + ε) with PyTorch's ε = 1e-5: N(0, 0.02) weights keep σ² small.
      var = pre.var(axis=(0, 1, 2))
      np.testing.assert_allclose(z.var(axis=(0, 1, 2)), var / (var + 1e-5), rtol=1e-4)
      assert (z.var(axis=(0, 1, 2)) > 0.95).all()
      np.testing.assert_allclose(out, z * block.norm.scale[...] + block.norm.bias[...],
                                 rtol=1e-5, atol=1e-5)


def test_batch_norm_discriminator_uses_global_batch_statistics_when_sharded():
  """Real and fake, each split over 8 devices: the same logits as on one device."""
  model = disc_lib.NLayerDiscriminator(ndf=32, n_layers=2, norm="batch", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  apply = jax.jit(lambda params, real, fake: (nnx.merge(graphdef, params)(real),
                                              nnx.merge(graphdef, params)(fake)))
  real, fake = _normal(23, (8, 16, 16, 3)), 2.0 * _normal(24, (8, 16, 16, 3)) + 0.5
  single = apply(params, real, fake)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  sharded = apply(params, jax.device_put(real, batch), jax.device_put(fake, batch))
  assert len(sharded[0].sharding.device_set) == 8
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               sharded, single)


def _flat_params(module):
  return {"/".join(map(str, path)): value[...]
          for path, value in nnx.to_flat_state(nnx.state(module))}


@jax.jit
def _initialized_discriminators():
  """(taming-size D with taming's init and BatchNorm, a small one with GroupNorm, the
  small default D, and the default rebuilt layer by layer), as flat parameter dicts:
  one compiled program, as initializing op by op compiles every random op per shape."""
  taming = disc_lib.NLayerDiscriminator(ndf=64, n_layers=3, norm="batch", init="taming",
                                        rngs=nnx.Rngs(1))
  group = disc_lib.NLayerDiscriminator(ndf=32, n_layers=2, init="taming", rngs=nnx.Rngs(1))
  default = disc_lib.NLayerDiscriminator(ndf=32, n_layers=2, rngs=nnx.Rngs(0))
  # What the defaults built before the options existed: taming's layout from
  # vqgan.conv/group_norm with Flax's initializers, drawn in the same order.
  rngs = nnx.Rngs(0)
  kw = dict(padding=1, rngs=rngs)
  layers = {"conv_in": vqgan.conv(3, 32, 4, stride=2, **kw)}
  for n, (cin, cout, stride) in enumerate(((32, 64, 2), (64, 128, 1))):
    layers[f"blocks/{n}/conv"] = vqgan.conv(cin, cout, 4, stride=stride, use_bias=False, **kw)
    layers[f"blocks/{n}/norm"] = vqgan.group_norm(cout, epsilon=1e-5, rngs=rngs)
  layers["conv_out"] = vqgan.conv(128, 1, 4, stride=1, **kw)
  reference = {f"{prefix}/{path}": value for prefix, layer in layers.items()
               for path, value in _flat_params(layer).items()}
  return _flat_params(taming), _flat_params(group), _flat_params(default), reference


def test_taming_init_has_taming_statistics_and_the_default_is_unchanged():
  taming, group, default, reference = jax.tree.map(
      lambda x: np.asarray(x, np.float64), _initialized_discriminators())
  # taming's own size (ndf 64, 3 layers): the last stride-2 conv has 4·4·256·512 weights.
  kernel = taming["blocks/2/conv/kernel"]
  assert kernel.size == 2**21
  # Standard errors: 0.02/√n for the mean, about 0.02/√(2n) for the std.
  assert abs(kernel.mean()) < 5 * 0.02 / np.sqrt(kernel.size)
  assert abs(kernel.std() / 0.02 - 1.0) < 5 / np.sqrt(2 * kernel.size)
  for name in ("conv_in", "conv_out", "blocks/0/conv"):
    assert abs(taming[f"{name}/kernel"].std() / 0.02 - 1.0) < 0.1, name
  scales = np.concatenate([taming[f"blocks/{n}/norm/scale"] for n in range(3)])
  assert abs(scales.mean() - 1.0) < 5 * 0.02 / np.sqrt(scales.size)
  assert abs(scales.std() / 0.02 - 1.0) < 5 / np.sqrt(2 * scales.size)
  assert not any(np.any(taming[f"blocks/{n}/norm/bias"]) for n in range(3))
  # Conv biases keep PyTorch's U(±1/√fan_in), which taming's weights_init leaves alone.
  bias, bound = np.abs(taming["conv_in/bias"]), 1 / np.sqrt(3 * 16)
  assert bias.max() <= bound and bias.max() > bound / 2
  assert abs(group["blocks/1/norm/scale"].std() / 0.02 - 1.0) < 0.5
  assert not np.any(group["blocks/1/norm/bias"])

  # The defaults (norm='group', init='default'): the same parameters as before.
  assert default.keys() == reference.keys()
  for name, value in default.items():
    np.testing.assert_array_equal(value, reference[name], err_msg=name)


def test_discriminator_bad_config_raises():
  with pytest.raises(ValueError, match="norm must be one of"):
    disc_lib.NLayerDiscriminator(norm="actnorm", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"init must be one of \('default', 'taming'\)"):
    disc_lib.NLayerDiscriminator(init="xavier", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible by num_groups=32"):
    disc_lib.NLayerDiscriminator(ndf=8, norm="group", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="too small"):
    disc_lib.NLayerDiscriminator(ndf=32, rngs=nnx.Rngs(0))(jnp.zeros((1, 16, 16, 3)))


# -------------------------------------------------------------------- GAN losses

REAL = np.array([[2.0, 0.5], [-1.0, 0.0]])
FAKE = np.array([[-2.0, 0.3], [1.5, -0.5]])


def test_hinge_losses_equal_their_formulas():
  # relu(1 − real) = [0, .5, 2, 1] → mean .875; relu(1 + fake) = [0, 1.3, 2.5, .5] → 1.075
  np.testing.assert_allclose(gan_losses.discriminator_loss(REAL, FAKE, kind="hinge"),
                             0.5 * (0.875 + 1.075), rtol=1e-6)
  np.testing.assert_allclose(gan_losses.generator_loss(FAKE, kind="hinge"),
                             -(-2.0 + 0.3 + 1.5 - 0.5) / 4, rtol=1e-6)


def test_vanilla_losses_equal_cross_entropy_and_non_saturating_formulas():
  sigmoid = lambda t: 1 / (1 + np.exp(-t))
  expected_d = 0.5 * (np.mean(-np.log(sigmoid(REAL))) + np.mean(-np.log(1 - sigmoid(FAKE))))
  np.testing.assert_allclose(gan_losses.discriminator_loss(REAL, FAKE, kind="vanilla"),
                             expected_d, rtol=1e-6)
  np.testing.assert_allclose(gan_losses.generator_loss(FAKE, kind="vanilla"),
                             np.mean(-np.log(sigmoid(FAKE))), rtol=1e-6)


def test_gan_losses_are_float32_for_bfloat16_logits_and_reject_unknown_kinds():
  loss = gan_losses.discriminator_loss(jnp.asarray(REAL, jnp.bfloat16),
                                       jnp.asarray(FAKE, jnp.bfloat16))
  assert loss.dtype == jnp.float32
  assert jax.jit(gan_losses.generator_loss)(jnp.asarray(FAKE, jnp.float32)).shape == ()
  with pytest.raises(ValueError, match="must be one of"):
    gan_losses.generator_loss(FAKE, kind="wasserstein")
