#!/usr/bin/env bash
# Refreshes constraints.txt: resolves the newest versions pyproject.toml's ranges allow into a fresh venv, runs
# the whole test suite with them, and rewrites the lock only if it passes. Run it from a clean checkout; the
# suite's output is in $log, and the fresh venv is removed either way.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
log=${LOG:-upgrade-lock.log}
trap 'rm -rf "$(dirname "$venv")"' EXIT
FASTDPO_UNLOCKED=1 bash scripts/setup.sh "$venv"
if ! "$venv/bin/python" -m pytest -q >"$log" 2>&1; then
    tail -n 20 "$log"
    echo "upgrade-lock: the suite failed with the newest versions; constraints.txt is unchanged (see $log)" >&2
    exit 1
fi
{
    echo "# The exact versions the test suite passed with (scripts/upgrade-lock.sh, $(date -u +%F)),"
    echo "# on $("$venv/bin/python" -VV | head -n 1) with $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')."
    echo "# scripts/setup.sh installs through it (and its build dependencies); pyproject.toml keeps the ranges."
    # torch is left to TORCH_SPEC (a CPU or CUDA build); pip and the build backends are pinned too.
    "$venv/bin/python" -m pip freeze --all --exclude-editable | grep -viE '^(torch|nvidia-[a-z0-9-]+)=='
    # The build backends' newest versions, as pip's isolated build of fastdpo would take them.
    "$venv/bin/python" -m pip install -q --dry-run --ignore-installed --report - setuptools wheel pybind11 |
        "$venv/bin/python" -c 'import json, sys
for item in json.load(sys.stdin)["install"]:
    meta = item["metadata"]
    print(meta["name"] + "==" + meta["version"])'
} | awk -F'==' '!seen[tolower($1)]++' >constraints.txt.new
mv constraints.txt.new constraints.txt
echo "upgrade-lock: constraints.txt rewritten ($(grep -vc '^#' constraints.txt) pins); review and commit it"
