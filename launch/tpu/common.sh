# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts that source it
# Shared by the launch/tpu scripts (sourced, never run): settings from environment variables or
# flags, and `run`, which prints every gcloud command before running it (DRY_RUN=1: print only).
# Kept to bash 3.2 features so the scripts also run from a macOS laptop.

set -euo pipefail

# shellcheck disable=SC2016  # $USER and $TPU_NAME are shown, not expanded
TPU_COMMON_USAGE='Settings (environment variable, or the flag in brackets; flags win):
  TPU_NAME         [--name]        slice (and queued-resource) name       default: vipo-$USER
  TPU_ZONE         [--zone]        zone                                    default: us-central2-b
  TPU_PROJECT      [--project]     project                                 default: gcloud config
  TPU_TYPE         [--type]        accelerator type                        default: v4-32
  TPU_RUNTIME      [--runtime]     TPU software version                    default: tpu-ubuntu2204-base
                                   (v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  TPU_QUEUED       [--queued]      1: ask through a queued resource        default: 0
  TPU_SPOT         [--spot]        1: spot capacity                        default: 0
  REPO_URL         [--repo-url]    git URL to clone on the workers         default: empty = tarball of local HEAD
  REPO_REF         [--ref]         branch, tag or commit of REPO_URL       default: main
  JAX_SPEC         [--jax]         pip requirement for JAX on TPU          default: jax[tpu]
  PYTHON_VERSION   [--python]      Python on the workers (made by uv)      default: 3.11
  REMOTE_DIR       [--remote-dir]  folder in the workers home (src/, venv/, runs/)  default: vipo_jax
  CONFIG           [--config]      train --config                          default: configs/flux.py:toy
  WORKDIR          [--workdir]     train --workdir on the workers, relative to ~/REMOTE_DIR  default: runs/$TPU_NAME
  LOG_DIR          [--log-dir]     local folder for one log per worker     default: logs/tpu/$TPU_NAME/<time>
  DRY_RUN          [--dry-run]     1: print the commands, run nothing      default: 0'

die() {
  echo "error: $*" >&2
  exit 2
}

# Every flag sets the environment variable of the same setting, so a script that calls a sibling
# script (all.sh) hands its settings down by exporting them.
TRAIN_ARGS=()
parse_flags() {
  local arg key val
  while [[ $# -gt 0 ]]; do
    arg="$1"
    shift
    case "$arg" in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        TRAIN_ARGS=("$@")
        return 0
        ;;
      --dry-run)
        DRY_RUN=1
        continue
        ;;
      --*=*) ;;
      *) die "unexpected argument '$arg' (flags are --name=value; train arguments go after --); see -h" ;;
    esac
    key="${arg%%=*}"
    val="${arg#*=}"
    case "$key" in
      --name) TPU_NAME="$val" ;;
      --zone) TPU_ZONE="$val" ;;
      --project) TPU_PROJECT="$val" ;;
      --type) TPU_TYPE="$val" ;;
      --runtime) TPU_RUNTIME="$val" ;;
      --queued) TPU_QUEUED="$val" ;;
      --spot) TPU_SPOT="$val" ;;
      --repo-url) REPO_URL="$val" ;;
      --ref) REPO_REF="$val" ;;
      --jax) JAX_SPEC="$val" ;;
      --python) PYTHON_VERSION="$val" ;;
      --remote-dir) REMOTE_DIR="$val" ;;
      --config) CONFIG="$val" ;;
      --workdir) WORKDIR="$val" ;;
      --log-dir) LOG_DIR="$val" ;;
      --dry-run) DRY_RUN="$val" ;;
      *) die "unknown flag '$key'; see -h" ;;
    esac
  done
}

apply_defaults() {
  : "${TPU_NAME:=vipo-${USER:-user}}"
  : "${TPU_ZONE:=us-central2-b}"
  : "${TPU_PROJECT:=}"
  : "${TPU_TYPE:=v4-32}"
  : "${TPU_RUNTIME:=tpu-ubuntu2204-base}"
  : "${TPU_QUEUED:=0}"
  : "${TPU_SPOT:=0}"
  : "${REPO_URL:=}"
  : "${REPO_REF:=main}"
  : "${JAX_SPEC:=jax[tpu]}"
  : "${PYTHON_VERSION:=3.11}"
  : "${REMOTE_DIR:=vipo_jax}"
  : "${CONFIG:=configs/flux.py:toy}"
  : "${WORKDIR:=runs/$TPU_NAME}"
  : "${LOG_DIR:=logs/tpu/$TPU_NAME/$(date +%Y%m%d-%H%M%S)}"
  : "${DRY_RUN:=0}"
  export TPU_NAME TPU_ZONE TPU_PROJECT TPU_TYPE TPU_RUNTIME TPU_QUEUED TPU_SPOT REPO_URL REPO_REF JAX_SPEC \
    PYTHON_VERSION REMOTE_DIR CONFIG WORKDIR LOG_DIR DRY_RUN
  SCOPE=(--zone="$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then
    SCOPE+=(--project="$TPU_PROJECT")
  fi
}

# Quote one word for a POSIX shell, readably: bare when it is safe, else in single quotes.
q1() {
  local s="$1"
  if [[ -n "$s" && "$s" != *[!A-Za-z0-9_./:=,@%+-]* ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# Quote arguments into one string: for a remote `--command`, and to print commands that can be pasted.
quote_args() {
  local out="" a
  for a in "$@"; do
    out+="$(q1 "$a") "
  done
  printf '%s' "${out% }"
}

# Print a command to stderr (stdout stays clean for command substitution), then run it unless DRY_RUN=1.
run() {
  echo "+ $(quote_args "$@")" >&2
  if [[ "$DRY_RUN" == 1 ]]; then
    return 0
  fi
  "$@"
}
