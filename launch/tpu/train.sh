#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Run the train CLI on all workers of the slice at once (a multi-host JAX program needs every host),
# with --distributed (jax.distributed auto-detects the TPU pod). gcloud writes one log per worker
# (LOG_DIR/<worker>.log); worker 0's log is streamed here while the run lasts.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF
Usage: launch/tpu/train.sh [flags] [-- train arguments]
Run on every worker of TPU_NAME, in ~/REMOTE_DIR/src:
  ../venv/bin/python -m vipo_jax.train --config=CONFIG --workdir=../WORKDIR --distributed --no_progress ARGS
(a relative WORKDIR lies in ~/REMOTE_DIR, so runs/x is ~/REMOTE_DIR/runs/x; absolute ones are kept)
e.g. launch/tpu/train.sh --name=my-v4 -- --config.psm.enabled=False --config.seed=1
Re-running with the same WORKDIR resumes. launch/tpu/stop.sh ends a run cleanly (checkpoint, exit).

$TPU_COMMON_USAGE
EOF
}

parse_flags "$@"
apply_defaults

# The run starts in REMOTE_DIR/src, which setup.sh replaces: relative workdirs go next to it.
case "$WORKDIR" in
  /* | *://*) remote_workdir="$WORKDIR" ;;
  *) remote_workdir="../$WORKDIR" ;;
esac
train_cmd=("../venv/bin/python" -m vipo_jax.train --config="$CONFIG" --workdir="$remote_workdir" --distributed --no_progress
  ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
# The pid file lets stop.sh send SIGTERM to exactly this run.
remote_script="cd $(quote_args "$REMOTE_DIR/src") && echo \$\$ > ../train.pid && exec $(quote_args "${train_cmd[@]}")"

echo "Training on every worker of '$TPU_NAME': $(quote_args "${train_cmd[@]}")"
echo "Logs: $LOG_DIR/<worker>.log"
ssh_cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all --command="$remote_script"
  --output-directory="$LOG_DIR")
if [[ "$DRY_RUN" == 1 ]]; then
  run "${ssh_cmd[@]}"
  exit 0
fi

mkdir -p "$LOG_DIR"
: >"$LOG_DIR/0.log"
run "${ssh_cmd[@]}" &
ssh_pid=$!
tail -n +1 -F "$LOG_DIR/0.log" &
tail_pid=$!
trap 'kill "$tail_pid" 2>/dev/null || true' EXIT
rc=0
wait "$ssh_pid" || rc=$?
sleep 1 # let tail print the last lines
echo "Training command ended with status $rc; logs of all workers in $LOG_DIR"
exit "$rc"
