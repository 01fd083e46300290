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
# pre-training at paper scale on one GPU (features on the device), batch 2,048: positions/s for
# sampled K=4k and exact; goal: one epoch over 21.4M interactions in < 5 min with sampled K=4k
$PY bench/pretrain_bench.py --device cuda --processes 1 --items 657000 --batch 2048 \
    --losses sampled:4096,exact --steps 20 --exact-steps 3
# the epoch goal from those figures: 21.4M training positions (about one per interaction)
$PY - <<'PYEOF'
import json
for r in json.load(open("bench/results/pretrain_cuda.json")):
    if r["items"] == 657000:
        minutes = 21.4e6 / r["positions_per_s"] / 60
        print(f"{r['loss']:>13s}: {r['positions_per_s']:,.0f} positions/s -> one epoch over 21.4M interactions "
              f"in {minutes:.1f} min (goal for sampled:4096: < 5 min)")
PYEOF
if [ -n "${OUT:-}" ]; then cp bench/results/*cuda*.json "$OUT"/; fi
