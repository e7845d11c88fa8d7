#!/usr/bin/env bash
# The main job (README's `make demo`): a tiny Llama trained with AMUSE on 2 CPU ranks (gloo),
# checkpoints written with the averaged weights X exported beside them, then every checkpoint's
# X evaluated with amuse-eval. Needs no network. Each run gets a fresh folder under outputs/.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-outputs/demo-$(date +%Y%m%d-%H%M%S)}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== training: train_configs/debug_cpu.toml on 2 CPU ranks -> $RUN_DIR"
mkdir -p "$RUN_DIR"
start=$(date +%s)
set +e  # keep the trainer's exit status, whatever grep finds
NPROC=2 bash launch/run_local.sh --job.config_file train_configs/debug_cpu.toml \
  --job.dump_folder "$RUN_DIR" "$@" 2>&1 | tee "$RUN_DIR/console.log" | grep --line-buffered -E \
  "step +[0-9]+/[0-9]+ .*loss|validate step|Saving checkpoint|run stopped|amuse-train:|Error|error"
status=${PIPESTATUS[0]}
set -e
[ "$status" -eq 0 ] || { echo "training failed (exit $status), log: $RUN_DIR/console.log"; exit "$status"; }
echo "== training took $(( $(date +%s) - start )) s; checkpoints:"
ls "$RUN_DIR/checkpoint"

echo "== evaluating X of every checkpoint (amuse-eval)"
# the built-in corpus is read as token shards: the validated sequences, and so the loss, are the
# same on any number of ranks (1, 2 or 3 give the run's own validation loss at X)
set +e
python -m amuse_dist.eval "$RUN_DIR" --no-progress > "$RUN_DIR/amuse_eval.log" 2>&1
status=$?
set -e
grep -v "^\[titan\]" "$RUN_DIR/amuse_eval.log" | grep -E "^ +(step|[0-9]+) |^wrote|warning" || true
[ "$status" -eq 0 ] || { tail -5 "$RUN_DIR/amuse_eval.log"; echo "amuse-eval failed (exit $status)"; exit "$status"; }

# train.log: rank 0's log, written by the trainer (console.log also has torchrun's own output)
first=$(grep -m1 -oE "step +1/[0-9]+ +loss +[0-9.]+" "$RUN_DIR/train.log" | awk '{print $NF}')
last=$(grep -oE "step +[0-9]+/[0-9]+ +loss +[0-9.]+" "$RUN_DIR/train.log" | tail -1 | awk '{print $NF}')
echo "== done: training loss $first -> $last"
echo "   TensorBoard: tensorboard --logdir $RUN_DIR/tb"
echo "   X weights (Hugging Face Llama): $RUN_DIR/checkpoint/step-*/x"
