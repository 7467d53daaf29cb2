#!/usr/bin/env bash
# Pipeline parallelism against FSDP2 on the GPUs of one machine, the same tokens per GPU per
# step: one scripts/benchmark_parallel.py row per layout (tokens/s per GPU, MFU, memory, the
# share of each GPU's time without compute, the theoretical bubble).
#
#   NGPU=2 scripts/benchmark_pipeline.sh --model.n_layers 4     # extra args go to every run
set -uo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-2}
CONFIG=${CONFIG:-train_configs/deepseek_v3.toml}
BATCH=${BATCH:-2}  # sequences per GPU per step
LOG=$(mktemp)
run() {  # the row, or the layout's arguments and the end of its log
  if torchrun --standalone --nproc_per_node "$NGPU" scripts/benchmark_parallel.py \
      --config "$CONFIG" --parallelism.ep 1 "$@" >"$LOG" 2>&1; then
    grep '^|' "$LOG" | tail -1
  else
    echo "| failed: $* |"; grep -v '^\s*$' "$LOG" | tail -5 >&2
  fi
}
echo "| layout | tokens/s/GPU | TFLOP/s/GPU | MFU | peak GiB (max rank) | step ms | GPU idle by rank (no compute kernel) | EP a2a + PP p2p kernels ms/step | plain a2a same bytes ms/step | a2a MiB/step/rank | FSDP comm kernels ms/step |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
run --training.local_batch_size "$BATCH" "$@"
for schedule in 1F1B Interleaved1F1B; do
  for micro in $((NGPU * BATCH)) $((4 * NGPU * BATCH)); do
    run --parallelism.pp "$NGPU" --parallelism.pp_schedule "$schedule" \
      --training.local_batch_size "$micro" "$@"
  done
done
