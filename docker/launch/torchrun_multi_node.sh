#!/usr/bin/env bash
# Several nodes, c10d rendezvous. Run this on every node with the same RDZV_ENDPOINT (host:port of node 0).
set -euo pipefail
NNODES=${NNODES:?set NNODES}
GPUS=${GPUS:-8}
torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS" --rdzv_id="${RDZV_ID:-scenetxtvar}" \
  --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}" train.py \
  model=2b vae=bsq strategy=fsdp trainer.devices="$GPUS" trainer.num_nodes="$NNODES" \
  data=shards data.train_shards="${TRAIN_SHARDS:?set TRAIN_SHARDS}" "$@"
