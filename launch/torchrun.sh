#!/usr/bin/env bash
# seqpar train under torchrun. One node:
#   launch/torchrun.sh --config configs/hybrid-125m.yaml train.steps=100
# Several nodes: run this on every node with the same NNODES / MASTER_ADDR and its own NODE_RANK:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config configs/hybrid-1.3b.yaml
# NPROC_PER_NODE defaults to the number of GPUs (1 rank per GPU; 2 CPU ranks without GPUs).
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if [[ "$NNODES" == 1 ]]; then
  exec torchrun --standalone --nproc-per-node="$NPROC_PER_NODE" -m seqpar.cli train "$@"
fi
exec torchrun --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m seqpar.cli train "$@"
