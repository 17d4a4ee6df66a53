#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Install vipo_jax on every worker of the slice: the source (a git clone of REPO_URL, or a tarball
# of the local HEAD when REPO_URL is empty) in REMOTE_DIR/src, and a venv in REMOTE_DIR/venv with
# the requirements, the project (editable: configs/ is read from the source folder) and JAX_SPEC.
# The TPU images ship Python 3.10 and the project needs 3.11+, hence uv, which fetches a Python.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=common.sh
source "$HERE/common.sh"

usage() {
  cat <<EOF
Usage: launch/tpu/setup.sh [flags]
Install the project on all workers of TPU_NAME (a fresh REMOTE_DIR/src each time; REMOTE_DIR/runs
is kept). Without REPO_URL, the committed HEAD of this checkout is copied (git archive): commit
first, uncommitted changes are not sent.

$TPU_COMMON_USAGE
EOF
}

parse_flags "$@"
apply_defaults

remote_tarball="vipo_jax_src.tar.gz"
src="$REMOTE_DIR/src"
if [[ -n "$REPO_URL" ]]; then
  echo "Installing $REPO_URL@$REPO_REF on every worker of '$TPU_NAME' in ~/$REMOTE_DIR"
  fetch="git clone --quiet $(quote_args "$REPO_URL" "$src") && git -C $(quote_args "$src") checkout --quiet $(quote_args "$REPO_REF")"
else
  repo_root="$(git -C "$HERE" rev-parse --show-toplevel)"
  echo "Copying the committed HEAD ($(git -C "$repo_root" rev-parse --short HEAD)) of $repo_root to every worker of '$TPU_NAME'"
  if ! git -C "$repo_root" diff --quiet HEAD --; then
    echo "warning: uncommitted changes in $repo_root are not copied" >&2
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  run git -C "$repo_root" archive --format=tar.gz -o "$tmp/$remote_tarball" HEAD
  run gcloud compute tpus tpu-vm scp "$tmp/$remote_tarball" "$TPU_NAME:$remote_tarball" --worker=all "${SCOPE[@]}"
  fetch="mkdir -p $(quote_args "$src") && tar -xzf $(quote_args "$remote_tarball") -C $(quote_args "$src")"
fi

venv="$REMOTE_DIR/venv"
remote_script="set -euo pipefail
mkdir -p $(quote_args "$REMOTE_DIR/runs")
rm -rf $(quote_args "$src")
$fetch
python3 -m pip install --user --quiet --upgrade uv
~/.local/bin/uv venv --quiet --allow-existing --python $(quote_args "$PYTHON_VERSION") $(quote_args "$venv")
~/.local/bin/uv pip install --quiet --python $(quote_args "$venv/bin/python") \
  -r $(quote_args "$src/requirements.txt") -e $(quote_args "$src") $(quote_args "$JAX_SPEC")
$(quote_args "$venv/bin/python") -c 'import jax, vipo_jax; print(\"jax\", jax.__version__, \"vipo_jax\", vipo_jax.__version__)'"

echo "Setting up Python $PYTHON_VERSION, the requirements, vipo_jax and $JAX_SPEC on every worker"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE[@]}" --worker=all --command="$remote_script"
echo "Done: run launch/tpu/train.sh"
