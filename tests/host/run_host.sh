#!/usr/bin/env bash
# One ComfyUI host's run of the host tests: `run_host.sh LABEL CHECKOUT PYTHON [pytest arguments...]`.
# The same test code runs on every host; this prints one line per host with its counts and its time, and
# exits with pytest's status (5, no test collected, counts as a failure: a host that ran nothing proved nothing).
set -u
label=$1 checkout=$2 python=$3
shift 3
log=$(mktemp)
start=$(date +%s)
echo "== host tests on ComfyUI $label ($checkout)"
COMFYUI_PATH="$checkout" "$python" -m pytest -q -rfEs -p no:cacheprovider tests/host "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
counts=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//; s/ in [0-9.]+s.*$//')
rm -f "$log"
echo "host ComfyUI $label: ${counts:-no result} ($(( $(date +%s) - start )) s)"
exit "$status"
