#!/usr/bin/env bash
# Create ./.venv (if missing) and install the project with its pinned CPU PyTorch and test tools.
# Usage: bash scripts/setup.sh        (idempotent; re-running only checks the install)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned to the CPU build, so no dependency resolution can pull a CUDA build
.venv/bin/python -m pip install --quiet -c constraints.txt torch
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test,tracking,tune]"
.venv/bin/python -c "import torch, monai, ignite, custom_components; print(f'torch {torch.__version__}, monai {monai.__version__}, ignite {ignite.__version__}: ready')"
