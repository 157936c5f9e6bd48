#!/usr/bin/env bash
# scenetxtvar container entrypoint: `train|sample|evaluate [hydra overrides...]`, or any command.
set -euo pipefail
cd /opt/scenetxtvar
cmd="${1:-train}"
case "$cmd" in
  train|sample|evaluate)
    shift || true
    script="${cmd}.py"
    if [[ ! -f "$script" ]]; then
      echo "scenetxtvar: $script is not in this image" >&2
      exit 2
    fi
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
      # Multi-GPU: torchrun sets the rank variables Lightning reads (see docker/launch/).
      exec torchrun --nproc_per_node="$NPROC_PER_NODE" --nnodes="${NNODES:-1}" \
        --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT:-localhost:29500}" "$script" "$@"
    fi
    exec python "$script" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
