"""The image tokenizer: VQGAN encoder → quantizer → VQGAN decoder, any quantizer kind."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx

from rvq_jax.models.layers import dtypes
from rvq_jax.models.tokenizer import vqgan
from rvq_jax.models.tokenizer.factorized_adapter import FactorizedEncoder
from rvq_jax.models.tokenizer.quantizers import QuantizerOutput
from rvq_jax.models.tokenizer.quantizers import registry
from rvq_jax.models.tokenizer.representation_head import FeaturePredictionHead

# Global feature width of the teachers rvq_jax ships (VGG relu5 pooled).
TEACHER_FEATURE_DIM = 512


class Tokenizer(nnx.Module):
  """Images [B, H, W, 3] in [-1, 1] ↔ tokens [B, H/f, W/f] (or [..., M] for FQ).

  A 1×1 `quant_conv` maps the encoder output to what the quantizer takes (its code width
  for VQ; the encoder width for the categorical quantizers, whose projection makes the
  logits), and `post_quant_conv` maps codes back to the decoder's width, as taming. In FQ
  mode the encoder has one adapter branch per sub-codebook on a shared trunk, each with
  its own `quant_conv`; the decoder sees the concatenated sub-codes.

  Args:
    model: `tokenizer.model` (VQGAN widths and depths, FQ adapter and head sizes, dtype,
      remat).
    quantizer: `tokenizer.quantizer` (kind, num_codes, code_dim, the kind's options).
    image_size: the side of the square images it is built for (attention resolutions).
    representation_head: build FQGAN's representation head (factorized kinds only).
  """

  def __init__(self, model: Mapping[str, Any], quantizer: Mapping[str, Any], *,
               image_size: int, representation_head: bool = False, rngs: nnx.Rngs):
    spec = registry.get(quantizer["kind"])
    dtype = dtypes.compute_dtype(model["dtype"])
    # Exports written before the option existed have no 'remat': 'none'.
    remat = model["remat"] if "remat" in model else "none"
    self.factorized = spec.factorized
    # Tokens: K codes (per sub-codebook), M per position, on an h×w grid.
    self.vocab_size = int(quantizer["num_codes"])
    self.num_subtokens = spec.num_subtokens(registry.options_of(quantizer))
    self.downsampling_factor = 2 ** (len(model["ch_mult"]) - 1)
    self.grid_size = image_size // self.downsampling_factor
    architecture = dict(ch=model["ch"], ch_mult=tuple(model["ch_mult"]),
                        num_res_blocks=model["num_res_blocks"],
                        attn_resolutions=tuple(model["attn_resolutions"]),
                        resolution=image_size, z_channels=model["z_channels"],
                        dropout=model["dropout"], dtype=dtype, remat=remat, rngs=rngs)
    quantizer_in = spec.input_width(model["z_channels"], quantizer["code_dim"])
    self.quantizer = registry.build_quantizer(quantizer, in_features=quantizer_in, rngs=rngs)
    if self.factorized:
      self.encoder = FactorizedEncoder(num_branches=self.num_subtokens,
                                       adapter_depth=model["adapter_depth"],
                                       adapter_heads=model["adapter_heads"], **architecture)
      self.quant_convs = nnx.List([
          vqgan.conv(model["z_channels"], quantizer_in, 1, dtype=dtype, rngs=rngs)
          for _ in range(self.num_subtokens)])
    else:
      self.encoder = vqgan.Encoder(**architecture)
      self.quant_conv = vqgan.conv(model["z_channels"], quantizer_in, 1, dtype=dtype,
                                   rngs=rngs)
    self.post_quant_conv = vqgan.conv(self.quantizer.code_dim, model["z_channels"], 1,
                                      dtype=dtype, rngs=rngs)
    self.decoder = vqgan.Decoder(**architecture)
    if representation_head and not self.factorized:
      raise ValueError(f"the representation head needs a factorized quantizer (fq, regfq), "
                       f"not {quantizer['kind']!r}.")
    # FQGAN's representation head: trained with the tokenizer, used only by its loss.
    self.representation_head = nnx.data(FeaturePredictionHead(
        quantizer["code_dim"], model["representation_head_width"],
        num_blocks=model["representation_head_blocks"],
        num_heads=model["representation_head_heads"], grid_size=self.grid_size,
        target_dim=TEACHER_FEATURE_DIM, dtype=dtype, remat=remat, rngs=rngs)
        if representation_head else None)

  def quantizer_input(self, images: jax.Array) -> jax.Array | list[jax.Array]:
    """images [B, H, W, 3] → the quantizer's input [B, H/f, W/f, C] (FQ: one per branch)."""
    if self.factorized:
      return [conv(h) for conv, h in zip(self.quant_convs, self.encoder(images))]
    return self.quant_conv(self.encoder(images))

  def encode(self, images: jax.Array, *, key: jax.Array | None = None, step=None,
             deterministic: bool | None = None) -> QuantizerOutput:
    """images [B, H, W, 3] → the quantizer's output on the token grid [B, H/f, W/f]."""
    return self.quantizer(self.quantizer_input(images), key=key, step=step,
                          deterministic=deterministic)

  def decode(self, quantized: jax.Array) -> jax.Array:
    """Codes [B, h, w, D] → images [B, h·f, w·f, 3]."""
    return self.decoder(self.post_quant_conv(quantized))

  def decode_with_last_input(self, quantized: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Codes → (images, the last layer's input [B, H, W, C]): images = last_layer(input).
    The adaptive GAN weight needs that input to form the last layer's gradients."""
    last_input = self.decoder.last_layer_input(self.post_quant_conv(quantized))
    return self.decoder.conv_out(last_input), last_input

  def last_layer(self) -> nnx.Module:
    """The decoder's last layer, whose kernel is at `last_layer_path()`."""
    return self.decoder.conv_out

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Tokens [B, h, w] (or [B, h, w, M]) → images."""
    return self.decode(self.quantizer.decode_indices(indices))

  def subcode(self, quantized: jax.Array, branch: int) -> jax.Array:
    """The quantized sub-code of FQ branch `branch`: [B, h, w, ΣD] → [B, h, w, D]."""
    width = self.quantizer.code_dim // self.quantizer.num_branches
    return quantized[..., branch * width:(branch + 1) * width]

  def tokenize(self, images: jax.Array) -> jax.Array:
    """images → deterministic (argmax) tokens, as the priors see them."""
    return self.encode(images, deterministic=True).indices

  def __call__(self, images: jax.Array, *, key: jax.Array | None = None, step=None,
               deterministic: bool | None = None) -> tuple[jax.Array, QuantizerOutput]:
    """images → (reconstructions [B, H, W, 3], QuantizerOutput)."""
    output = self.encode(images, key=key, step=step, deterministic=deterministic)
    return self.decode(output.quantized), output

  @staticmethod
  def last_layer_path() -> tuple[str, ...]:
    """Where the decoder's last kernel sits in the model's state (the GAN weight's layer)."""
    return ("decoder", "conv_out", "kernel")
