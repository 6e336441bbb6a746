#!/usr/bin/env bash
# Puts rvq_jax and its dependencies on every worker of a TPU VM (--worker=all).
#
#   launch/tpu_setup.sh --project=P --zone=Z --tpu-name=rvq [--repo=URL [--ref=main]]
#       [--weights=gs://BUCKET/weights] [--data=gs://BUCKET/tfds] [--dry-run]
#
# Code: by default this checkout's tracked files (with uncommitted edits) are packed and
# copied to every worker with `gcloud compute tpus tpu-vm scp --worker=all`; with
# --repo every worker clones it instead. Then every worker installs
# `jax[tpu]` and requirements.txt. Optionally copies, to every worker's local disk:
# converted pretrained weights (--weights, used through RVQ_JAX_WEIGHTS_DIR) and the
# prepared TFDS data (--data, see launch/prepare_data.sh): random reads of many small
# records are faster from local disk than from a bucket.
#
# Settings (flag or environment variable):
#   --project, --zone, --tpu-name   RVQ_PROJECT, RVQ_ZONE, RVQ_TPU_NAME (as tpu_create.sh)
#   --repo        RVQ_REPO         git URL to clone on the workers (default: copy this checkout)
#   --ref         RVQ_REF          branch or tag with --repo (default main)
#   --remote-dir  RVQ_REMOTE_DIR   checkout on the workers, relative to home (default rvq_jax)
#   --weights     RVQ_WEIGHTS      gs:// folder with vgg16_lpips.npz, vgg19.npz, ... (optional)
#   --data        RVQ_DATA         gs:// TFDS data_dir to copy to ~/tensorflow_datasets (optional)
#   --dry-run     RVQ_DRY_RUN=1    print the gcloud commands, run nothing
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS repo ref remote-dir weights data" "" "$@"
require project zone tpu-name
remote_dir=${RVQ_REMOTE_DIR:-rvq_jax}
repo_root=$(cd "$(dirname "$0")/.." && pwd)

if [[ -n ${RVQ_REPO:-} ]]; then
  tpu_ssh all "rm -rf $(quote "$remote_dir") && git clone --depth=1 --branch=$(quote "${RVQ_REF:-main}") $(quote "$RVQ_REPO") $(quote "$remote_dir")"
else
  archive=${TMPDIR:-/tmp}/rvq_jax_code.tar.gz
  # Tracked files as they are now (uncommitted edits included), nothing ignored.
  printf '+ (cd %q && git ls-files -z | tar --null -T - -czf %q)\n' "$repo_root" "$archive"
  if [[ $RVQ_DRY_RUN != 1 ]]; then
    (cd "$repo_root" && git ls-files -z | tar --null -T - -czf "$archive")
  fi
  run gcloud compute tpus tpu-vm scp "$archive" "$RVQ_TPU_NAME:rvq_jax_code.tar.gz" \
    --project="$RVQ_PROJECT" --zone="$RVQ_ZONE" --worker=all
  tpu_ssh all "rm -rf $(quote "$remote_dir") && mkdir -p $(quote "$remote_dir") && tar -xzf rvq_jax_code.tar.gz -C $(quote "$remote_dir")"
fi

tpu_ssh all "cd $(quote "$remote_dir") && python3 -m pip install -q -U pip && python3 -m pip install -q -r requirements.txt 'jax[tpu]' && python3 -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'"

if [[ -n ${RVQ_WEIGHTS:-} ]]; then
  tpu_ssh all "mkdir -p weights && gcloud storage cp -r $(quote "${RVQ_WEIGHTS%/}")/'*' weights/"
fi
if [[ -n ${RVQ_DATA:-} ]]; then
  tpu_ssh all "mkdir -p tensorflow_datasets && gcloud storage cp -r $(quote "${RVQ_DATA%/}")/'*' tensorflow_datasets/"
fi
echo "# next: launch/tpu_train.sh --project=$RVQ_PROJECT --zone=$RVQ_ZONE --tpu-name=$RVQ_TPU_NAME --config=configs/celebahq.py --workdir=gs://BUCKET/runs/NAME"
