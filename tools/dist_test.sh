#!/usr/bin/env bash
# Distributed evaluation with torchrun and mmengine's --launcher pytorch.
#   bash tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py args...]
# Several nodes: set NNODES, NODE_RANK, MASTER_ADDR (and PORT) as for tools/dist_train.sh.
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
exec bash "$(dirname "$0")/dist_run.sh" test.py "$GPUS" "$CONFIG" "$CHECKPOINT" "$@"
