#!/usr/bin/env bash
# Single-node launch: NPROC ranks on this machine, CPU (gloo) without CUDA, else GPUs (NCCL).
#   NPROC=2 launch/run_local.sh --job.config_file train_configs/debug_cpu.toml [--key.sub value ...]
# NPROC defaults to 2; the other args go to amuse_dist.train (torchtitan CLI overrides).
# It is `amuse-train --nproc $NPROC ...`: the config is checked for NPROC ranks before start-up,
# each rank's error is one line (torchrun's report goes to <dump_folder>/torchrun.log), the exit
# status is the rank's (2: bad input), and Ctrl-C saves at the next step (twice: abort).
set -euo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-2}
if [[ $# -eq 0 ]]; then
  set -- --job.config_file train_configs/debug_cpu.toml
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python -m amuse_dist.train --nproc "$NPROC" "$@"
