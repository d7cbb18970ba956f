#!/usr/bin/env bash
# Create .venv-label: the MONAI Label 0.8.5 server with the medhybrid app (medhybrid/label).
# Idempotent: re-running with unchanged pyproject.toml, docker/requirements-label.txt and this script does nothing.
#
# An environment of its own, as in docker/Dockerfile.label: MONAI Label 0.8.5 needs torchvision (which does not
# import beside .venv's CPU torch 2.13.0, so this environment pins torch 2.14.1 + torchvision 0.29.1), pydicom<3,
# pynetdicom<3 and dicomweb-client<0.60 (so highdicom 0.22 for the DICOM SEG results), and its dependencies
# pydicom-seg and numpymaxflow need numpy<2 and jsonschema<4: docker/requirements-label.txt, shared with the image.
# medhybrid's other pins are installed as they are, medhybrid itself with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
venv=.venv-label
stamp=$venv/.medhybrid-label-installed
want=$(cat pyproject.toml scripts/setup_label.sh scripts/uv_env.sh scripts/compile_imports.py docker/requirements-label.txt \
  | sha256sum | cut -d' ' -f1)
if [ -x $venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
. scripts/uv_env.sh
uv_setup
# torch first, exactly pinned, with setuptools: sam2 (a MONAI Label dependency) is an sdist whose build imports
# torch, so sdists are built without build isolation against this torch (SAM2_BUILD_CUDA=0: no CUDA extension).
uv_install $venv "torch==2.14.1" "torchvision==0.29.1" "setuptools==80.9.0" "wheel==0.45.1"
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
$venv/bin/python docker/pyproject_deps.py pyproject.toml \
  --exclude torch pydicom numpy jsonschema pandas pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg highdicom > "$reqs"
SAM2_BUILD_CUDA=0 uv_install $venv --no-build-isolation \
  -r docker/requirements-label.txt "pytest==9.2.0" -r "$reqs"
# under the lock scripts/setup.sh takes for its editable install (both write medhybrid.egg-info here)
flock pyproject.toml bash -c ". scripts/uv_env.sh && uv_install $venv --no-deps --no-build-isolation -e ."
# what the server, the medhybrid app, MONAI Label's client and the train task's process import
compile_imports $venv 'medhybrid.*' monai monai.bundle monailabel.main monailabel.app monailabel.client \
  'monailabel.tasks.*' 'monailabel.datastore.*' highdicom pytest
echo "$want" > "$stamp"
echo "MONAI Label and medhybrid installed in $venv"
