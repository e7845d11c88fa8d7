#!/usr/bin/env bash
# Single-node launch with torchrun: CPU (gloo) when no CUDA, else GPUs (NCCL).
#   NPROC=2 launch/run_local.sh --job.config_file train_configs/debug_cpu.toml [--key.sub value ...]
# NPROC defaults to 2; extra args pass through to amuse_dist.train (torchtitan CLI overrides).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
if [[ $# -eq 0 ]]; then
  set -- --job.config_file train_configs/debug_cpu.toml
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LOG_RANK=${LOG_RANK:-0}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # CPU: keep the ranks from oversubscribing the cores
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi

# check the config in one process first: a bad input exits 2 here (torchrun would report 1)
AMUSE_CHECK_ONLY=1 python -m amuse_dist.train "$@" || exit $?

exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m amuse_dist.train "$@"
