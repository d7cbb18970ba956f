#!/usr/bin/env bash
# Both environments the tests need, built side by side: .venv (scripts/setup.sh) and .venv-label (the MONAI Label
# server's, scripts/setup_label.sh). Each install mostly waits on one core (resolving, unpacking wheels), so two at once
# take about 2/3 of one after the other. Idempotent, as both scripts are; a failure prints that script's output.
# Prints the seconds it took: with pytest's own closing figure, the test command's whole time in CI's output.
set -euo pipefail
cd "$(dirname "$0")/.."
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
bash scripts/setup.sh > "$logs/setup.log" 2>&1 &
main=$!
bash scripts/setup_label.sh > "$logs/setup_label.log" 2>&1 &
label=$!
status=0
wait "$main" || { status=1; echo "scripts/setup.sh failed:"; cat "$logs/setup.log"; }
wait "$label" || { status=1; echo "scripts/setup_label.sh failed:"; cat "$logs/setup_label.log"; }
[ "$status" -ne 0 ] || echo "environments ready: .venv and .venv-label (${SECONDS} s)"
exit "$status"
