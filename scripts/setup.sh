#!/usr/bin/env bash
# Create ./.venv (if missing) and install the project with its pinned CPU PyTorch and test tools, then MONAI Label
# for serving (monailabel_app/; skipped with SKIP_MONAILABEL=1).
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
if [ "${SKIP_MONAILABEL:-0}" != "1" ]; then
    # MONAI Label 0.8.5 next to the pins above: its requirements pinned in monailabel_app/requirements.txt (without
    # numpymaxflow, whose wheel requires numpy<2, sam2 and ninja), then monailabel and pydicom-seg themselves without
    # their declared dependencies (see the two files)
    .venv/bin/python -m pip install --quiet -c constraints.txt -r monailabel_app/requirements.txt
    .venv/bin/python -m pip install --quiet -c constraints.txt --no-deps -r monailabel_app/requirements-nodeps.txt
    .venv/bin/python - <<'PY'
import importlib.metadata as md
import re

import monailabel.interfaces.app  # noqa: F401 - what the server imports at start
import monailabel.main  # noqa: F401

changed = []
for line in open("constraints.txt"):
    m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
    if m and md.version(m[1]).split("+")[0] != m[2]:
        changed.append(f"{m[1]} {md.version(m[1])} (constraints.txt: {m[2]})")
if changed:
    raise SystemExit("the MONAI Label install changed pinned packages: " + ", ".join(changed))
print(f"monailabel {md.version('monailabel')}: ready (constraints.txt pins unchanged)")
PY
fi
