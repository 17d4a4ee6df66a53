#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# End a run on every worker with SIGTERM: the trainer finishes its iteration, writes a checkpoint and
# exits, so train.sh with the same WORKDIR resumes it. (Closing train.sh alone may leave it running.)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF2
Usage: launch/tpu/stop.sh [flags]
Send SIGTERM to the training process that train.sh started on every worker of TPU_NAME.

$TPU_COMMON_USAGE
EOF2
}

parse_flags "$@"
apply_defaults

pid_file="$(quote_args "$REMOTE_DIR/train.pid")"
remote_script="if [ -f $pid_file ] && kill -TERM \"\$(cat $pid_file)\" 2>/dev/null; then echo \"\$(hostname): SIGTERM sent\"; else echo \"\$(hostname): no run\"; fi"
echo "Stopping the run on every worker of '$TPU_NAME'"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all --command="$remote_script"
