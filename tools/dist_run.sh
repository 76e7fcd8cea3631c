#!/usr/bin/env bash
# torchrun launcher shared by dist_train.sh and dist_test.sh:
#   bash tools/dist_run.sh SCRIPT GPUS [SCRIPT args...]    (SCRIPT: train.py or test.py under tools/)
# Node layout from the environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500); PYTHON
# (default: the checkout's .venv, else python on PATH).
set -euo pipefail
SCRIPT=$1
GPUS=$2
shift 2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# the project's own environment (make install) unless PYTHON names another interpreter
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "error: $PYTHON cannot import torch; run 'make install' in $ROOT or set PYTHON=/path/to/python" >&2
    exit 2
fi
"$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$GPUS" \
    --master_port="${PORT:-29500}" \
    "$ROOT/tools/$SCRIPT" --launcher pytorch "$@"
