#!/usr/bin/env bash
# Serve medhybrid's MONAI Label app (both shipped bundles) over a folder of studies, on 127.0.0.1:8000 unless told
# otherwise (MONAI Label's own default host is 0.0.0.0, every interface):
#
#   bash scripts/serve_label.sh /path/to/studies [start_server options, e.g. --port 8001 --conf lease_minutes 60]
#
# Options given after the studies folder win over these defaults (--host 0.0.0.0 exposes it: only behind
# authentication). Needs the MONAI Label environment that scripts/setup_label.sh builds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [ ! -d "$1" ]; then
    echo "usage: bash scripts/serve_label.sh STUDIES_FOLDER [start_server options]${1:+ ($1 is not a folder)}" >&2
    exit 2
fi
python="$root/.venv-label/bin/python"
if [ ! -x "$python" ]; then
    echo "$python not found: build the MONAI Label environment first (bash scripts/setup_label.sh)" >&2
    exit 2
fi
studies="$1"
shift
exec "$python" -m monailabel.main start_server --app "$root/medhybrid/label" --studies "$studies" \
    --host 127.0.0.1 --port 8000 "$@"
