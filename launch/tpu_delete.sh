#!/usr/bin/env bash
# Deletes the TPU VM (and its queued resource, if it came from one). The bucket (data,
# checkpoints, TensorBoard events) is kept.
#
#   launch/tpu_delete.sh --project=P --zone=Z --tpu-name=rvq [--queued] [--dry-run]
#
# Settings (flag or environment variable):
#   --project, --zone, --tpu-name  RVQ_PROJECT, RVQ_ZONE, RVQ_TPU_NAME (as tpu_create.sh)
#   --queued  RVQ_QUEUED=1   delete the queued resource (--force also deletes its TPU VM)
#   --dry-run RVQ_DRY_RUN=1  print the gcloud command, run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS" "queued" "$@"
require project zone tpu-name
if [[ ${RVQ_QUEUED:-0} == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$RVQ_TPU_NAME" --project="$RVQ_PROJECT" \
    --zone="$RVQ_ZONE" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$RVQ_TPU_NAME" --project="$RVQ_PROJECT" \
    --zone="$RVQ_ZONE" --quiet
fi
