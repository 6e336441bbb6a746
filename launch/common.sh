# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run): settings from flags or RVQ_*
# variables, one clear error for every missing setting, and dry runs.
#
# A flag --some-name=VALUE (or --some-name VALUE) sets RVQ_SOME_NAME, so every setting
# can also come from the environment (export RVQ_PROJECT=my-project). Flags win.

RVQ_DRY_RUN="${RVQ_DRY_RUN:-0}"
# shellcheck disable=SC2034  # Read by the scripts that source this file.
RVQ_EXTRA_ARGS=()

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

usage() {
  # The script's header comment (from line 2 to the first line that is not a comment).
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

setting_var() {
  local name=$1
  name=${name//-/_}
  echo "RVQ_${name^^}"
}

# parse_flags "VALUED FLAGS" "SWITCHES" "$@": sets RVQ_* from --flags; after "--" the
# remaining arguments go to RVQ_EXTRA_ARGS (passed on to python -m rvq_jax.main).
parse_flags() {
  local valued=" $1 " switches=" $2 dry-run "
  shift 2
  while (($# > 0)); do
    local arg=$1 name value
    shift
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        # shellcheck disable=SC2034  # Read by the scripts that source this file.
        RVQ_EXTRA_ARGS=("$@")
        break
        ;;
      --*=*)
        name=${arg%%=*}
        name=${name#--}
        value=${arg#*=}
        ;;
      --*)
        name=${arg#--}
        if [[ $switches == *" $name "* ]]; then
          value=1
        elif (($# > 0)); then
          value=$1
          shift
        else
          die "--$name needs a value (see --help)"
        fi
        ;;
      *)
        die "unexpected argument '$arg' (see --help)"
        ;;
    esac
    if [[ $valued != *" $name "* && $switches != *" $name "* ]]; then
      die "unknown flag --$name (see --help)"
    fi
    local var
    var=$(setting_var "$name")
    printf -v "$var" '%s' "$value"
    export "${var?}"
  done
}

# require NAME...: fails, naming every missing one, unless each --NAME / RVQ_NAME is set.
require() {
  local missing=() name var
  for name in "$@"; do
    var=$(setting_var "$name")
    [[ -n ${!var:-} ]] || missing+=("--$name (or $var)")
  done
  if ((${#missing[@]} > 0)); then
    die "missing setting(s): ${missing[*]}. See --help."
  fi
}

# shell_quote ARG: ARG as a shell word, readable: bare if safe, else in single quotes.
shell_quote() {
  local arg=$1 q="'"
  if [[ $arg =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$arg"
  else
    printf "'%s'" "${arg//$q/$q\\$q$q}"
  fi
}

# quote ARG...: the arguments as one string that a (remote) shell splits back into them.
quote() {
  local out=() arg
  for arg in "$@"; do
    out+=("$(shell_quote "$arg")")
  done
  echo "${out[*]}"
}

# run COMMAND...: prints the command (copy-pastable); runs it unless --dry-run.
run() {
  echo "+ $(quote "$@")"
  if [[ $RVQ_DRY_RUN != 1 ]]; then
    "$@"
  fi
}

# tpu_ssh WORKER COMMAND: runs COMMAND (one string) on worker WORKER (a number or "all").
tpu_ssh() {
  run gcloud compute tpus tpu-vm ssh "$RVQ_TPU_NAME" --project="$RVQ_PROJECT" \
    --zone="$RVQ_ZONE" --worker="$1" --command="$2"
}

# The TPU settings every tpu_* script needs.
# shellcheck disable=SC2034  # Read by the scripts that source this file.
TPU_FLAGS="project zone tpu-name"
