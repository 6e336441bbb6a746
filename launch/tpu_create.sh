#!/usr/bin/env bash
# Creates a Cloud TPU VM (one host or a multi-host slice) for rvq_jax.
#
#   launch/tpu_create.sh --project=P --zone=us-central2-b --tpu-name=rvq \
#       --accelerator-type=v4-32 [--runtime-version=V] [--spot] [--queued] [--dry-run]
#
# Settings (flag or environment variable):
#   --project           RVQ_PROJECT           Google Cloud project
#   --zone              RVQ_ZONE              zone with TPU quota (e.g. us-central2-b for v4)
#   --tpu-name          RVQ_TPU_NAME          name of the TPU VM (and of its queued resource)
#   --accelerator-type  RVQ_ACCELERATOR_TYPE  e.g. v4-8 (1 host), v4-32 (4 hosts), v5litepod-16
#   --runtime-version   RVQ_RUNTIME_VERSION   TPU software version; default from the type:
#                                             v4 tpu-ubuntu2204-base, v5litepod
#                                             v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#                                             v6e v2-alpha-tpuv6e
#   --spot              RVQ_SPOT=1            Spot capacity (cheaper, preemptible: the
#                                             loop saves a checkpoint on SIGTERM)
#   --queued            RVQ_QUEUED=1          ask through a queued resource and wait until
#                                             it is ACTIVE (the way to get large slices)
#   --dry-run           RVQ_DRY_RUN=1         print the gcloud commands, run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS accelerator-type runtime-version" "spot queued" "$@"
require project zone tpu-name accelerator-type

if [[ -z ${RVQ_RUNTIME_VERSION:-} ]]; then
  case $RVQ_ACCELERATOR_TYPE in
    v4-*) RVQ_RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RVQ_RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RVQ_RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RVQ_RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default runtime version for --accelerator-type=$RVQ_ACCELERATOR_TYPE; pass --runtime-version (or RVQ_RUNTIME_VERSION)" ;;
  esac
fi

spot=()
if [[ ${RVQ_SPOT:-0} == 1 ]]; then
  spot=(--spot)
fi

if [[ ${RVQ_QUEUED:-0} == 1 ]]; then
  run gcloud compute tpus queued-resources create "$RVQ_TPU_NAME" \
    --node-id="$RVQ_TPU_NAME" --project="$RVQ_PROJECT" --zone="$RVQ_ZONE" \
    --accelerator-type="$RVQ_ACCELERATOR_TYPE" --runtime-version="$RVQ_RUNTIME_VERSION" \
    "${spot[@]}"
  if [[ $RVQ_DRY_RUN == 1 ]]; then
    echo "# then poll until ACTIVE:"
    run gcloud compute tpus queued-resources describe "$RVQ_TPU_NAME" \
      --project="$RVQ_PROJECT" --zone="$RVQ_ZONE" --format="value(state.state)"
    exit 0
  fi
  while true; do
    state=$(gcloud compute tpus queued-resources describe "$RVQ_TPU_NAME" \
      --project="$RVQ_PROJECT" --zone="$RVQ_ZONE" --format="value(state.state)")
    echo "queued resource $RVQ_TPU_NAME: $state"
    case $state in
      ACTIVE) break ;;
      FAILED | SUSPENDED) die "queued resource $RVQ_TPU_NAME is $state; see: gcloud compute tpus queued-resources describe $RVQ_TPU_NAME --zone=$RVQ_ZONE" ;;
    esac
    sleep 30
  done
else
  run gcloud compute tpus tpu-vm create "$RVQ_TPU_NAME" --project="$RVQ_PROJECT" \
    --zone="$RVQ_ZONE" --accelerator-type="$RVQ_ACCELERATOR_TYPE" \
    --version="$RVQ_RUNTIME_VERSION" "${spot[@]}"
fi
echo "# next: launch/tpu_setup.sh --project=$RVQ_PROJECT --zone=$RVQ_ZONE --tpu-name=$RVQ_TPU_NAME"
