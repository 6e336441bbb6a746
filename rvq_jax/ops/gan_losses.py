"""GAN losses on discriminator logits: pure functions, no Flax, no state.

Logits may have any shape (PatchGAN maps [B, H', W', 1]); every loss is a mean over all
elements, computed in float32 (or wider) whatever the logits' dtype.

  kind      discriminator loss                                  generator loss
  'hinge'   ½·(mean relu(1 − D(x)) + mean relu(1 + D(x̂)))      −mean D(x̂)
  'vanilla' ½·(mean softplus(−D(x)) + mean softplus(D(x̂)))     mean softplus(−D(x̂))

softplus(−l) = −log σ(l), so 'vanilla' is the original GAN's cross-entropy for D and
its non-saturating form, −log D(x̂), for G. (taming uses −mean D(x̂) for G with either
D loss; that is `hinge_generator_loss`.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

GAN_LOSS_KINDS = ("hinge", "vanilla")


def _float(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """½·(mean relu(1 − logits_real) + mean relu(1 + logits_fake)) → scalar."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _float(logits_real)))
                + jnp.mean(jax.nn.relu(1.0 + _float(logits_fake))))


def vanilla_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """½·(mean −log σ(logits_real) + mean −log(1 − σ(logits_fake))) → scalar."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-_float(logits_real)))
                + jnp.mean(jax.nn.softplus(_float(logits_fake))))


def hinge_generator_loss(logits_fake: jax.Array) -> jax.Array:
  """−mean logits_fake → scalar (taming's generator loss)."""
  return -jnp.mean(_float(logits_fake))


def non_saturating_generator_loss(logits_fake: jax.Array) -> jax.Array:
  """mean −log σ(logits_fake) → scalar."""
  return jnp.mean(jax.nn.softplus(-_float(logits_fake)))


def _check_kind(kind: str) -> None:
  if kind not in GAN_LOSS_KINDS:
    raise ValueError(f"GAN loss kind must be one of {GAN_LOSS_KINDS}, got {kind!r}.")


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, *,
                       kind: str = "hinge") -> jax.Array:
  """The discriminator loss of `kind` ('hinge' or 'vanilla') → scalar."""
  _check_kind(kind)
  if kind == "hinge":
    return hinge_discriminator_loss(logits_real, logits_fake)
  return vanilla_discriminator_loss(logits_real, logits_fake)


def generator_loss(logits_fake: jax.Array, *, kind: str = "hinge") -> jax.Array:
  """The generator loss of `kind`: 'hinge' → −mean D(x̂); 'vanilla' → non-saturating."""
  _check_kind(kind)
  if kind == "hinge":
    return hinge_generator_loss(logits_fake)
  return non_saturating_generator_loss(logits_fake)
