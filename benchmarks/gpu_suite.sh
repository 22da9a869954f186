#!/usr/bin/env bash
# Everything a lent GPU session runs, in one command (device tool: carry .whl, run from the repo root):
#   bash benchmarks/gpu_suite.sh [tests|head|loss|all]
# Results land in $OUT (or out/): logs, CSVs and plots, to be copied into benchmarks/RESULTS.md by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out}
mkdir -p "$out"
what=${1:-all}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$out/env.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -x tests/test_linear_logprobs.py tests/test_losses.py tests/test_preference_loss.py \
    2>&1 | tee "$out/tests.log"
  compute-sanitizer --tool memcheck python3 -c "
import torch, fastdpo
h = torch.randn(300, 96, device='cuda', dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(1001, 96, device='cuda', dtype=torch.bfloat16, requires_grad=True)
t = torch.randint(0, 1001, (300,), device='cuda'); t[::3] = -100
fastdpo.linear_logprobs(h, w, t, softcap=30.0).sum().backward(); torch.cuda.synchronize()
" 2>&1 | tail -5 | tee "$out/sanitizer.log"
fi
if [[ $what == head || $what == all ]]; then
  python3 benchmarks/bench_logprobs.py --csv "$out/head.csv" --plot "$out/head.png" 2>&1 | tee "$out/head.log"
fi
if [[ $what == loss || $what == all ]]; then
  python3 benchmarks/bench_loss.py --csv "$out/loss.csv" 2>&1 | tee "$out/loss.log"
  python3 benchmarks/bench_loss.py --loss kto --csv "$out/loss_kto.csv" 2>&1 | tee "$out/loss_kto.log"
fi
