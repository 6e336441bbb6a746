"""One markdown table from the JSON files `rvq_jax.tools.aot_check --json` wrote.

  python -m benchmarks.memory_table docs/results/memory/celebahq_*.json
"""
from __future__ import annotations

import json
import sys

from rvq_jax.tools import aot_check

_REMAT_ORDER = {"none": 0, "blocks": 1, "full": 2}


def main(paths: list[str]) -> None:
  reports = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      reports += [aot_check.StepReport(**r) for r in json.load(f)]
  reports.sort(key=lambda r: (r.num_devices, r.global_batch, r.dtype != "float32",
                              _REMAT_ORDER.get(r.remat, 3)))
  print(aot_check.memory_table(reports))


if __name__ == "__main__":
  main(sys.argv[1:])
