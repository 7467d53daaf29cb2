#!/usr/bin/env bash
# Launch a torchmoe training job through torchrun.
#
#   ./run_train.sh [--config FILE] [--section.key value ...]
#
# Environment:
#   NGPU       processes on this node (default: the CUDA device count, or 1 without CUDA)
#   CONFIG_FILE the recipe when --config is not given (--config wins)
#   LOG_RANK   the global rank(s) whose log is shown: 0 (default) or a list such as 0,8
#   COMM_MODE=fake (or fake_backend)   dry run: plan the layout for NGPU x NNODES ranks on the
#              meta device
#   NNODES     nodes (default 1); for several, each node runs this script with its NODE_RANK
#              and either MASTER_ADDR [MASTER_PORT] (static) or RDZV_ENDPOINT host:port (c10d)
# The config is checked once before any rank starts, so a bad key costs one line and exit 2;
# a job a rank refuses later (a checkpoint, the folder's lock) also exits 2 with one line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
args=("$@")
has_config=0
no_training=0
for a in "${args[@]}"; do
  case "$a" in
    --config|--config=*) has_config=1 ;;
    -h|--help|--print-config) no_training=1 ;;
  esac
done
if [ "$has_config" = 0 ]; then  # CONFIG_FILE (torchtitan's name), else the debug recipe
  args=(--config "${CONFIG_FILE:-$here/train_configs/debug_model.toml}" "${args[@]}")
fi

if [ "$no_training" = 1 ]; then  # help or the resolved config: one process, no torchrun
  exec python3 -m torchmoe.train "${args[@]}"
fi

NGPU="${NGPU:-$(python3 -c 'import torch; print(torch.cuda.device_count() or 1)')}"
NNODES="${NNODES:-1}"
LOG_RANK="${LOG_RANK:-0}"
export LOG_RANK
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

WORLD_SIZE=$((NGPU * NNODES)) python3 -m torchmoe.train "${args[@]}" --print-config >/dev/null

if [ -n "${COMM_MODE:-}" ]; then  # dry run (checked above): one process plans every rank
  WORLD_SIZE=$((NGPU * NNODES)) RANK=0 LOCAL_RANK=0 exec python3 -m torchmoe.train "${args[@]}"
fi

if [ "$NNODES" = 1 ]; then
  rdzv=(--standalone)
elif [ -n "${RDZV_ENDPOINT:-}" ]; then
  rdzv=(--nnodes "$NNODES" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT"
        --rdzv_id "${RDZV_ID:-torchmoe}")
else
  rdzv=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK for multi-node runs}"
        --master_addr "${MASTER_ADDR:?set MASTER_ADDR or RDZV_ENDPOINT}"
        --master_port "${MASTER_PORT:-29500}")
fi
# the shown ranks' local numbers on this node (LOG_RANK was checked above)
local_log_ranks=$(python3 -c 'import sys; print(",".join(sorted({str(int(r) % int(sys.argv[2]))
  for r in sys.argv[1].split(",") if r.strip()})))' "$LOG_RANK" "$NGPU")
# torchrun, with the workers' exit status passed through (2 for a refused job) and without its
# own traceback (torchmoe/train/launch.py)
exec python3 -m torchmoe.train.launch "${rdzv[@]}" --nproc_per_node "$NGPU" \
  --local-ranks-filter "$local_log_ranks" --role rank -m torchmoe.train "${args[@]}"
