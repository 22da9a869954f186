#!/usr/bin/env bash
# Creates .venv (once) with torch, then installs fastdpo editable with its test extras. Idempotent.
#
# torch is installed first and pinned to 2.13.0: an unpinned requirement would pull the newest
# CUDA build (several GB) even on a CPU-only machine. Set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/python ]] || python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
"$py" -m pip install -q -e ".[test]"
