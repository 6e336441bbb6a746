#!/usr/bin/env bash
# Trains on GPUs: one process per host, using all of that host's GPUs.
#
# One host (any number of GPUs; the mesh spans them all):
#   launch/gpu_train.sh --config=configs/celebahq.py --workdir=runs/celebahq
# Several hosts: run this on every host with the same coordinator (host 0's address and
# a free port, reachable from all hosts), the host count and a distinct id per host:
#   launch/gpu_train.sh --config=... --workdir=SHARED --coordinator=10.0.0.2:8476 \
#       --num-processes=2 --process-id=0          # on host 0
#   launch/gpu_train.sh ... --process-id=1        # on host 1
# Under SLURM (srun, one task per node), --slurm lets JAX read the job's layout instead.
# Arguments after "--" go to rvq_jax.main unchanged.
#
# Settings (flag or environment variable):
#   --config         RVQ_CONFIG         config file[:variant]
#   --workdir        RVQ_WORKDIR        run directory; with several hosts one they all see
#                                       (gs://, NFS)
#   --coordinator    RVQ_COORDINATOR    host:port of process 0 (several hosts)
#   --num-processes  RVQ_NUM_PROCESSES  number of hosts (several hosts)
#   --process-id     RVQ_PROCESS_ID     this host's id, 0 ... N-1 (several hosts)
#   --init-timeout   RVQ_INIT_TIMEOUT   seconds to wait for all hosts (default 300)
#   --slurm          RVQ_SLURM=1        take the layout from SLURM (jax.distributed auto-detection)
#   --python         RVQ_PYTHON         interpreter (default python3)
#   --dry-run        RVQ_DRY_RUN=1      print the command and its environment, run nothing
# Install first: pip install -r requirements.txt "jax[cuda12]"
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "config workdir coordinator num-processes process-id init-timeout python" "slurm" "$@"
require config workdir
cd "$(dirname "$0")/.."

env_vars=()
if [[ -n ${RVQ_COORDINATOR:-} || -n ${RVQ_NUM_PROCESSES:-} || -n ${RVQ_PROCESS_ID:-} ]]; then
  require coordinator num-processes process-id
  [[ $RVQ_NUM_PROCESSES =~ ^[0-9]+$ && $RVQ_PROCESS_ID =~ ^[0-9]+$ ]] ||
    die "--num-processes and --process-id must be numbers"
  ((RVQ_PROCESS_ID < RVQ_NUM_PROCESSES)) ||
    die "--process-id=$RVQ_PROCESS_ID must be below --num-processes=$RVQ_NUM_PROCESSES"
  env_vars+=(RVQ_JAX_COORDINATOR="$RVQ_COORDINATOR" RVQ_JAX_NUM_PROCESSES="$RVQ_NUM_PROCESSES"
    RVQ_JAX_PROCESS_ID="$RVQ_PROCESS_ID")
elif [[ ${RVQ_SLURM:-0} == 1 ]]; then
  env_vars+=(RVQ_JAX_INIT=1)
fi
if [[ -n ${RVQ_INIT_TIMEOUT:-} ]]; then
  env_vars+=(RVQ_JAX_INIT_TIMEOUT="$RVQ_INIT_TIMEOUT")
fi
run env "${env_vars[@]}" "${RVQ_PYTHON:-python3}" -m rvq_jax.main --config="$RVQ_CONFIG" \
  --workdir="$RVQ_WORKDIR" "${RVQ_EXTRA_ARGS[@]}"
