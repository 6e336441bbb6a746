"""XLA's FLOP count of the tokenizer's training step with the GAN on, per config.

  python -m benchmarks.gan_step_flops --json=/tmp/after.json
  # the same on an older checkout, then:
  python -m benchmarks.gan_step_flops --compare=/tmp/before.json,/tmp/after.json

It compiles (never runs) the GAN phase's step on one CPU device, with random pretrained
networks, for the demo config (32 px) and for a 64-px tokenizer (ch 64, ch_mult
(1, 1, 2, 2), 2 residual blocks, K 1,024 — the size of issue 14's PyTorch comparison),
and reports XLA's cost analysis. It uses only `rvq_jax.tools.aot_check.check`, which
every version of the project since the AOT check has, so it measures a commit before
and after a change alike.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks import common


def configs():
  """(name, config): the step's sizes, GAN on from step 0, perceptual loss on."""
  from configs import demo
  result = []
  config = demo.get_config("tokenizer")
  config.unlock()
  result.append((f"demo 32px (batch {config.tokenizer.train.batch_size})", config))
  config = demo.get_config("tokenizer")
  config.unlock()
  config.data.image_size = 64
  config.tokenizer.model.update(ch=64, ch_mult=(1, 1, 2, 2), num_res_blocks=2,
                                attn_resolutions=(), z_channels=64)
  config.tokenizer.quantizer.update(num_codes=1024, code_dim=64)
  config.tokenizer.train.batch_size = 8
  result.append(("64px ch64 (batch 8)", config))
  for _, config in result:
    config.weights.random = True
    config.mesh.shape = (1, 1, 1)
    config.tokenizer.loss.update(disc_start=0, perceptual_weight=1.0)
  return result


def measure() -> list[dict]:
  from rvq_jax.tools import aot_check
  rows = []
  for name, config in configs():
    reports = aot_check.check(config, stage_name="tokenizer", mesh_shape=(1, 1, 1),
                              steps=[0])
    gan = [r for r in reports if r.phase in ("True", "gan", True)] or reports
    rows.append({"config": name, "phase": str(gan[0].phase), "gflop": gan[0].flops / 1e9,
                 "temp_mib": gan[0].temp_bytes / 2**20})
    print(f"{name}: {rows[-1]['gflop']:.2f} GFLOP per step, "
          f"{rows[-1]['temp_mib']:.0f} MiB temporaries", flush=True)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--json", default="")
  parser.add_argument("--compare", default="", help="before.json,after.json")
  args = parser.parse_args(argv)
  if args.compare:
    before_path, after_path = args.compare.split(",")
    before, after = (json.load(open(p)) for p in (before_path, after_path))
    print("| config | before GFLOP | after GFLOP | after ÷ before "
          "| temporaries before → after (MiB) |")
    print("|---|---|---|---|---|")
    for b, a in zip(before["rows"], after["rows"]):
      print(f"| {a['config']} | {b['gflop']:.2f} | {a['gflop']:.2f} | "
            f"{a['gflop'] / b['gflop']:.3f} | {b['temp_mib']:.0f} → {a['temp_mib']:.0f} |")
    print(f"\nbefore: {before['commit']}, after: {after['commit']}")
    return 0
  rows = measure()
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"commit": commit, "rows": rows, "environment": common.environment()}, f,
                indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
