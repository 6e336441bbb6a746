#!/usr/bin/env bash
# Prepares the TFDS data set once (CelebA-HQ 256² by default) and stores it in a bucket.
#
#   launch/prepare_data.sh --bucket=my-bucket [--manual-dir=gs://my-bucket/manual/celeb_a_hq]
#       (--project=P --zone=Z --tpu-name=rvq | --local) [--dry-run]
#
# CelebA-HQ is a manual-download TFDS data set: put the files the TFDS catalogue page of
# `celeb_a_hq` asks for in --manual-dir (a gs:// folder or a local one). This script
# copies them to local disk, builds the data set in the array_record format (read by the
# training loop without TensorFlow) with `python -m rvq_jax.tools.prepare_tfds` (TFDS's
# Python API: what `tfds build --file_format=array_record` does, whose command line
# needs apache-beam in tensorflow-datasets 4.9), and uploads the result to --data-dir.
# It runs on worker 0 of the TPU VM (after launch/tpu_setup.sh), close to
# the bucket, or with --local on this machine (needs `pip install -r requirements.txt`
# and gcloud). Run it once; launch/tpu_setup.sh --data=... copies the result to workers.
#
# Settings (flag or environment variable):
#   --bucket      RVQ_BUCKET      bucket name, without gs://
#   --manual-dir  RVQ_MANUAL_DIR  manual-download files (default gs://BUCKET/manual/celeb_a_hq)
#   --data-dir    RVQ_DATA_DIR    where the prepared data goes (default gs://BUCKET/tfds)
#   --dataset     RVQ_DATASET     TFDS name/config (default celeb_a_hq/256)
#   --local       RVQ_LOCAL=1     run here instead of on the TPU VM's worker 0
#   --project, --zone, --tpu-name (without --local), --dry-run as in tpu_create.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS bucket manual-dir data-dir dataset" "local" "$@"
require bucket
if [[ ${RVQ_LOCAL:-0} != 1 ]]; then
  require project zone tpu-name
fi
manual_dir=${RVQ_MANUAL_DIR:-gs://$RVQ_BUCKET/manual/celeb_a_hq}
data_dir=${RVQ_DATA_DIR:-gs://$RVQ_BUCKET/tfds}
dataset=${RVQ_DATASET:-celeb_a_hq/256}

if [[ $manual_dir == gs://* ]]; then
  fetch_manual="mkdir -p ~/tfds_manual && gcloud storage cp -r $(quote "${manual_dir%/}")/'*' ~/tfds_manual/"
  # shellcheck disable=SC2088  # Expanded by the shell that runs the steps (maybe remote).
  local_manual="~/tfds_manual"
else
  fetch_manual="test -d $(quote "$manual_dir")"
  local_manual=$(quote "$manual_dir")
fi
if [[ ${RVQ_LOCAL:-0} == 1 ]]; then
  remote_dir=$(cd "$(dirname "$0")/.." && pwd)  # This checkout.
else
  remote_dir=${RVQ_REMOTE_DIR:-rvq_jax}        # The checkout tpu_setup.sh made.
fi
steps="set -e; $fetch_manual; mkdir -p ~/tfds_build; cd $(quote "$remote_dir"); python3 -m rvq_jax.tools.prepare_tfds --name=$(quote "$dataset") --manual_dir=$local_manual --data_dir=~/tfds_build; gcloud storage cp -r ~/tfds_build/'*' $(quote "${data_dir%/}")/"

if [[ ${RVQ_LOCAL:-0} == 1 ]]; then
  run bash -c "$steps"
else
  tpu_ssh 0 "$steps"
fi
echo "# prepared data in $data_dir; next: launch/tpu_setup.sh ... --data=$data_dir"
