#!/usr/bin/env bash
# Run the train CLI on this node's GPUs: one process drives all local GPUs, so no coordinator is
# needed here; slurm.sbatch runs this same script once per node with --distributed.
set -euo pipefail

usage() {
  cat <<'EOF2'
Usage: launch/gpu/run_local.sh TRAIN_ARGS...        (from the repository root)
Runs: $PYTHON -m vipo_jax.train TRAIN_ARGS, e.g.
  launch/gpu/run_local.sh --config=configs/flux.py --workdir=runs/flux --config.model.path=/data/FLUX.1-dev
Environment:
  PYTHON                          interpreter with vipo_jax and a CUDA jax    default: python3
  XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX reserves            default: 0.90
  XLA_FLAGS                       appended after ours, so yours win
  DRY_RUN=1                       print the environment and the command, run nothing
EOF2
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

: "${PYTHON:=python3}"
: "${DRY_RUN:=0}"
# JAX preallocates 75% by default; the train step is one large program, so give it more, keeping
# some room for cuDNN/NCCL workspaces outside JAX's pool.
: "${XLA_PYTHON_CLIENT_MEM_FRACTION:=0.90}"
export XLA_PYTHON_CLIENT_MEM_FRACTION
# The latency-hiding scheduler overlaps collectives (FSDP all-gathers, gradient reductions) with
# compute. XLA aborts on flags it does not know, so only flags of the pinned jaxlib belong here.
gpu_flags="--xla_gpu_enable_latency_hiding_scheduler=true"
export XLA_FLAGS="$gpu_flags${XLA_FLAGS:+ $XLA_FLAGS}"

cmd=("$PYTHON" -m vipo_jax.train "$@")
echo "XLA_FLAGS='$XLA_FLAGS' XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION"
printf '+'
printf ' %q' "${cmd[@]}"
printf '\n'
if [[ "$DRY_RUN" == 1 ]]; then
  exit 0
fi
exec "${cmd[@]}"
