"""Flax NNX modules: tokenizer networks, quantizers, pretrained feature networks."""
