"""Launchers of the head's Triton kernels: the fused forward/backward and the chunked impl's folds.

Dimension letters: M valid tokens, D hidden, V vocab. Every launch is a plain ``kernel[grid](...)`` with a
config from this module's ``FWD_CONFIG`` / ``BWD_CONFIG`` (or, with ``FASTDPO_AUTOTUNE=1``, the fastest of
``AUTOTUNE_CONFIGS``), so that the static compile gate (``tests/test_gpu_compile.py``) can intercept the
launches and compile exactly what runs. With ``TRITON_INTERPRET=1`` the same launches run on CPU tensors.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from fastdpo.ops._head_common import Partials, interpreting

__all__ = [
    "AUTOTUNE_CONFIGS",
    "BWD_CONFIG",
    "FWD_CONFIG",
    "fold_backward",
    "fold_forward",
    "fused_backward",
    "fused_forward",
    "num_sms",
]


@dataclass(frozen=True)
class Config:
    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# Default configs, for Hopper in bf16, within what the static gate passes on sm_90a and sm_80 (no spills):
# a 64-wide K step with 3 stages hides global-memory latency in 72-160 KB of shared memory. The backward
# takes 128x128 output tiles (its two dots per K step keep the tensor cores busy); the forward 128x64,
# because its online softmax keeps the logits tile and its exponentials live at once (128x128 spills on
# sm_80 with statistics). GROUP_M = 8 token blocks per group (Triton's matmul tutorial) keeps a wave's
# tiles in L2.
FWD_CONFIG = Config(block_m=128, block_v=64, block_d=64, num_warps=8, num_stages=3)
BWD_CONFIG = Config(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
# The interpreter runs one program at a time in numpy, so it wants few, large programs.
_INTERPRET_CONFIG = Config(block_m=32, block_v=64, block_d=32, num_warps=1, num_stages=1, group_m=2)
_MAX_BLOCK = 256
# Only configs that pass the static gate for both kernels (no spills, shared memory within limits, on
# sm_90a and sm_80, at bf16 with and without statistics, softcap and filtering). 128x128 tiles spill in
# the forward with statistics, 64x64 with 4 warps in the backward on sm_80.
AUTOTUNE_CONFIGS = [
    Config(128, 64, 64, 8, 3),
    Config(128, 64, 64, 8, 4),
    Config(128, 64, 32, 8, 4),
]
# Warps one SM holds at most (H100, H200, A100).
_MAX_WARPS_PER_SM = 64
# Columns of a logits chunk per program of the chunked impl's folds: a row of 1024 fp32 values is 4 KB,
# coalesced, and few enough programs per row that the forward's row loop stays short.
FOLD_BLOCK = 1024


@functools.cache
def _device_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the static gate patches this for GPUs it has not got)."""
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ctas_per_sm(kernel, args: tuple, kwargs: dict, device: torch.device) -> int:
    """How many CTAs of ``kernel``, compiled for these arguments, one SM holds (registers, shared memory).

    The compiled kernel says it: the default configs take 128-255 registers per thread, one or two CTAs
    per SM depending on the architecture and the flags (the static gate's report lists them).
    """
    if device.type != "cuda":
        return 1
    import triton

    compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    if not hasattr(compiled, "_init_handles"):
        return 1  # a launch interceptor (the static compile gate) compiled nothing to ask
    compiled._init_handles()
    props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    warps = kwargs["num_warps"]
    by_regs = props["max_num_regs"] // max(1, compiled.n_regs * props["warpSize"] * warps)
    by_smem = props["max_shared_mem"] // max(1, compiled.metadata.shared)
    return max(1, min(by_regs, by_smem, _MAX_WARPS_PER_SM // warps))


def vocab_splits(m: int, v: int, cfg: Config, device: torch.device, ctas: int = 1) -> int:
    """Vocab splits of the forward grid: as many as make one group of token blocks fill one wave.

    A wave is ``num_sms * ctas`` programs, ``ctas`` being :func:`ctas_per_sm` of the compiled kernel; a
    group is ``GROUP_M`` token blocks (fewer when there are fewer). With ``wave // group`` splits each
    wave works on one group's hidden tiles (which then stay in L2 instead of being re-streamed from HBM
    for every vocab tile), and a small token count still fills every SM. Splits cost an O(M x splits)
    fold of fp32 partials.
    """
    if device.type != "cuda":
        return 1
    m_blocks, v_blocks = cdiv(m, cfg.block_m), cdiv(v, cfg.block_v)
    return max(1, min(v_blocks, num_sms(device) * ctas // min(cfg.group_m, m_blocks)))


def _tile_addressable(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, or a contiguous copy where a tile's in-tile offsets would overflow 32 bits.

    The kernels add an int64 offset to reach a tile's first row, then int32 offsets within the tile.
    """
    largest = (_MAX_BLOCK - 1) * abs(x.stride(0)) + (x.shape[1] - 1) * abs(x.stride(1))
    return x if largest < 2**31 else x.contiguous()


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must stay IEEE so that fp32 results match PyTorch's (which does not use TF32 by default).
    return "ieee" if dtype == torch.float32 else "tf32"


_autotuned: dict[tuple, Config] = {}


def _pick_config(kind: str, key: tuple, launch) -> Config:
    """The default config, or with ``FASTDPO_AUTOTUNE=1`` the fastest candidate, cached per key.

    The key leaves out the token count, so new batch shapes do not re-tune. A candidate that fails to
    compile or launch is an error: every candidate passes the static gate, so a failure is a bug.
    """
    if interpreting():
        return _INTERPRET_CONFIG
    default = FWD_CONFIG if kind == "fwd" else BWD_CONFIG
    if os.environ.get("FASTDPO_AUTOTUNE", "0") != "1":
        return default
    full_key = (kind, *key)
    if full_key not in _autotuned:
        from triton.testing import do_bench

        timings = {}
        for cfg in AUTOTUNE_CONFIGS:
            try:
                timings[cfg] = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
            except Exception as exc:
                raise RuntimeError(f"autotune candidate {cfg} failed for the {kind} kernel at {key}") from exc
        _autotuned[full_key] = min(timings, key=timings.get)
    return _autotuned[full_key]


def fused_forward(
    hidden, weight, bias, targets, *, temperature, softcap, stats, compute_dtype, num_splits=None
):
    """The fused forward's :class:`Partials` ``[splits, M]``, one program per (token block, split)."""
    from fastdpo.kernels.linear_logprobs import _linear_logprobs_fwd_kernel

    m, d = hidden.shape
    v = weight.shape[0]
    hidden, weight = _tile_addressable(hidden), _tile_addressable(weight)

    def launch(cfg: Config):
        def args(parts, v_per_split, splits):
            return (
                hidden, weight, bias if bias is not None else weight, targets, parts,
                m, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                1.0 / temperature, softcap or 1.0, v_per_split, splits,
            )  # fmt: skip

        kwargs = dict(
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_STATS=stats,
            IS_INTERPRETED=interpreting(), COMPUTE_DTYPE=_tl_dtype(compute_dtype),
            DOT_PRECISION=_dot_precision(compute_dtype),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        splits = num_splits
        if hidden.is_meta:  # fastdpo plan: the partials of one split (O(M) fp32 per split), no launch
            return torch.empty(1, 7 if stats else 2, m, device=hidden.device, dtype=torch.float32)
        if splits is None:
            # The split count is not specialized on, so this compile is the one the launch below uses.
            probe = args(torch.empty(1, device=hidden.device), v, 2)
            ctas = ctas_per_sm(_linear_logprobs_fwd_kernel, probe, kwargs, hidden.device)
            splits = vocab_splits(m, v, cfg, hidden.device, ctas)
        v_per_split = cdiv(cdiv(v, splits), cfg.block_v) * cfg.block_v
        splits = cdiv(v, v_per_split)
        parts = torch.empty(splits, 7 if stats else 2, m, device=hidden.device, dtype=torch.float32)
        _linear_logprobs_fwd_kernel[(cdiv(m, cfg.block_m) * splits,)](
            *args(parts, v_per_split, splits), **kwargs
        )
        return parts

    key = (v, d, hidden.dtype, weight.dtype, compute_dtype, bias is not None, softcap is not None, stats)
    return Partials(*launch(_pick_config("fwd", key, launch)).transpose(0, 1))


def fused_backward(
    grad, hidden, weight, bias, targets, lse, *, temperature, softcap, eps, needs, compute_dtype, scale
):
    """fp32 ``(dH, dW, db)`` times ``scale`` (None where not needed), one program per output tile."""
    from fastdpo.kernels.linear_logprobs import _linear_logprobs_bwd_kernel

    m, d = hidden.shape
    v = weight.shape[0]
    hidden, weight = _tile_addressable(hidden), _tile_addressable(weight)
    need_dh, need_dw, need_db = needs
    # fp32 accumulators: tiles from many programs land on the same rows, so they are summed with atomics.
    dh = torch.zeros(m, d, device=hidden.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros(v, d, device=hidden.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros(v, device=hidden.device, dtype=torch.float32) if need_db else None

    def launch(cfg: Config):
        for buf in (dh, dw, db):
            if buf is not None:
                buf.zero_()
        if hidden.is_meta:  # fastdpo plan: the kernel adds into the accumulators and allocates nothing
            return
        _linear_logprobs_bwd_kernel[(cdiv(m, cfg.block_m) * cdiv(v, cfg.block_v),)](
            hidden, weight, bias if bias is not None else weight, targets, lse, grad,
            dh if need_dh else lse, dw if need_dw else lse, db if need_db else lse,
            m, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature, softcap or 1.0, eps, scale,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_DH=need_dh, HAS_DW=need_dw, HAS_DB=need_db, IS_FILTERED=eps > 0,
            IS_INTERPRETED=interpreting(), COMPUTE_DTYPE=_tl_dtype(compute_dtype),
            DOT_PRECISION=_dot_precision(compute_dtype),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    flags = (bias is not None, softcap is not None, needs, eps > 0)
    key = (v, d, hidden.dtype, weight.dtype, compute_dtype, *flags)
    launch(_pick_config("bwd", key, launch))
    return dh, dw, db


def fold_forward(tile, targets, state, v0, inv_temp, softcap):
    """The Triton twin of ``_head_chunked.torch_fold_forward``: one program per row of the chunk."""
    if tile.is_meta:  # fastdpo plan: the kernel works in place and allocates nothing
        return
    from fastdpo.kernels.chunked_logprobs import _chunked_logprobs_fwd_kernel

    _chunked_logprobs_fwd_kernel[(tile.shape[0],)](
        tile, tile.stride(0), targets, state, state.stride(0), tile.shape[1], v0, inv_temp, softcap or 1.0,
        HAS_SOFTCAP=softcap is not None, HAS_STATS=state.shape[0] > 3, IS_INTERPRETED=interpreting(),
        BLOCK=FOLD_BLOCK,
    )  # fmt: skip


def fold_backward(tile, targets, lse, grad, v0, inv_temp, softcap, scale):
    """The Triton twin of ``_head_chunked.torch_fold_backward``: one program per (row, FOLD_BLOCK columns)."""
    if tile.is_meta:  # fastdpo plan: the kernel works in place and allocates nothing
        return
    from fastdpo.kernels.chunked_logprobs import _chunked_logprobs_bwd_kernel

    # Under TRITON_INTERPRET=1 a bf16 tile differs from the torch fold's in about half its entries, by one
    # bf16 ulp: the interpreter casts fp32 to bf16 by truncation (triton 3.9's ``cast_impl``), where the GPU
    # and torch round to nearest even. The kernel is right: fp16 tiles match the torch fold's bit for bit.
    _chunked_logprobs_bwd_kernel[(tile.shape[0], cdiv(tile.shape[1], FOLD_BLOCK))](
        tile, tile.stride(0), targets, lse, grad, tile.shape[1], v0, inv_temp, softcap or 1.0, scale,
        HAS_SOFTCAP=softcap is not None, IS_INTERPRETED=interpreting(), BLOCK=FOLD_BLOCK,
    )  # fmt: skip
