#!/usr/bin/env bash
# Distributed training with torchrun and mmengine's --launcher pytorch.
#   bash tools/dist_train.sh CONFIG GPUS [train.py args...]
# One node, 8 GPUs:  bash tools/dist_train.sh configs/vil_upernet_ade20k.py 8
# Several nodes (run on each, NODE_RANK = 0..NNODES-1, MASTER_ADDR = node 0's address):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash tools/dist_train.sh configs/vil_upernet_ade20k.py 8
# On machines without CUDA the processes use gloo (CPU), e.g. GPUS=2 for a local test.
set -euo pipefail
CONFIG=$1
GPUS=$2
shift 2
exec bash "$(dirname "$0")/dist_run.sh" train.py "$GPUS" "$CONFIG" "$@"
