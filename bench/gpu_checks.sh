#!/usr/bin/env bash
# The GPU figures the issues ask for, as one short script for a lent GPU machine:
#   bash bench/gpu_checks.sh            (results under bench/results/, copy them to $OUT if set)
# Needs a CUDA build of torch in the environment (ANT_TORCH_SPEC= bash tools/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv
# exact 657k-item step (forward + backward, IRL included) at batch 2,048 x 50; goal < 250 ms
$PY bench/loss_bench.py --device cuda --batch 2048 --items 657000 --negatives 4000,16000 --steps 3
# frozen encoders: bert-base at 64 tokens, swin-base at 224 px, bf16; goals 8,000 texts/s, 2,500 images/s
$PY bench/encoder_throughput.py --device cuda
if [ -n "${OUT:-}" ]; then cp bench/results/*cuda*.json "$OUT"/; fi
