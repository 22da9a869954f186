"""The static GPU gate: every Triton kernel, launched as the launchers do, compiles cleanly for sm_90a/sm_80.

No GPU is needed. ``benchmarks/static_report.py`` runs the launchers on fake CUDA tensors at the Llama-3-8B,
Qwen2.5-7B, Gemma-2 (softcap) and Phi-2 (fp16, bias) heads with every launch intercepted, so each config
is the launchers' own choice (and, with ``FASTDPO_AUTOTUNE=1``, every autotune candidate); it compiles
each distinct launch with ``triton.compile`` for both targets and reads ``ptxas -v`` and the IR. A launch
fails the gate on a compile error, any spill or stack frame, shared memory over the arch's per-block
limit, or (sm_90a) a dot that did not lower to wgmma.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__")
NO_PTXAS_EXIT = 3


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("gate") / "static.json"
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", TRITON_DEFAULT_FP_FUSION="1")
    env.pop("FASTDPO_AUTOTUNE", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "static_report.py"), "--json", str(path), "--jobs", "2"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )  # fmt: skip
    if out.returncode == NO_PTXAS_EXIT:
        pytest.skip(out.stderr.strip())
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return json.loads(path.read_text())


def test_every_launch_passes_the_gate(reports):
    failures = [f"{r['describe']}: {'; '.join(r['violations'])}" for r in reports if r["violations"]]
    assert not failures, f"{len(failures)} of {len(reports)} launches fail the static gate:\n" + "\n".join(
        failures
    )


def test_every_kernel_and_variant_was_compiled(reports):
    """The gate is only as good as its coverage: every @triton.jit kernel of ``kernels/``, both archs,
    every shape and variant, and as many autotune candidates as the launchers list."""
    from fastdpo.ops import _head_triton

    kernels = {name for module in KERNEL_MODULES for name in _jit_kernels(ROOT / "kernels" / f"{module}.py")}
    for arch in ("sm90a", "sm80"):
        mine = [r for r in reports if r["arch"] == arch]
        assert {r["launch"]["kernel"] for r in mine} == kernels, arch
        for shape in ("llama3-8b", "qwen2.5-7b", "gemma2", "phi-2"):
            variants = {r["launch"]["variant"] for r in mine if r["launch"]["shape"] == shape}
            for impl, phase in [(i, p) for i in ("fused", "chunked") for p in ("fwd", "fwd stats", "bwd")]:
                assert f"{impl} {phase}" in variants, (arch, shape, impl, phase)
            assert {"fused bwd-nofilter", "fused bwd-dh-only"} <= variants, (arch, shape)
            for variant in ("fused fwd", "fused bwd", "fused bwd-nofilter", "fused bwd-dh-only"):
                configs = {
                    r["config"]
                    for r in mine
                    if r["launch"]["shape"] == shape and r["launch"]["variant"] == f"autotune {variant}"
                }
                assert len(configs) == len(_head_triton.AUTOTUNE_CONFIGS), (arch, shape, variant, configs)


def test_configs_are_the_launchers_own(reports):
    """The production launches carry the launchers' default configs (read from them, not copied)."""
    from fastdpo.ops import _head_triton

    for variant, cfg in (("fused fwd", _head_triton.FWD_CONFIG), ("fused bwd", _head_triton.BWD_CONFIG)):
        for r in (r for r in reports if r["launch"]["variant"] == variant):
            want = f"BLOCK_M={cfg.block_m} BLOCK_V={cfg.block_v} BLOCK_D={cfg.block_d}"
            assert want in r["config"] and r["config"].endswith(f"w{cfg.num_warps} s{cfg.num_stages}"), r


def test_sm90a_dots_are_wgmma_and_sm80_mma_sync(reports):
    for r in reports:
        if r["dots"] and not r["error"]:
            assert r["mma_kind"] == ("wgmma" if r["arch"] == "sm90a" else "mma.sync"), r["describe"]


def _jit_kernels(path: Path) -> list[str]:
    """Names of the ``@triton.jit`` functions of a kernels module that are launched (``_*_kernel``)."""
    lines = path.read_text().splitlines()
    return [
        line.split("def ", 1)[1].split("(", 1)[0]
        for i, line in enumerate(lines)
        if line.startswith("def _") and "_kernel(" in line and i and lines[i - 1].startswith("@triton.jit")
    ]
