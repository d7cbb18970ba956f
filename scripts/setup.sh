#!/usr/bin/env bash
# Create .venv in the repository and install medhybrid (editable) with its pinned dependencies.
# Idempotent: re-running with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.medhybrid-installed
want=$(cat pyproject.toml scripts/nnunet-requirements.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, exactly pinned, as the configured pip index offers it (PyPI's Linux wheel is the CUDA build). For a
# CPU-only .venv, install torch==2.13.0 into it from https://download.pytorch.org/whl/cpu first; this line then
# finds it already satisfied.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# under a lock on pyproject.toml: an editable install writes medhybrid.egg-info into the checkout, and
# scripts/setup_label.sh may be doing the same at once (scripts/setup_test.sh runs both)
flock pyproject.toml .venv/bin/python -m pip install --quiet -e ".[dev,ray]"
# nnU-Net v2 for the `nnunet` ablation method: its own pins, without the packages it lists but never imports here
.venv/bin/python -m pip install --quiet --no-deps -r scripts/nnunet-requirements.txt
echo "$want" > "$stamp"
echo "medhybrid installed in .venv"
