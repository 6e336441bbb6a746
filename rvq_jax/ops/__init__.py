"""The quantizer math as pure functions: no Flax, no state, jit/grad/vmap-safe.

Everything here is deterministic given its PRNG key and preserves the dtype of its
tensor outputs; probabilities, logs and entropies are computed in float32. Statistics
over positions are global under `jax.jit` with sharded inputs, and take an `axis_name`
for use inside `jax.shard_map`.
"""
from rvq_jax.ops import diffusion
from rvq_jax.ops import distances
from rvq_jax.ops.categorical import CategoricalQuantized
from rvq_jax.ops.categorical import GumbelSource
from rvq_jax.ops.categorical import categorical_quantize
from rvq_jax.ops.codebook_losses import disentanglement_loss
from rvq_jax.ops.codebook_losses import ema_codebook_update
from rvq_jax.ops.codebook_losses import vq_losses
from rvq_jax.ops.codebook_stats import code_histogram
from rvq_jax.ops.codebook_stats import codebook_stats
from rvq_jax.ops.contrastive import pcl_weights
from rvq_jax.ops.contrastive import probabilistic_contrastive_loss
from rvq_jax.ops.diffusion import DiffusionSchedule
from rvq_jax.ops.diffusion import log_q_posterior
from rvq_jax.ops.diffusion import log_q_xt_given_x0
from rvq_jax.ops.diffusion import log_q_xt_given_xtm1
from rvq_jax.ops.diffusion import log_strided_posterior
from rvq_jax.ops.diffusion import make_schedule
from rvq_jax.ops.diffusion import q_sample
from rvq_jax.ops.diffusion import sample_timesteps
from rvq_jax.ops.diffusion import truncate
from rvq_jax.ops.diffusion import update_loss_history
from rvq_jax.ops.diffusion import vlb_terms
from rvq_jax.ops.distances import code_distances
from rvq_jax.ops.distances import lookup
from rvq_jax.ops.distances import nearest_code
from rvq_jax.ops.divergences import entropy_loss
from rvq_jax.ops.divergences import kl_to_uniform
from rvq_jax.ops.divergences import mean_position_entropy
from rvq_jax.ops.divergences import per_position_kl_to_uniform
from rvq_jax.ops.gumbel import PRNG_IMPLS
from rvq_jax.ops.gumbel import gumbel_noise
from rvq_jax.ops.gumbel import gumbel_rows
from rvq_jax.ops.gumbel import gumbel_softmax
from rvq_jax.ops.info_nce import info_nce
from rvq_jax.ops.masking import masked_select
from rvq_jax.ops.masking import num_masked
from rvq_jax.ops.masking import positions_to_mask
from rvq_jax.ops.masking import stochastic_mask
from rvq_jax.ops.masking import stochastic_positions
from rvq_jax.ops.reductions import argmax_last
from rvq_jax.ops.sampling import classifier_free_guidance
from rvq_jax.ops.sampling import filter_logits
from rvq_jax.ops.sampling import sample_logits
from rvq_jax.ops.sampling import top_k_filter
from rvq_jax.ops.sampling import top_p_filter
from rvq_jax.ops.straight_through import one_hot_lookup
from rvq_jax.ops.straight_through import straight_through
from rvq_jax.ops.straight_through import straight_through_argmax

__all__ = [
    "DiffusionSchedule",
    "log_q_posterior",
    "log_q_xt_given_x0",
    "log_q_xt_given_xtm1",
    "log_strided_posterior",
    "make_schedule",
    "q_sample",
    "sample_timesteps",
    "truncate",
    "update_loss_history",
    "vlb_terms",
    "argmax_last",
    "CategoricalQuantized",
    "categorical_quantize",
    "gumbel_noise",
    "gumbel_rows",
    "GumbelSource",
    "PRNG_IMPLS",
    "positions_to_mask",
    "stochastic_positions",
    "one_hot_lookup",
    "code_distances",
    "code_histogram",
    "codebook_stats",
    "disentanglement_loss",
    "ema_codebook_update",
    "entropy_loss",
    "gumbel_softmax",
    "info_nce",
    "kl_to_uniform",
    "mean_position_entropy",
    "lookup",
    "masked_select",
    "nearest_code",
    "num_masked",
    "pcl_weights",
    "per_position_kl_to_uniform",
    "probabilistic_contrastive_loss",
    "stochastic_mask",
    "straight_through",
    "straight_through_argmax",
    "vq_losses",
    "classifier_free_guidance",
    "filter_logits",
    "sample_logits",
    "top_k_filter",
    "top_p_filter",
]
