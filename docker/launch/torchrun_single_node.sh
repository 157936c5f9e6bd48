#!/usr/bin/env bash
# One node, all its GPUs, FSDP2. Lightning reads the ranks torchrun sets.
set -euo pipefail
GPUS=${GPUS:-8}
torchrun --standalone --nproc_per_node="$GPUS" train.py \
  model=2b vae=bsq strategy=fsdp trainer.devices="$GPUS" trainer.num_nodes=1 \
  data=shards data.train_shards="${TRAIN_SHARDS:?set TRAIN_SHARDS}" data.batch_size=4 "$@"
