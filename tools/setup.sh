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
# RecBole (the `baselines` extra, and the tests): python -m ant_dist.baselines trains its models;
# its wheel ships the real ml-100k atomic files (packer tests, bench/realdata.py); and
# tests/test_sasrec_reference.py checks our SASRec against its SASRec. Its declared dependencies
# include ray, thop and plotly, which nothing here uses; its trainers and models need only these four
# (colorlog and colorama at the versions it pins; tensorboard because recbole.utils imports
# torch.utils.tensorboard at module level): the extra's list without RecBole's own dependencies.
$PIP install -q --no-deps "recbole==1.2.1"
$PIP install -q "colorlog==4.7.2" "colorama==0.4.4" "texttable>=0.9.0" "tensorboard>=2.5.0"
echo "ant-dist installed in $VENV"
