"""Runs `rvq_jax.main` several times in one process on a fake gs:// (tests/fake_gcs.py).

Its own process, because main's absl flags (--config, --stage) clash with those of
rvq_jax.tools.aot_check in the pytest process. Usage:

  python tests/_gcs_workdir_main.py ROOT RECORD.json '[["--config=...", ...], ...]'

ROOT holds the bucket's files; each inner list is one main invocation's flags; the gs://
directories handed to orbax and to TensorBoard are written to RECORD.json. Stops at the
first invocation that does not return 0.
"""
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import jax  # noqa: E402  (after sys.path)
from absl import flags  # noqa: E402

# The suite's compilation cache (tests/conftest.py), shared with the pytest process.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("RVQ_JAX_TEST_COMPILATION_CACHE",
                                 os.path.join(tempfile.gettempdir(), "rvq_jax_test_xla_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_disable_most_optimizations", True)


def main() -> int:
  root, record, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
  from rvq_jax import main as main_lib
  from tests import fake_gcs
  with fake_gcs.fake_gcs(root) as gcs:
    for argv in runs:
      flags.FLAGS.unparse_flags()
      flags.FLAGS(["rvq_jax", *argv])
      code = main_lib.main([])
      if code:
        print(f"main {argv} returned {code}", file=sys.stderr)
        return code
  with open(record, "w") as file:
    json.dump({"orbax": gcs.orbax_dirs, "tensorboard": gcs.tensorboard_dirs}, file)
  return 0


if __name__ == "__main__":
  sys.exit(main())
