#!/usr/bin/env bash
# Starts training on every worker of a TPU VM at once (--worker=all), in the background.
#
#   launch/tpu_train.sh --project=P --zone=Z --tpu-name=rvq --config=configs/celebahq.py \
#       --workdir=gs://my-bucket/runs/celebahq [--follow] [--dry-run] [-- --config.seed=1 ...]
#
# Every worker runs the same command, `python3 -m rvq_jax.main --config=... --workdir=...`,
# with RVQ_JAX_INIT=1, so that each calls jax.distributed.initialize() and JAX reads the
# slice's topology from the TPU environment: one process per host, all devices in one mesh.
# The workdir must be shared (a gs:// path): every process writes its checkpoint shards
# there, process 0 the summaries. The job survives the ssh session (nohup); its output
# goes to ~/rvq_jax_train.log on each worker (see launch/tpu_logs.sh) and its pid to
# ~/rvq_jax_train.pid (see launch/tpu_stop.sh). Running it again resumes from the
# latest checkpoint. Arguments after "--" go to rvq_jax.main unchanged.
#
# Settings (flag or environment variable):
#   --project, --zone, --tpu-name  RVQ_PROJECT, RVQ_ZONE, RVQ_TPU_NAME (as tpu_create.sh)
#   --config      RVQ_CONFIG      config file[:variant], relative to the checkout
#   --workdir     RVQ_WORKDIR     shared run directory, gs://BUCKET/...
#   --remote-dir  RVQ_REMOTE_DIR  checkout on the workers (default rvq_jax, as tpu_setup.sh)
#   --follow      RVQ_FOLLOW=1    then stream worker 0's log (Ctrl-C stops the stream only)
#   --dry-run     RVQ_DRY_RUN=1   print the gcloud commands, run nothing
# When tpu_setup.sh copied them, ~/weights is RVQ_JAX_WEIGHTS_DIR and
# ~/tensorflow_datasets the data dir (pass -- --config.data.data_dir=... to change it).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"
parse_flags "$TPU_FLAGS config workdir remote-dir" "follow" "$@"
require project zone tpu-name config workdir
if [[ $RVQ_WORKDIR != gs://* ]]; then
  die "--workdir=$RVQ_WORKDIR is not a gs:// path; every host of a slice must write to the same directory"
fi
remote_dir=${RVQ_REMOTE_DIR:-rvq_jax}

args=(--config="$RVQ_CONFIG" --workdir="$RVQ_WORKDIR" "${RVQ_EXTRA_ARGS[@]}")
# Defaults that tpu_setup.sh's copies make valid; an explicit flag after "--" wins.
# Single quotes on purpose: the workers' shell expands these, not this one.
# shellcheck disable=SC2016
data_flag='$( [ -d ~/tensorflow_datasets ] && echo --config.data.data_dir=$HOME/tensorflow_datasets )'
# shellcheck disable=SC2016
weights_env='$( [ -d ~/weights ] && echo RVQ_JAX_WEIGHTS_DIR=$HOME/weights )'
# The background job is one simple command (nohup execs env execs python), so $! is
# python's own pid: the one tpu_stop.sh signals.
command="cd $(quote "$remote_dir") || exit 1; nohup env RVQ_JAX_INIT=1 $weights_env python3 -m rvq_jax.main $data_flag $(quote "${args[@]}") > ~/rvq_jax_train.log 2>&1 < /dev/null & echo \$! > ~/rvq_jax_train.pid; echo started on \$(hostname)"
tpu_ssh all "$command"

if [[ ${RVQ_FOLLOW:-0} == 1 ]]; then
  tpu_ssh 0 "tail -n 100 -F ~/rvq_jax_train.log"
else
  echo "# follow: launch/tpu_logs.sh --project=$RVQ_PROJECT --zone=$RVQ_ZONE --tpu-name=$RVQ_TPU_NAME"
fi
