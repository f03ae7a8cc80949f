#!/usr/bin/env bash
# Training throughput of the real Phi-3-Vision on one GPU (see bench/gpu.py): LoRA and full fine-tune,
# num_crops 4 and 16, sdpa and flash-attn (when importable), pad, length and packed batching. Pad and packed
# took about 2 minutes on an H200 with sdpa alone (docs/performance.md); length adds a third of that. Writes
# a JSON file (--out FILE, default outputs/bench/gpu-<time>.json) and prints a table.
#
#   bench/gpu.sh [--out FILE] [--steps 8] [--warmup N] [--micro-batch 4] [--gradient-checkpointing]
#                [--training lora full] [--crops 4 16] [--batching pad length packed] [--profile]
#                [--compile] [--padding-mask] [--time-limit 480]
#   bench/gpu.sh --device cpu --tiny          # smoke test of the same code on CPU
#
# Installs and downloads nothing: it runs the repository's src/ with the first python3 on PATH (or $PYTHON),
# which must already have torch with CUDA, transformers, peft, pillow, pydantic, pyyaml and webdataset
# (flash-attn optional). Random weights from the built-in config: no model hub access.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "bench/gpu.sh: no $PYTHON on PATH (set PYTHON=/path/to/python)" >&2
    exit 2
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Micro-batches change shape every step: growable segments keep the caching allocator from fragmenting.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
exec "$PYTHON" bench/gpu.py "$@"
