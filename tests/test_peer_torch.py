"""benchmarks/peer_torch.py's PyTorch peer is the same model as ours (skipped without torch)."""
import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from benchmarks import peer_torch  # noqa: E402
from benchmarks import peer_torch_models as tm  # noqa: E402
from rvq_jax.models.pretrained import lpips as lpips_lib  # noqa: E402
from rvq_jax.models.priors.ar import ARPrior  # noqa: E402
from rvq_jax.models.tokenizer.discriminator import NLayerDiscriminator  # noqa: E402
from rvq_jax.train.tokenizer_stage import build_tokenizer  # noqa: E402


def _count(module) -> int:
  return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def test_tokenizer_parameter_counts_match_ours():
  config = peer_torch.size_config("quick")
  loss = config.tokenizer.loss
  ours_g = nnx.eval_shape(lambda: build_tokenizer(config, rngs=nnx.Rngs(0)))
  ours_d = nnx.eval_shape(lambda: NLayerDiscriminator(
      ndf=loss.disc_channels, n_layers=loss.disc_layers, norm=loss.disc_norm,
      rngs=nnx.Rngs(0)))
  ours_lpips = nnx.eval_shape(lambda: lpips_lib.LPIPS(rngs=nnx.Rngs(0)))
  theirs_g, theirs_d, theirs_lpips = peer_torch.torch_tokenizer_modules(config)
  assert tm.count_parameters(theirs_g) == _count(ours_g)
  assert tm.count_parameters(theirs_d) == _count(ours_d)
  ours_lpips_count = int(sum(x.size for x in jax.tree.leaves(nnx.state(ours_lpips))))
  assert tm.count_parameters(theirs_lpips) == ours_lpips_count


def test_attention_level_and_ar_parameter_counts_match_ours():
  # An attention resolution and a width change inside a level (nin_shortcut).
  config = peer_torch.size_config("quick")
  config.tokenizer.model.update(ch_mult=(1, 2, 2), attn_resolutions=(8,), num_res_blocks=2)
  theirs_g, _, _ = peer_torch.torch_tokenizer_modules(config)
  ours_g = nnx.eval_shape(lambda: build_tokenizer(config, rngs=nnx.Rngs(0)))
  assert tm.count_parameters(theirs_g) == _count(ours_g)
  prior = nnx.eval_shape(lambda: ARPrior(vocab_size=64, grid_size=(4, 4), width=32, depth=2,
                                         num_heads=2, rngs=nnx.Rngs(0)))
  gpt = tm.GPT(vocab_size=64, length=16, width=32, depth=2, heads=2)
  assert tm.count_parameters(gpt) == _count(prior)
  assert gpt.sample(2).shape == (2, 16)


def test_gumbel_semantics_match_taming_on_identical_noise():
  pair = peer_torch.gumbel_pair(batch=2, side=4, in_features=16, num_codes=32, code_dim=8)
  ours, theirs = pair["ours"], pair["torch"]
  # The noise decides the tokens: with it misaligned (or ignored) the samples would
  # differ from taming's, and most would equal the plain argmax.
  np.testing.assert_array_equal(ours["indices"], theirs["indices"])
  assert np.mean(theirs["indices"] != theirs["argmax"]) > 0.25
  np.testing.assert_allclose(ours["quantized"], theirs["quantized"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-4)
  for name in ("grad_z", "grad_kernel", "grad_bias", "grad_codebook"):
    scale = np.max(np.abs(theirs[name]))
    np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-5 * scale,
                               err_msg=name)


def test_torch_step_runs_and_updates_both_networks():
  config = peer_torch.size_config("quick")
  torch.manual_seed(0)
  tokenizer, discriminator, lpips = peer_torch.torch_tokenizer_modules(config)
  step = peer_torch.torch_tokenizer_step(config, tokenizer, discriminator, lpips)
  before = [p.detach().clone() for p in (tokenizer.encoder.conv_in.weight,
                                         discriminator.main[0].weight)]
  images = torch.rand(2, 3, 16, 16) * 2 - 1
  metrics = {name: (float(v.detach()) if isinstance(v, torch.Tensor) else v)
             for name, v in step(images).items()}
  assert all(np.isfinite(v) for v in metrics.values() if v is not None)
  assert float(metrics["gan_weight"]) > 0
  after = (tokenizer.encoder.conv_in.weight, discriminator.main[0].weight)
  assert all(not torch.equal(a, b) for a, b in zip(before, after))
