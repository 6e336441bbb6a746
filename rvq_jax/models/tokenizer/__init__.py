"""The image tokenizer: VQGAN encoder/decoder, FQ adapter, discriminator and quantizers."""
from rvq_jax.models.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
