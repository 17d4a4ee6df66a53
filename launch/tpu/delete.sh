#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Delete the slice (or its queued resource, which deletes the slice with it): TPUs bill while they exist.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF2
Usage: launch/tpu/delete.sh [flags]
Delete TPU_NAME without asking (TPU_QUEUED=1: the queued resource TPU_NAME and its slice).

$TPU_COMMON_USAGE
EOF2
}

parse_flags "$@"
apply_defaults

if [[ "$TPU_QUEUED" == 1 ]]; then
  echo "Deleting the queued resource '$TPU_NAME' and its slice in $TPU_ZONE"
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${SCOPE[@]}" --force --quiet
else
  echo "Deleting the TPU VM slice '$TPU_NAME' in $TPU_ZONE"
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE[@]}" --quiet
fi
