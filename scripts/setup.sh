#!/usr/bin/env bash
# Create .venv in the repository and install medhybrid (editable) with its pinned dependencies.
# Idempotent: re-running with unchanged pins (pyproject.toml, scripts/nnunet-requirements.txt) and scripts does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.medhybrid-installed
want=$(cat pyproject.toml scripts/nnunet-requirements.txt scripts/setup.sh scripts/uv_env.sh scripts/compile_imports.py \
  | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
. scripts/uv_env.sh
uv_setup
# torch first, exactly pinned, as the configured package index offers it (PyPI's Linux wheel is the CUDA build). For
# a CPU-only .venv, install torch==2.13.0 into it from https://download.pytorch.org/whl/cpu first; this line then
# finds it already satisfied.
uv_install .venv "torch==2.13.0"
# under a lock on pyproject.toml: an editable install writes medhybrid.egg-info into the checkout, and
# scripts/setup_label.sh may be doing the same at once (scripts/setup_test.sh runs both)
flock pyproject.toml bash -c '. scripts/uv_env.sh && uv_install .venv -e ".[dev,ray]"'
# nnU-Net v2 for the `nnunet` ablation method: its own pins, without the packages it lists but never imports here
uv_install .venv --no-deps -r scripts/nnunet-requirements.txt
# what medhybrid, its CLI, bundles, servers, launchers and workers import (the tests' processes among them)
compile_imports .venv 'medhybrid.*' monai monai.bundle fire torch.distributed.run torch._dynamo torch._inductor.compile_fx \
  mlflow.server mlflow.store.tracking.sqlalchemy_store dir:mlflow/store/db_migrations ray ray.util nnunetv2.run.run_training \
  nnunetv2.inference.predict_from_raw_data nnunetv2.experiment_planning.plan_and_preprocess_entrypoints highdicom \
  matplotlib.pyplot SimpleITK nibabel 'pytest' '_pytest.*' 'xdist.*' execnet execnet.rsync execnet.rsync_remote 'anyio.*'
echo "$want" > "$stamp"
echo "medhybrid installed in .venv"
