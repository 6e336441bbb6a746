#!/usr/bin/env bash
# Streams a worker's training log (default worker 0, which prints the progress lines).
#
#   launch/tpu_logs.sh --project=P --zone=Z --tpu-name=rvq [--worker=3] [--lines=200] [--dry-run]
#
# Every log line of a multi-host run names its process ("[tokenizer p3/4] ..."). Ctrl-C
# stops the stream, not the job. TensorBoard reads the events in the workdir:
#   tensorboard --logdir=gs://BUCKET/runs/NAME
#
# Settings (flag or environment variable):
#   --project, --zone, --tpu-name  RVQ_PROJECT, RVQ_ZONE, RVQ_TPU_NAME (as tpu_create.sh)
#   --worker  RVQ_WORKER  worker number (default 0); "all" prints every worker's tail once
#   --lines   RVQ_LINES   lines of history (default 100)
#   --dry-run RVQ_DRY_RUN=1  print the gcloud command, run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS worker lines" "" "$@"
require project zone tpu-name
worker=${RVQ_WORKER:-0}
lines=${RVQ_LINES:-100}
[[ $lines =~ ^[0-9]+$ ]] || die "--lines=$lines is not a number"
if [[ $worker == all ]]; then
  tpu_ssh all "echo == \$(hostname); tail -n $lines ~/rvq_jax_train.log"
else
  tpu_ssh "$worker" "tail -n $lines -F ~/rvq_jax_train.log"
fi
