"""The training step against PyTorch: the same tokenizer, quantizer, LPIPS and PatchGAN.

A script, not a test: `python -m benchmarks.peer_torch` (see benchmarks/README.md).

Three comparisons, each side by side in one process on the same CPU, float32, with
torch's intra-op threads set to the cores XLA uses:

  tokenizer  one full training step (generator: encoder, Reg-VQ, decoder, L1 + LPIPS +
             quantizer loss + adaptive-weight GAN term, one generator backward, Adam;
             then the discriminator's hinge step, Adam) at the demo size, a reduced
             64 px CelebA-HQ model and the CelebA-HQ (256 px) size. Ours is the loop's
             own jitted step (`loop.prepare(...).train_step`, random weights); theirs is
             `benchmarks.peer_torch_models.TokenizerStep`, taming's architecture written
             in PyTorch with the same shapes (parameter counts asserted equal).
  gumbel     our GumbelQuantizer against taming's GumbelQuantize semantics: a numerical
             check on identical inputs, weights and Gumbel noise, then fwd+bwd timing.
  ar         ARPrior.sample(use_cache=True) against a PyTorch GPT with a KV cache at
             equal width, depth, heads, vocabulary and length.

Timing: after compiling ours and warming both up, the two run in interleaved rounds (the
order alternating), one sample each per round; the table gives median images/s and
ours ÷ theirs, the median of the per-round ratios. FLOPs per step: ours from XLA's cost
analysis of the compiled step (every HLO op, elementwise ones included); theirs from
`torch.utils.flop_counter.FlopCounterMode` (matmuls and convolutions only).

Without torch the script still runs our side and says the PyTorch column was skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Any
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import environment
from benchmarks.common import load_config
from benchmarks.common import usable_cores
from benchmarks.common import write_generated_section
from rvq_jax import ops
from rvq_jax.models.priors.ar import ARPrior
from rvq_jax.models.tokenizer.quantizers.gumbel import GumbelQuantizer
from rvq_jax.tools import aot_check
from rvq_jax.train import loop
from rvq_jax.train import stages

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(_REPO, "docs", "results", "peer_torch.md")
BEGIN, END = "<!-- peer_torch:begin -->", "<!-- peer_torch:end -->"

# name → (config file, overrides of tokenizer.model and data.image_size, default batch)
SIZES = {
    "demo": ("demo", {}, 8),
    "demo_lpips": ("demo", {"perceptual_weight": 1.0}, 8),
    "r64": ("celebahq", {"image_size": 64, "ch": 64, "ch_mult": (1, 1, 2, 2)}, 4),
    "celebahq": ("celebahq", {}, 1),
}
QUICK_SIZE = ("demo", {"image_size": 16, "ch": 32, "ch_mult": (1, 2), "z_channels": 32,
                       "num_codes": 16, "code_dim": 8, "disc_channels": 32,
                       "disc_layers": 1, "perceptual_weight": 1.0}, 2)
TARGET = 1.0  # ours ÷ theirs images/s on the tokenizer step


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--parts", default="tokenizer,gumbel,ar")
  parser.add_argument("--sizes", default="demo,r64,celebahq",
                      help=f"comma list of {', '.join(SIZES)}")
  parser.add_argument("--batch", default="",
                      help="per-size batch overrides, e.g. 'celebahq=2,r64=8'")
  parser.add_argument("--rounds", type=int, default=5, help="timed rounds (tokenizer)")
  parser.add_argument("--big-rounds", type=int, default=3,
                      help="timed rounds at sizes whose step takes over 5 s")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch column")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch intra-op threads (default: the cores XLA uses)")
  parser.add_argument("--quick", action="store_true", help="tiny smoke run")
  parser.add_argument("--out", default=None)
  parser.add_argument("--doc", default=DOC, help="markdown doc to write the tables into "
                      "('' for none)")
  args = parser.parse_args(argv)
  if args.out is None:
    suffix = "_quick" if args.quick else ""
    args.out = os.path.join(_REPO, "benchmarks", "results",
                            f"peer_torch_{jax.default_backend()}{suffix}.json")
  if args.quick:
    args.sizes, args.rounds, args.doc = "quick", 2, ""
  return args


# ---------------------------------------------------------------------- configs


def size_config(name: str, batch: int | None = None):
  """The run config of a benchmark size, on one device with random pretrained weights.

  PCL (Reg-VQ's contrastive loss, configs/celebahq.py's pcl_weight 0.1) is off: taming's
  step has no counterpart, so both columns leave it out.
  """
  config_name, overrides, default_batch = QUICK_SIZE if name == "quick" else SIZES[name]
  config = load_config(config_name)
  config.unlock()
  config.weights.random = True
  config.mesh.shape = (1, 1, 1)
  tokenizer = config.tokenizer
  tokenizer.loss.pcl_weight = 0.0
  for key, value in overrides.items():
    if key == "image_size":
      config.data.image_size = value
    elif key in ("num_codes", "code_dim"):
      tokenizer.quantizer[key] = value
    elif key in tokenizer.loss:
      tokenizer.loss[key] = value
    else:
      tokenizer.model[key] = value
  tokenizer.train.batch_size = batch or default_batch
  return config


def describe(config) -> dict:
  model, quantizer, loss = (config.tokenizer.model, config.tokenizer.quantizer,
                            config.tokenizer.loss)
  return {"image_size": config.data.image_size, "batch": config.tokenizer.train.batch_size,
          "ch": model.ch, "ch_mult": list(model.ch_mult),
          "num_res_blocks": model.num_res_blocks,
          "attn_resolutions": list(model.attn_resolutions), "z_channels": model.z_channels,
          "quantizer": quantizer.kind, "num_codes": quantizer.num_codes,
          "code_dim": quantizer.code_dim,
          "mask_ratio": quantizer.regvq.mask_ratio,
          "prior_kl_weight": quantizer.regvq.prior_kl_weight,
          "perceptual_weight": loss.perceptual_weight, "pcl_weight": loss.pcl_weight,
          "disc_layers": loss.disc_layers, "disc_channels": loss.disc_channels,
          "disc_norm": loss.disc_norm, "disc_loss": loss.disc_loss}


def _count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def _random_images(config, seed: int = 0) -> np.ndarray:
  size, batch = config.data.image_size, config.tokenizer.train.batch_size
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


# ---------------------------------------------------------------------- ours


def ours_tokenizer(config) -> dict:
  """The loop's jitted tokenizer step (GAN phase), compiled; a `step()` that runs one."""
  stage = stages.build(config, "tokenizer")
  loop_config = loop.loop_config_from(config, "tokenizer")
  prepared = loop.prepare(stage, loop_config)
  batch_size = config.tokenizer.train.batch_size
  with jax.set_mesh(prepared.mesh):
    state = prepared.init_state()
    constants = prepared.constants()
    abstract = aot_check.abstract_batch(stage, config, batch_size)
    batch = {"image": _random_images(config)}
    for name, spec in abstract.items():
      if name == "valid":
        batch[name] = np.ones(spec.shape, bool)
      elif name != "image":
        batch[name] = np.zeros(spec.shape, spec.dtype)
    batch = loop.global_batch(batch, prepared.mesh)
    key = jax.random.key(0)
    step_number = jnp.asarray(loop_config.num_steps - 1, jnp.int32)
    phase = stage.phase(loop_config.num_steps - 1)
    assert phase, "the benchmark times the step with the GAN on"
    start = time.perf_counter()
    compiled = prepared.train_step(phase).lower(state, constants, batch, key,
                                                step_number).compile()
    compile_s = time.perf_counter() - start
  container = prepared.merge(state)
  counts = {"generator": _count(nnx.state(container.model, nnx.Param)),
            "discriminator": _count(nnx.state(container.discriminator, nnx.Param)),
            "lpips": (0 if stage.frozen.lpips is None
                      else _count(nnx.state(stage.frozen.lpips)))}
  holder = {"state": state, "metrics": None}

  def step():
    with jax.set_mesh(prepared.mesh):
      holder["state"], holder["metrics"] = compiled(holder["state"], constants, batch, key,
                                                    step_number)
      jax.block_until_ready(holder["metrics"])

  return {"step": step, "compile_s": compile_s, "flops": aot_check.compiled_flops(compiled),
          "parameters": counts, "memory": aot_check.compiled_memory(compiled),
          "metrics": lambda: {k: float(v) for k, v in holder["metrics"].items()
                              if np.ndim(v) == 0}}


# ---------------------------------------------------------------------- theirs


def torch_tokenizer_modules(config):
  """(tokenizer, discriminator, LPIPS or None) of the PyTorch peer at `config`'s sizes."""
  from benchmarks import peer_torch_models as tm
  model, quantizer, loss = (config.tokenizer.model, config.tokenizer.quantizer,
                            config.tokenizer.loss)
  if quantizer.kind != "regvq" or quantizer.regvq.logits != "projection":
    raise ValueError("the PyTorch peer implements Reg-VQ with projection logits only")
  if loss.disc_norm != "group" or loss.disc_loss != "hinge" or model.dropout:
    raise ValueError("the PyTorch peer has a GroupNorm PatchGAN, hinge loss, no dropout")
  options = quantizer.regvq
  if options.temperature_start != options.temperature_end:
    raise ValueError("the PyTorch peer keeps τ constant")
  tokenizer = tm.Tokenizer(
      ch=model.ch, ch_mult=model.ch_mult, num_res_blocks=model.num_res_blocks,
      attn_resolutions=model.attn_resolutions, resolution=config.data.image_size,
      z_channels=model.z_channels, num_codes=quantizer.num_codes,
      code_dim=quantizer.code_dim, mask_ratio=options.mask_ratio,
      prior_kl_weight=options.prior_kl_weight)
  discriminator = tm.NLayerDiscriminator(ndf=loss.disc_channels, n_layers=loss.disc_layers)
  lpips = tm.LPIPS() if loss.perceptual_weight > 0 else None
  return tokenizer, discriminator, lpips


def torch_tokenizer_step(config, tokenizer, discriminator, lpips):
  """The PyTorch peer's training step over those modules, with `config`'s loss and optim."""
  from benchmarks import peer_torch_models as tm
  loss, optim = config.tokenizer.loss, config.tokenizer.optim
  return tm.TokenizerStep(
      tokenizer, discriminator, lpips, perceptual_weight=loss.perceptual_weight,
      l1_weight=loss.l1_weight, disc_weight=loss.disc_weight, disc_factor=loss.disc_factor,
      learning_rate=optim.learning_rate, disc_learning_rate=optim.disc_learning_rate,
      b1=optim.b1, b2=optim.b2, grad_clip=optim.grad_clip)


def torch_tokenizer(config) -> dict:
  import torch
  from torch.utils import flop_counter
  from torch.utils.flop_counter import FlopCounterMode

  from benchmarks import peer_torch_models as tm
  torch.manual_seed(0)
  tokenizer, discriminator, lpips = torch_tokenizer_modules(config)
  optim = config.tokenizer.optim
  if optim.weight_decay or optim.warmup_steps:
    raise ValueError("the PyTorch peer runs plain Adam at a constant rate")
  step_fn = torch_tokenizer_step(config, tokenizer, discriminator, lpips)
  images = torch.from_numpy(_random_images(config)).permute(0, 3, 1, 2).contiguous()
  holder = {}

  def step():
    holder["metrics"] = step_fn(images)

  start = time.perf_counter()
  step()
  first_s = time.perf_counter() - start
  counter = FlopCounterMode(display=False)
  # Without its module tracker, whose backward hooks refuse torch.autograd.grad: only
  # the 'Global' totals are wanted.
  counter.flop_counts.clear()
  mode = flop_counter._FlopCounterMode(counter)
  with mode:
    step()
  by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
  counts = {"generator": tm.count_parameters(tokenizer),
            "discriminator": tm.count_parameters(discriminator),
            "lpips": 0 if lpips is None else tm.count_parameters(lpips)}
  return {"step": step, "first_step_s": first_s, "flops": float(counter.get_total_flops()),
          "flops_by_op": by_op, "parameters": counts,
          "metrics": lambda: {k: float(v.detach()) if hasattr(v, "detach") else float(v)
                              for k, v in holder["metrics"].items() if v is not None}}


# ---------------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, calls: dict[str, int]
                ) -> dict[str, list[float]]:
  """Seconds per call of each function, one sample (`calls[name]` calls) per round, the
  order rotated every round."""
  names = list(fns)
  times = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      start = time.perf_counter()
      for _ in range(calls[name]):
        fns[name]()
      times[name].append((time.perf_counter() - start) / calls[name])
  return times


def ratio(times, numerator: str, denominator: str) -> float:
  """Median over rounds of numerator ÷ denominator time in the same round."""
  return statistics.median(a / b for a, b in zip(times[numerator], times[denominator]))


def calls_for(seconds: float, min_sample_s: float = 0.5) -> int:
  return max(1, math.ceil(min_sample_s / max(seconds, 1e-6)))


# ---------------------------------------------------------------------- tokenizer part


def run_tokenizer(name: str, batch: int | None, args, with_torch: bool, log) -> dict:
  config = size_config(name, batch)
  row = {"size": name, "config": describe(config)}
  log(f"[tokenizer {name}] {row['config']}")
  ours = ours_tokenizer(config)
  row.update(compile_s=ours["compile_s"], ours_gflop_per_step=ours["flops"] / 1e9,
             ours_parameters=ours["parameters"], ours_memory=ours["memory"])
  start = time.perf_counter()
  ours["step"]()
  row["ours_first_step_s"] = time.perf_counter() - start
  log(f"  ours: compile {ours['compile_s']:.1f} s, first step {row['ours_first_step_s']:.2f} s, "
      f"{ours['flops'] / 1e9:.1f} GFLOP/step, parameters {ours['parameters']}")
  fns = {"ours": ours["step"]}
  if with_torch:
    theirs = torch_tokenizer(config)
    row.update(torch_first_step_s=theirs["first_step_s"],
               torch_gflop_per_step=theirs["flops"] / 1e9,
               torch_flops_by_op=theirs["flops_by_op"], torch_parameters=theirs["parameters"])
    log(f"  torch: first step {theirs['first_step_s']:.2f} s, {theirs['flops'] / 1e9:.1f} "
        f"GFLOP/step (matmul/conv), parameters {theirs['parameters']}")
    for part in ("generator", "discriminator", "lpips"):
      if ours["parameters"][part] != theirs["parameters"][part]:
        raise AssertionError(f"{part} parameter counts differ: ours "
                             f"{ours['parameters'][part]:,}, torch {theirs['parameters'][part]:,}")
    fns["torch"] = theirs["step"]
  # One more warm call each, timed, to size the samples and the rounds.
  warm = {}
  for key, fn in fns.items():
    start = time.perf_counter()
    fn()
    warm[key] = time.perf_counter() - start
  calls = {key: calls_for(s) for key, s in warm.items()}
  rounds = args.big_rounds if max(warm.values()) > 5.0 else args.rounds
  times = interleaved(fns, rounds, calls)
  batch_size = config.tokenizer.train.batch_size
  row.update(rounds=rounds, calls_per_sample=calls, times_s=times,
             ours_step_s=statistics.median(times["ours"]),
             ours_images_per_s=batch_size / statistics.median(times["ours"]),
             ours_metrics=ours["metrics"]())
  if with_torch:
    row.update(torch_step_s=statistics.median(times["torch"]),
               torch_images_per_s=batch_size / statistics.median(times["torch"]),
               ratio_ours_over_torch=ratio(times, "torch", "ours"),
               torch_metrics=theirs["metrics"]())
    row["target_met"] = row["ratio_ours_over_torch"] >= TARGET
    log(f"  ours {row['ours_images_per_s']:.3f} images/s, torch "
        f"{row['torch_images_per_s']:.3f} images/s, ours ÷ torch "
        f"{row['ratio_ours_over_torch']:.2f}")
  else:
    log(f"  ours {row['ours_images_per_s']:.3f} images/s")
  return row


# ---------------------------------------------------------------------- Gumbel part


def gumbel_pair(batch: int, side: int, in_features: int, num_codes: int, code_dim: int,
                seed: int = 0):
  """Our GumbelQuantizer and taming-semantics GumbelQuantize with the same weights, the
  same input and the same Gumbel noise. Returns a dict with both sides' outputs and
  gradients (of Σ z_q · W + loss w.r.t. the input, projection and codebook)."""
  import torch

  from benchmarks import peer_torch_models as tm
  ours = GumbelQuantizer(num_codes, code_dim, in_features=in_features,
                         rngs=nnx.Rngs(seed))
  step = 0
  tau = float(ours.temperature(step))
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(batch, side, side, in_features)).astype(np.float32)
  weights = rng.normal(size=(batch, side, side, code_dim)).astype(np.float32)
  key = jax.random.key(seed + 1)
  # GumbelQuantizer splits its key into (mask, gumbel) and draws the noise of row
  # (b, l) as ops.gumbel_noise(gumbel_key, (B, L, K)) (ops.categorical_quantize).
  noise = np.asarray(ops.gumbel_noise(jax.random.split(key)[1],
                                      (batch, side * side, num_codes)))
  graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

  def loss_fn(params, z):
    module = nnx.merge(graphdef, params, rest)
    out = module(z, key=key, step=step, deterministic=False)
    return jnp.sum(out.quantized * weights) + out.total_loss, out

  (_, out), (g_params, g_z) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      params, jnp.asarray(z))
  theirs = tm.GumbelQuantize(in_features, code_dim, num_codes,
                             kl_weight=ours.per_position_kl_weight)
  with torch.no_grad():
    kernel = np.asarray(ours.logits.projection.kernel[...])           # [C, K]
    theirs.proj.weight.copy_(torch.from_numpy(kernel.T.copy())[:, :, None, None])
    theirs.proj.bias.copy_(torch.from_numpy(np.array(ours.logits.projection.bias[...])))
    theirs.embed.weight.copy_(torch.from_numpy(np.array(ours.codebook[...])))
  z_t = torch.from_numpy(z).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
  noise_t = torch.from_numpy(noise.reshape(batch, side, side, num_codes)).permute(0, 3, 1, 2)
  z_q, diff, indices = theirs(z_t, tau, gumbel=noise_t)
  w_t = torch.from_numpy(weights).permute(0, 3, 1, 2)
  (torch.sum(z_q * w_t) + diff).backward()
  nchw = lambda t: t.detach().permute(0, 2, 3, 1).numpy()  # noqa: E731
  return {
      "tau": tau,
      "ours": {"indices": np.asarray(out.indices), "quantized": np.asarray(out.quantized),
               "loss": float(out.total_loss), "grad_z": np.asarray(g_z),
               "grad_kernel": np.asarray(g_params["logits"]["projection"]["kernel"][...]),
               "grad_bias": np.asarray(g_params["logits"]["projection"]["bias"][...]),
               "grad_codebook": np.asarray(g_params["codebook"][...])},
      "torch": {"indices": indices.numpy().astype(np.int32), "quantized": nchw(z_q),
                "argmax": theirs.proj(z_t).argmax(dim=1).numpy().astype(np.int32),
                "loss": float(diff.detach()), "grad_z": nchw(z_t.grad),
                "grad_kernel": theirs.proj.weight.grad[:, :, 0, 0].numpy().T,
                "grad_bias": theirs.proj.bias.grad.numpy(),
                "grad_codebook": theirs.embed.weight.grad.numpy()},
  }


def gumbel_agreement(pair: dict) -> dict:
  """How far apart the two sides are: index agreement and max relative errors."""
  ours, theirs = pair["ours"], pair["torch"]

  def rel(name):
    a, b = ours[name], theirs[name]
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))

  return {"index_agreement": float(np.mean(ours["indices"] == theirs["indices"])),
          "loss_ours": ours["loss"], "loss_torch": theirs["loss"],
          **{f"max_rel_err_{name}": rel(name) for name in
             ("quantized", "grad_z", "grad_kernel", "grad_bias", "grad_codebook")}}


def run_gumbel(args, with_torch: bool, log) -> dict:
  shape = (2, 4, 16, 32, 8) if args.quick else (8, 16, 256, 1024, 256)
  batch, side, in_features, num_codes, code_dim = shape
  row = {"batch": batch, "grid": side, "in_features": in_features, "num_codes": num_codes,
         "code_dim": code_dim}
  log(f"[gumbel] B {batch}, {side}×{side} tokens, C {in_features}, K {num_codes}, "
      f"D {code_dim}")
  if with_torch:
    row["check"] = gumbel_agreement(gumbel_pair(*shape))
    log(f"  check: {row['check']}")
  # Timing: fwd+bwd of Σ z_q·W + loss, ours jitted (threefry noise drawn inside the op),
  # theirs with the noise drawn as F.gumbel_softmax draws it.
  ours = GumbelQuantizer(num_codes, code_dim, in_features=in_features, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
  z = jax.random.normal(jax.random.key(1), (batch, side, side, in_features))
  w = jax.random.normal(jax.random.key(2), (batch, side, side, code_dim))

  @jax.jit
  def ours_fn(params, z, key):
    def loss_fn(params, z):
      out = nnx.merge(graphdef, params, rest)(z, key=key, step=0, deterministic=False)
      return jnp.sum(out.quantized * w) + out.total_loss
    return jax.value_and_grad(loss_fn, argnums=(0, 1))(params, z)

  key = jax.random.key(3)
  start = time.perf_counter()
  compiled = ours_fn.lower(params, z, key).compile()
  row["compile_s"] = time.perf_counter() - start
  fns = {"ours": lambda: jax.block_until_ready(compiled(params, z, key))}
  if with_torch:
    import torch

    from benchmarks import peer_torch_models as tm
    theirs = tm.GumbelQuantize(in_features, code_dim, num_codes)
    z_t = torch.from_numpy(np.array(z)).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    w_t = torch.from_numpy(np.array(w)).permute(0, 3, 1, 2).contiguous()
    tau = float(ours.temperature(0))

    def torch_fn():
      theirs.zero_grad(set_to_none=True)
      z_t.grad = None
      z_q, diff, _ = theirs(z_t, tau)
      (torch.sum(z_q * w_t) + diff).backward()

    fns["torch"] = torch_fn
  warm = {}
  for name, fn in fns.items():
    fn()
    start = time.perf_counter()
    fn()
    warm[name] = time.perf_counter() - start
  calls = {name: calls_for(s, 0.3) for name, s in warm.items()}
  times = interleaved(fns, 2 if args.quick else 7, calls)
  row.update(times_s=times, calls_per_sample=calls,
             ours_ms=1e3 * statistics.median(times["ours"]))
  if with_torch:
    row.update(torch_ms=1e3 * statistics.median(times["torch"]),
               speed_ours_over_torch=ratio(times, "torch", "ours"))
    log(f"  ours {row['ours_ms']:.2f} ms, torch {row['torch_ms']:.2f} ms, speed ours ÷ "
        f"torch {row['speed_ours_over_torch']:.2f}")
  return row


# ---------------------------------------------------------------------- AR part


def run_ar(args, with_torch: bool, log) -> dict:
  grid, vocab, width, depth, heads, batch = ((4, 64, 32, 2, 2, 2) if args.quick
                                             else (16, 1024, 256, 4, 4, 8))
  length = grid * grid
  row = {"grid": grid, "length": length, "vocab": vocab, "width": width, "depth": depth,
         "heads": heads, "batch": batch}
  log(f"[ar] L {length}, K {vocab}, width {width}, depth {depth}, heads {heads}, "
      f"batch {batch}")
  prior = ARPrior(vocab_size=vocab, grid_size=(grid, grid), width=width, depth=depth,
                  num_heads=heads, rngs=nnx.Rngs(0))
  row["ours_parameters"] = _count(nnx.state(prior, nnx.Param))
  key = jax.random.key(1)
  ours = lambda: jax.block_until_ready(  # noqa: E731
      prior.sample(key, num_samples=batch, use_cache=True))
  start = time.perf_counter()
  ours()
  first = time.perf_counter() - start
  fns = {"ours": ours}
  if with_torch:
    import torch

    from benchmarks import peer_torch_models as tm
    torch.manual_seed(0)
    gpt = tm.GPT(vocab_size=vocab, length=length, width=width, depth=depth, heads=heads)
    row["torch_parameters"] = tm.count_parameters(gpt)
    if row["torch_parameters"] != row["ours_parameters"]:
      raise AssertionError(f"AR parameter counts differ: {row}")
    fns["torch"] = lambda: gpt.sample(batch)
  warm = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    fn()
    warm[name] = time.perf_counter() - start
  row["compile_s"] = max(first - warm["ours"], 0.0)
  times = interleaved(fns, 2 if args.quick else 5, {name: 1 for name in fns})
  row.update(times_s=times, ours_images_per_s=batch / statistics.median(times["ours"]))
  if with_torch:
    row.update(torch_images_per_s=batch / statistics.median(times["torch"]),
               ratio_ours_over_torch=ratio(times, "torch", "ours"))
    log(f"  ours {row['ours_images_per_s']:.2f} images/s, torch "
        f"{row['torch_images_per_s']:.2f} images/s, ours ÷ torch "
        f"{row['ratio_ours_over_torch']:.2f}")
  return row


# ---------------------------------------------------------------------- report


def _fmt(value, spec):
  return "—" if value is None else format(value, spec)


def tables(results: dict) -> str:
  lines = []
  rows = results.get("tokenizer", [])
  if rows:
    lines += ["| size | image | batch | G / D / LPIPS params | GFLOP/step ours (XLA) | "
              "GFLOP/step torch (mm+conv) | compile s (ours) | first step s ours / torch | "
              "images/s ours | images/s torch | ours ÷ torch |",
              "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for row in rows:
      p = row["ours_parameters"]
      params = (f"{p['generator'] / 1e6:.2f}M / {p['discriminator'] / 1e6:.2f}M / "
                f"{p['lpips'] / 1e6:.2f}M")
      mark = "" if row.get("target_met") is None else (" ✓" if row["target_met"] else " ✗")
      lines.append(
          f"| {row['size']} | {row['config']['image_size']} | {row['config']['batch']} | "
          f"{params} | {row['ours_gflop_per_step']:.1f} | "
          f"{_fmt(row.get('torch_gflop_per_step'), '.1f')} | {row['compile_s']:.1f} | "
          f"{row['ours_first_step_s']:.2f} / {_fmt(row.get('torch_first_step_s'), '.2f')} | "
          f"{row['ours_images_per_s']:.3f} | {_fmt(row.get('torch_images_per_s'), '.3f')} | "
          f"{_fmt(row.get('ratio_ours_over_torch'), '.2f')}{mark} |")
  gumbel = results.get("gumbel")
  if gumbel:
    check = gumbel.get("check", {})
    lines += ["", "| Gumbel-VQ | ours ms (fwd+bwd) | torch ms | speed ours ÷ torch | "
              "index agreement | max rel. err z_q / ∂z / ∂W / ∂b / ∂codebook |",
              "| --- | ---: | ---: | ---: | ---: | --- |",
              f"| B {gumbel['batch']}, {gumbel['grid']}², C {gumbel['in_features']}, "
              f"K {gumbel['num_codes']}, D {gumbel['code_dim']} | {gumbel['ours_ms']:.2f} | "
              f"{_fmt(gumbel.get('torch_ms'), '.2f')} | "
              f"{_fmt(gumbel.get('speed_ours_over_torch'), '.2f')} | "
              f"{_fmt(check.get('index_agreement'), '.4f')} | " + " / ".join(
                  _fmt(check.get(f"max_rel_err_{n}"), '.1e') for n in
                  ("quantized", "grad_z", "grad_kernel", "grad_bias", "grad_codebook")) + " |"]
  ar = results.get("ar")
  if ar:
    lines += ["", "| AR prior sampling (KV cache) | params | compile s (ours) | images/s ours "
              "| images/s torch | ours ÷ torch |", "| --- | ---: | ---: | ---: | ---: | ---: |",
              f"| L {ar['length']}, K {ar['vocab']}, width {ar['width']}, depth "
              f"{ar['depth']}, heads {ar['heads']}, batch {ar['batch']} | "
              f"{ar['ours_parameters']:,} | {ar['compile_s']:.1f} | "
              f"{ar['ours_images_per_s']:.2f} | {_fmt(ar.get('torch_images_per_s'), '.2f')} | "
              f"{_fmt(ar.get('ratio_ours_over_torch'), '.2f')} |"]
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  start_all = time.perf_counter()

  def log(message):
    print(f"[{time.perf_counter() - start_all:7.1f} s] {message}", flush=True)

  torch_note = None
  if args.no_torch:
    torch_note = "skipped (--no-torch)"
  elif jax.default_backend() != "cpu":
    torch_note = "skipped (JAX is not on the CPU; the comparison is CPU against CPU)"
  else:
    try:
      import torch
    except ImportError as e:
      torch_note = f"skipped (not installed: {e.name})"
  with_torch = torch_note is None
  threads = {"usable_cores": usable_cores(), "xla_cpu_intra_op": usable_cores(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}
  if with_torch:
    torch.set_num_threads(args.torch_threads or usable_cores())
    threads.update(torch_intra_op=torch.get_num_threads(),
                   torch_inter_op=torch.get_num_interop_threads())
  else:
    log(f"PyTorch column: {torch_note}")
  log(f"threads: {threads}")
  batches = dict(item.split("=") for item in args.batch.split(",") if item)
  results = {"settings": vars(args), "torch": torch_note or "compared", "threads": threads,
             "environment": environment(torch="torch")}

  def save():
    results["wall_s"] = time.perf_counter() - start_all
    results["table_markdown"] = tables(results)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
      json.dump(results, f, indent=2, default=str)
    os.replace(args.out + ".tmp", args.out)

  parts = args.parts.split(",")
  sizes = args.sizes.split(",")
  # Cheap parts first, the 256 px step last: an interrupted run keeps the rest.
  if "tokenizer" in parts:
    results["tokenizer"] = []
    for name in [s for s in sizes if s != "celebahq"]:
      results["tokenizer"].append(run_tokenizer(name, int(batches.get(name, 0)) or None,
                                                args, with_torch, log))
      save()
  if "gumbel" in parts:
    results["gumbel"] = run_gumbel(args, with_torch, log)
    save()
  if "ar" in parts:
    results["ar"] = run_ar(args, with_torch, log)
    save()
  if "tokenizer" in parts and "celebahq" in sizes:
    results["tokenizer"].append(run_tokenizer("celebahq", int(batches.get("celebahq", 0))
                                              or None, args, with_torch, log))
    save()
  table = tables(results)
  print("\n" + table)
  if args.doc:
    command = "python -m benchmarks.peer_torch " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    section = (f"{BEGIN}\n_Generated by `{command.strip()}` on "
               f"{results['environment']['description']}; torch "
               f"{results['environment'].get('torch')}, jax {jax.__version__}; threads "
               f"{threads}; PyTorch column: {results['torch']}._\n\n{table}\n{END}")
    write_generated_section(args.doc, section, begin=BEGIN, end=END,
                            title="The training step against PyTorch")
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
