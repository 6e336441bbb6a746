#!/usr/bin/env bash
# Stops a training job on every worker: SIGTERM, so the loop saves a checkpoint at the
# current step and exits (status 143); tpu_train.sh with the same workdir resumes it.
#
#   launch/tpu_stop.sh --project=P --zone=Z --tpu-name=rvq [--dry-run]
#
# Settings (flag or environment variable):
#   --project, --zone, --tpu-name  RVQ_PROJECT, RVQ_ZONE, RVQ_TPU_NAME (as tpu_create.sh)
#   --dry-run RVQ_DRY_RUN=1  print the gcloud command, run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS" "" "$@"
require project zone tpu-name
# Only the pid tpu_train.sh recorded: nothing else on the worker is signalled.
tpu_ssh all "if [ -f ~/rvq_jax_train.pid ] && kill -TERM \$(cat ~/rvq_jax_train.pid) 2>/dev/null; then echo \$(hostname): stopping; else echo \$(hostname): no job running; fi"
