#!/usr/bin/env bash
# Creates .venv (once) with torch, then installs fastdpo editable with its test extras. Idempotent.
#
# torch is installed first and pinned to 2.13.0: an unpinned requirement would pull the newest
# CUDA build (several GB) even on a CPU-only machine. Set TORCH_SPEC to choose another build.
# Every other package, build dependencies included, comes at the exact version constraints.txt holds (the
# versions the test suite last passed with), so a release elsewhere cannot break a fresh clone overnight.
# FASTDPO_UNLOCKED=1 resolves the newest versions pyproject.toml's ranges allow instead (scripts/upgrade-lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
lock=(--constraint constraints.txt)
[[ "${FASTDPO_UNLOCKED:-0}" == 1 ]] && lock=()
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
py=$venv/bin/python
# The venv's own pip may predate --build-constraint, so pip itself comes first, through the lock alone.
"$py" -m pip install -q --upgrade pip "${lock[@]}"
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$py" -m pip install -q -e ".[test]" "${lock[@]}" ${lock:+--build-constraint constraints.txt}
