#!/usr/bin/env bash
# Downloads, on a machine with PyPI access, the wheels a lent GPU machine lacks (Python 3.12, x86-64)
# into .whl/ (git-ignored), for benchmarks/gpu_suite.sh to install offline there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d .whl trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19
ls -la .whl
