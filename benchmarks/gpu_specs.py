"""The GPUs and head shapes the offline tools reason about: per-SM limits of each compile target, datasheet
figures of each card, and the default head problems. Shared by ``aot.py``, ``static_report.py`` and
``roofline.py``; no torch or triton import.
"""

from __future__ import annotations

from dataclasses import dataclass

REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
# The driver reserves 1 KB of shared memory per CTA on sm_80 and later.
RESERVED_SMEM_PER_CTA = 1024


@dataclass(frozen=True)
class Arch:
    """A compile target and the per-SM limits that decide occupancy (CUDA programming guide, table 21)."""

    name: str
    capability: int
    smem_per_block: int
    smem_per_sm: int


ARCHS = {
    "sm90a": Arch("sm90a", 90, smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
    "sm80": Arch("sm80", 80, smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
}


@dataclass(frozen=True)
class GPU:
    """Vendor datasheet figures: dense bf16 tensor-core peak, HBM bandwidth, L2 size, SM count."""

    name: str
    arch: str
    sms: int
    bf16_tflops: float
    hbm_tb_s: float
    l2_mb: float


GPUS = {
    "h100": GPU("H100 SXM", "sm90a", 132, 989.0, 3.35, 50.0),
    "h200": GPU("H200", "sm90a", 132, 989.0, 4.8, 50.0),
    "a100": GPU("A100 80GB", "sm80", 108, 312.0, 2.04, 40.0),
}
# The GPU whose SM count the launchers see when compiling for an arch.
ARCH_GPU = {"sm90a": "h100", "sm80": "a100"}


@dataclass(frozen=True)
class Shape:
    """One head problem: N tokens, D hidden, V vocab."""

    name: str
    n: int
    d: int
    v: int
    dtype: str = "bfloat16"
    softcap: float | None = None
    bias: bool = False


# The head's implementations (``impl=`` of the launchers).
IMPLS = ("fused", "chunked")
DEFAULT_SHAPES = [
    Shape("llama3-8b", 16384, 4096, 128256),
    Shape("qwen2.5-7b", 16384, 3584, 152064),
    Shape("gemma2", 16384, 2304, 256000, softcap=30.0),
    # fp16 with an lm_head bias: the fp16 dz scaling and the bias loads compile in.
    Shape("phi-2", 16384, 2560, 51200, dtype="float16", bias=True),
]
