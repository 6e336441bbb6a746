#!/usr/bin/env bash
# One command for a lent accelerator: benchmarks/accelerator.py with its environment set.
#
#   benchmarks/accelerator.sh [accelerator.py options]     e.g. --also_copy_to "$OUT"
#
# Before the Python entry it
#  * installs the wheels in .whl/ (if there are any) to /tmp/rvq_site and puts that on
#    PYTHONPATH: a bare device image may have JAX, Flax, Optax and Orbax but not
#    ml-collections and grain (with array-record and portpicker), which the train section
#    imports (benchmarks/README.md, "accelerator.py", says how to fetch them);
#  * sets XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 unless it is set (one section's process at a
#    time holds the device) and PYTHONUNBUFFERED=1;
#  * prints the versions of what the run imports (a missing one fails only its sections).
# PYTHON=... picks the interpreter (default python3). The exit status is the Python's.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/rvq_site .whl/*.whl; then
    export PYTHONPATH="/tmp/rvq_site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "accelerator.sh: installing .whl/*.whl failed; the train section may fail" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
export PYTHONUNBUFFERED=1

"$PYTHON" - <<'EOF' || true
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "grain"):
  try:
    print(f"accelerator.sh: {name} {getattr(importlib.import_module(name), '__version__', '?')}")
  except Exception as error:  # noqa: BLE001
    print(f"accelerator.sh: {name} MISSING ({type(error).__name__}: {error})")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L

exec "$PYTHON" -m benchmarks.accelerator "$@"
