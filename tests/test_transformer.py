"""Shared transformer blocks: masks, KV cache, AdaLN-Zero, logical axis names."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvq_jax.models.layers import transformer
from rvq_jax.models.priors import conditioning

WIDTH, HEADS = 32, 4


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _numpy_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_masked_attention_equals_numpy_reference():
  attention = transformer.SelfAttention(WIDTH, HEADS, rngs=nnx.Rngs(0))
  x = np.asarray(_normal(1, (2, 5, WIDTH)), np.float64)
  mask = np.array(jax.random.bernoulli(jax.random.key(2), 0.6, (2, 5, 5)))
  mask[:, :, 0] = True  # every query sees at least one key
  out = nnx.jit(lambda m, x, k: m(x, mask=k))(attention, jnp.asarray(x, jnp.float32), mask)
  heads_of = lambda layer: np.einsum("blc,chd->blhd", x, np.asarray(layer.kernel[...])) + (
      np.asarray(layer.bias[...]))
  q, k, v = heads_of(attention.query), heads_of(attention.key), heads_of(attention.value)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(WIDTH // HEADS)
  weights = _numpy_softmax(np.where(mask[:, None], logits, -np.inf))
  mixed = np.einsum("bhqk,bkhd->bqhd", weights, v)
  reference = np.einsum("bqhd,hdc->bqc", mixed, np.asarray(attention.out.kernel[...]))
  reference += np.asarray(attention.out.bias[...])
  np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)


def test_causal_block_output_at_i_ignores_inputs_after_i():
  block = transformer.TransformerBlock(WIDTH, HEADS, causal=True, rngs=nnx.Rngs(0))
  plain = transformer.TransformerBlock(WIDTH, HEADS, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 6, WIDTH))
  i = 2
  x_changed = x.at[:, i + 1:].set(_normal(2, (2, 6 - i - 1, WIDTH)))
  apply = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(apply(block, x)[:, :i + 1], apply(block, x_changed)[:, :i + 1],
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(apply(plain, x)[:, :i + 1], apply(plain, x_changed)[:, :i + 1])
  # Jacobian structure: d out_i / d x_j = 0 for every j > i.
  jac = jax.jacobian(lambda x: block(x[None])[0].sum(-1))(x[0])  # [L, L, W]
  upper = np.triu(np.ones((6, 6), bool), k=1)
  assert np.all(np.asarray(jnp.abs(jac).sum(-1))[upper] == 0)
  assert np.all(np.asarray(jnp.abs(jac).sum(-1))[~upper] > 0)


def test_kv_cache_decoding_equals_the_full_causal_pass():
  model = transformer.Transformer(WIDTH, 2, HEADS, causal=True, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 7, WIDTH))

  @nnx.jit
  def incremental(model, x):
    cache = model.init_cache(2, 8)  # one slot more than used: unwritten slots are masked
    first, cache = model(x[:, :3], cache=cache)  # prefill a 3-token prefix
    outs = [first]
    for t in range(3, 7):
      out, cache = model(x[:, t:t + 1], cache=cache)
      outs.append(out)
    return jnp.concatenate(outs, axis=1), cache.__getitem__(0).index

  out, index = incremental(model, x)
  np.testing.assert_allclose(out, nnx.jit(lambda m, x: m(x))(model, x), rtol=1e-5, atol=1e-5)
  assert int(index) == 7


def test_adaptive_block_is_identity_at_init_and_then_uses_the_conditioning():
  block = transformer.TransformerBlock(WIDTH, HEADS, adaptive_norm_width=16,
                                       rngs=nnx.Rngs(0))
  x, c = _normal(1, (2, 5, WIDTH)), _normal(2, (2, 16))
  np.testing.assert_array_equal(block(x, conditioning=c), x)
  # Affine-free norms: the only normalization parameters are in the modulation.
  names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(block, nnx.Param))}
  assert not any(name.startswith("ln_") for name in names), names
  block.modulation.kernel[...] = 0.1 * _normal(3, block.modulation.kernel.shape)
  out, out_other = block(x, conditioning=c), block(x, conditioning=-c)
  assert not np.allclose(out, x) and not np.allclose(out, out_other)
  with pytest.raises(ValueError, match="conditioning"):
    block(x)


def test_dropout_only_in_training_mode():
  block = transformer.TransformerBlock(WIDTH, HEADS, dropout=0.5, rngs=nnx.Rngs(0))
  x = _normal(1, (2, 5, WIDTH))
  np.testing.assert_array_equal(block(x), block(x, deterministic=True))
  assert not np.allclose(block(x), block(x, deterministic=False, rngs=nnx.Rngs(dropout=1)))
  with pytest.raises(ValueError, match="rngs"):
    block(x, deterministic=False)


def test_every_parameter_has_logical_axis_names():
  models = [transformer.Transformer(WIDTH, 2, HEADS, adaptive_norm_width=8, rngs=nnx.Rngs(0)),
            transformer.Transformer(WIDTH, 1, HEADS, rngs=nnx.Rngs(0)),
            conditioning.ConditionEmbedding("semantic", WIDTH, num_classes=5,
                                            grid_size=(2, 3), rngs=nnx.Rngs(0))]
  for model in models:
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      names = variable.get_metadata().get("out_sharding")
      assert names is not None and len(names) == variable[...].ndim, (path, names)


def test_bad_configurations_raise():
  with pytest.raises(ValueError, match="divisible"):
    transformer.TransformerBlock(30, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible"):
    transformer.Transformer(30, 2, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="depth"):
    transformer.Transformer(32, 0, 4, rngs=nnx.Rngs(0))


def test_condition_embedding_kinds_and_null_condition():
  rngs = nnx.Rngs(0)
  none = conditioning.ConditionEmbedding("none", WIDTH, rngs=rngs)
  assert none(None, batch_size=3).shape == (3, 1, WIDTH)
  classes = conditioning.ConditionEmbedding("class", WIDTH, num_classes=4, rngs=rngs)
  labels = jnp.array([0, 3, 2])
  out = classes(labels, drop=jnp.array([False, True, False]))
  assert out.shape == (3, 1, WIDTH)
  table = np.asarray(classes.embedding.embedding[...])
  np.testing.assert_allclose(out[:, 0], table[[0, 4, 2]])  # row 4 = the null class
  semantic = conditioning.ConditionEmbedding("semantic", WIDTH, num_classes=5,
                                             grid_size=(2, 3), rngs=rngs)
  grid = jnp.arange(12).reshape(2, 2, 3) % 5
  out = semantic(grid, drop=jnp.array([False, True]))
  assert out.shape == (2, 6, WIDTH)
  pos = np.asarray(semantic.pos_embed[...])
  table = np.asarray(semantic.embedding.embedding[...])
  np.testing.assert_allclose(out[0], table[np.asarray(grid[0]).ravel()] + pos, rtol=1e-6)
  np.testing.assert_allclose(out[1], table[[5] * 6] + pos, rtol=1e-6)
  with pytest.raises(ValueError, match="condition"):
    classes(None, batch_size=3)
  with pytest.raises(ValueError, match="condition"):
    none(labels)
  with pytest.raises(ValueError, match="must be"):
    semantic(jnp.zeros((2, 3, 2), jnp.int32))
  with pytest.raises(ValueError, match="kind"):
    conditioning.ConditionEmbedding("text", WIDTH, rngs=rngs)


def test_downsample_label_map_is_the_cell_mode_with_ties_to_the_smallest_label():
  rng = np.random.default_rng(0)
  label_map = rng.integers(0, 4, (3, 8, 12))
  label_map[0, :4, :4] = np.array([[2, 1] * 2] * 4)  # a tie between 1 and 2 → 1
  out = np.asarray(conditioning.downsample_label_map(jnp.asarray(label_map), (2, 3)))
  reference = np.zeros((3, 2, 3), int)
  for b in range(3):
    for i in range(2):
      for j in range(3):
        counts = np.bincount(label_map[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4].ravel())
        reference[b, i, j] = np.argmax(counts)  # first maximum = smallest label
  np.testing.assert_array_equal(out, reference)
  assert out[0, 0, 0] == 1
  with pytest.raises(ValueError, match="divide"):
    conditioning.downsample_label_map(jnp.asarray(label_map), (3, 3))
