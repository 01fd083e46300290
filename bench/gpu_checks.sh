#!/usr/bin/env bash
# The one script a lent GPU runs: every GPU figure the issues ask for, one JSON, non-zero exit when
# any part fails (bench/gpu_checks.py says what each part does).
#   bash bench/gpu_checks.sh                      # one GPU, paper sizes (within 8 min on an H100)
#   bash bench/gpu_checks.sh --device cpu --tiny  # every part at toy sizes (run by the test suite)
# Needs a CUDA build of torch in the environment for --device cuda (ANT_TORCH_SPEC= bash tools/setup.sh).
# With $OUT set (the device tool), gpu_checks.py copies its JSON there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv; fi
exec "$PY" bench/gpu_checks.py "$@"
