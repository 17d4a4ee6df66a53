#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Create a TPU VM slice, directly or through a queued resource (TPU_QUEUED=1), and wait until it is
# ready: on-demand capacity is often refused at once while a queued request waits its turn.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF
Usage: launch/tpu/create.sh [flags]
Create the slice TPU_NAME (queued: the queued resource TPU_NAME with node TPU_NAME) and wait until
it is ACTIVE. TPU_POLL_S (default 60) is the polling interval of a queued request.

$TPU_COMMON_USAGE
EOF
}

parse_flags "$@"
apply_defaults
: "${TPU_POLL_S:=60}"

extra=()
if [[ "$TPU_SPOT" == 1 ]]; then
  extra+=(--spot)
fi

if [[ "$TPU_QUEUED" == 1 ]]; then
  echo "Queueing a request for $TPU_TYPE ($TPU_RUNTIME) as '$TPU_NAME' in $TPU_ZONE"
  run gcloud compute tpus queued-resources create "$TPU_NAME" "${SCOPE[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$TPU_TYPE" --runtime-version="$TPU_RUNTIME" ${extra[@]+"${extra[@]}"}
  echo "Waiting for the queued resource '$TPU_NAME' to become ACTIVE (every ${TPU_POLL_S}s)"
  while true; do
    state="$(run gcloud compute tpus queued-resources describe "$TPU_NAME" "${SCOPE[@]}" \
      --format='value(state.state)')"
    if [[ "$DRY_RUN" == 1 ]]; then
      break
    fi
    case "$state" in
      ACTIVE)
        echo "'$TPU_NAME' is ACTIVE"
        break
        ;;
      FAILED | SUSPENDED)
        die "queued resource '$TPU_NAME' is $state; see: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$TPU_ZONE"
        ;;
      *)
        echo "$(date +%H:%M:%S) $TPU_NAME: ${state:-no state yet}"
        sleep "$TPU_POLL_S"
        ;;
    esac
  done
else
  echo "Creating the TPU VM slice '$TPU_NAME': $TPU_TYPE ($TPU_RUNTIME) in $TPU_ZONE"
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE[@]}" --accelerator-type="$TPU_TYPE" \
    --version="$TPU_RUNTIME" ${extra[@]+"${extra[@]}"}
fi
