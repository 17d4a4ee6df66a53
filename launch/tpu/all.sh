#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# One command for a whole run: create (or queue) the slice, install, train, then delete the slice
# even when a step fails, so a failed run does not leave TPUs billing (TPU_KEEP=1 keeps it).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF2
Usage: launch/tpu/all.sh [flags] [-- train arguments]
create.sh, setup.sh, train.sh, then delete.sh (skipped with TPU_KEEP=1).
e.g. TPU_QUEUED=1 launch/tpu/all.sh --name=vipo-v4 --type=v4-32 -- --config.seed=1

$TPU_COMMON_USAGE
  TPU_KEEP         keep the slice at the end                      default: 0
EOF2
}

parse_flags "$@"
apply_defaults # exported: the steps below read the same settings
: "${TPU_KEEP:=0}"

cleanup() {
  local rc=$?
  if [[ "$TPU_KEEP" == 1 ]]; then
    echo "Keeping '$TPU_NAME' (TPU_KEEP=1); delete it with launch/tpu/delete.sh --name=$TPU_NAME"
  else
    "$HERE/delete.sh" || echo "warning: deleting '$TPU_NAME' failed; run launch/tpu/delete.sh" >&2
  fi
  exit "$rc"
}

"$HERE/create.sh"
trap cleanup EXIT
"$HERE/setup.sh"
"$HERE/train.sh" -- ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
