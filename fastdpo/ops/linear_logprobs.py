"""Fused lm_head + log-softmax + target gather: launchers, autograd glue and the public op.

Dimension letters: N tokens, M valid (non-ignored) tokens, D hidden, V vocab.

Two backends compute the same math:

* ``triton``: ``fastdpo.kernels.linear_logprobs``; tiles of tokens x vocab, logits never leave the chip.
  With ``TRITON_INTERPRET=1`` it also runs on CPU tensors (how CI tests it).
* ``torch``: chunked over tokens and vocab with an online log-sum-exp, so its extra memory is bounded by
  one chunk on any device. It is also the readable version of the kernels.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

IGNORE_INDEX = -100
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["linear_logprobs", "logprobs_forward", "logprobs_backward", "resolve_backend", "filter_threshold"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Picks ``"triton"`` or ``"torch"``: the argument, else ``FASTDPO_BACKEND``, else triton on CUDA."""
    choice = backend or os.environ.get("FASTDPO_BACKEND") or None
    if choice is None:
        return "triton" if device.type == "cuda" else "torch"
    if choice not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch' (argument or FASTDPO_BACKEND), got {choice!r}")
    if choice == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"the triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run the "
            "kernels on the CPU, or use backend='torch'"
        )
    return choice


def filter_threshold(filter_eps: float | str | None, dtype: torch.dtype) -> float:
    """Gradient-filtering threshold: ``"auto"`` is ``finfo(dtype).eps / 32``; None or 0 turns it off."""
    if filter_eps is None:
        return 0.0
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, str) or filter_eps < 0:
        raise ValueError(f"filter_eps must be 'auto', None or a float >= 0, got {filter_eps!r}")
    return float(filter_eps)


# --------------------------------------------------------------------------------------------------
# Triton launchers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# Default configs, chosen for Hopper in bf16: 128x128 output tiles keep the tensor cores busy, and a
# 64-wide K step with 3 stages hides global-memory latency within the 228 KB of shared memory per SM.
# The interpreter runs a program at a time in numpy, so it wants few, large programs.
_FWD_CONFIG = _Config(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
_BWD_CONFIG = _Config(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
_INTERPRET_CONFIG = _Config(block_m=32, block_v=64, block_d=32, num_warps=1, num_stages=1)
_AUTOTUNE_CONFIGS = [
    _Config(bm, bv, bd, w, s)
    for bm, bv, bd, w, s in [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (64, 256, 64, 8, 4),
        (128, 128, 128, 8, 2),
        (256, 128, 64, 8, 3),
        (64, 128, 64, 4, 4),
    ]
]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must stay IEEE so that fp32 results match PyTorch's (which does not use TF32 by default).
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _vocab_splits(m: int, v: int, cfg: _Config, device: torch.device) -> int:
    """Vocab splits for the forward grid, so that small token counts still fill every SM twice."""
    if device.type != "cuda":
        return 1
    m_blocks = triton_cdiv(m, cfg.block_m)
    wanted = triton_cdiv(2 * _num_sms(device.index or 0), m_blocks)
    return max(1, min(wanted, triton_cdiv(v, cfg.block_v)))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


_autotuned: dict[tuple, _Config] = {}


def _pick_config(kind: str, key: tuple, launch) -> _Config:
    """The default config, or with ``FASTDPO_AUTOTUNE=1`` the fastest of a small set (cached per key)."""
    if _interpreting():
        return _INTERPRET_CONFIG
    default = _FWD_CONFIG if kind == "fwd" else _BWD_CONFIG
    if os.environ.get("FASTDPO_AUTOTUNE", "0") != "1":
        return default
    full_key = (kind, *key)
    if full_key not in _autotuned:
        from triton.testing import do_bench

        timings = {}
        for cfg in _AUTOTUNE_CONFIGS:
            try:
                timings[cfg] = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
            except Exception:  # a config may exceed shared memory on smaller GPUs
                continue
        _autotuned[full_key] = min(timings, key=timings.get) if timings else default
    return _autotuned[full_key]


def _triton_forward(hidden, weight, bias, targets, temperature, softcap, num_splits=None):
    from fastdpo.kernels.linear_logprobs import _linear_logprobs_fwd_kernel

    m, d = hidden.shape
    v = weight.shape[0]

    def launch(cfg: _Config):
        splits = num_splits or _vocab_splits(m, v, cfg, hidden.device)
        v_per_split = triton_cdiv(triton_cdiv(v, splits), cfg.block_v) * cfg.block_v
        splits = triton_cdiv(v, v_per_split)
        part_lse = torch.empty(splits, m, device=hidden.device, dtype=torch.float32)
        part_tgt = torch.empty(splits, m, device=hidden.device, dtype=torch.float32)
        grid = (triton_cdiv(m, cfg.block_m), splits)
        _linear_logprobs_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, part_lse, part_tgt,
            m, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature, softcap or 1.0, v_per_split,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        return part_lse, part_tgt

    key = (triton_cdiv(m, 1024), v, d, hidden.dtype, bias is not None, softcap is not None)
    part_lse, part_tgt = launch(_pick_config("fwd", key, launch))
    lse = part_lse[0] if part_lse.shape[0] == 1 else torch.logsumexp(part_lse, dim=0)
    tgt = part_tgt.sum(0)
    return tgt - lse, lse


def _triton_backward(grad, hidden, weight, bias, targets, lse, temperature, softcap, eps, needs):
    from fastdpo.kernels.linear_logprobs import _linear_logprobs_bwd_kernel

    m, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    # fp32 accumulators: tiles from many programs land on the same rows, so they are summed with atomics.
    dh = torch.zeros(m, d, device=hidden.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros(v, d, device=hidden.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros(v, device=hidden.device, dtype=torch.float32) if need_db else None

    def launch(cfg: _Config):
        for buf in (dh, dw, db):
            if buf is not None:
                buf.zero_()
        grid = (triton_cdiv(m, cfg.block_m), triton_cdiv(v, cfg.block_v))
        _linear_logprobs_bwd_kernel[grid](
            hidden, weight, bias if bias is not None else weight, targets, lse, grad,
            dh if need_dh else lse, dw if need_dw else lse, db if need_db else lse,
            m, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            1.0 / temperature, softcap or 1.0, eps,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_DH=need_dh, HAS_DW=need_dw, HAS_DB=need_db, IS_FILTERED=eps > 0,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    key = (triton_cdiv(m, 1024), v, d, hidden.dtype, bias is not None, softcap is not None, needs, eps > 0)
    launch(_pick_config("bwd", key, launch))
    return dh, dw, db


# --------------------------------------------------------------------------------------------------
# Torch backend: the same math in chunks
# --------------------------------------------------------------------------------------------------

_CHUNK_M = 1024
_CHUNK_V = 8192


def _chunk_logits(h, w, b, temperature, softcap):
    """Returns (z, t) for one chunk in fp32, as the kernel's ``_logits_tile``."""
    raw = (h @ w.T).float() if h.dtype != torch.float32 else h @ w.T
    if b is not None:
        raw = raw + b.float()
    if softcap is None:
        return raw / temperature, None
    t = torch.tanh(raw / softcap)
    return t * (softcap / temperature), t


def _torch_forward(hidden, weight, bias, targets, temperature, softcap):
    m = hidden.shape[0]
    v = weight.shape[0]
    lse = torch.empty(m, device=hidden.device, dtype=torch.float32)
    tgt_logit = torch.empty_like(lse)
    for m0 in range(0, m, _CHUNK_M):
        h = hidden[m0 : m0 + _CHUNK_M]
        tgt = targets[m0 : m0 + _CHUNK_M]
        run_max = torch.full((h.shape[0],), float("-inf"), device=h.device)
        run_sum = torch.zeros(h.shape[0], device=h.device)
        picked = torch.zeros(h.shape[0], device=h.device)
        for v0 in range(0, v, _CHUNK_V):
            b = bias[v0 : v0 + _CHUNK_V] if bias is not None else None
            z, _ = _chunk_logits(h, weight[v0 : v0 + _CHUNK_V], b, temperature, softcap)
            new_max = torch.maximum(run_max, z.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(1)
            run_max = new_max
            local = tgt - v0
            inside = (local >= 0) & (local < z.shape[1])
            picked += torch.where(inside, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None])[:, 0], 0.0)
        lse[m0 : m0 + _CHUNK_M] = run_max + torch.log(run_sum)
        tgt_logit[m0 : m0 + _CHUNK_M] = picked
    return tgt_logit - lse, lse


def _torch_backward(grad, hidden, weight, bias, targets, lse, temperature, softcap, needs):
    m, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    dh = torch.zeros(m, d, device=hidden.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros(v, d, device=hidden.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros(v, device=hidden.device, dtype=torch.float32) if need_db else None
    for m0 in range(0, m, _CHUNK_M):
        rows = slice(m0, m0 + _CHUNK_M)
        h, tgt, g = hidden[rows], targets[rows], grad[rows]
        for v0 in range(0, v, _CHUNK_V):
            cols = slice(v0, v0 + _CHUNK_V)
            w = weight[cols]
            z, t = _chunk_logits(h, w, bias[cols] if bias is not None else None, temperature, softcap)
            dz = torch.exp(z - lse[rows, None]).mul_(-g[:, None])
            local = tgt - v0
            inside = ((local >= 0) & (local < z.shape[1])).nonzero()[:, 0]
            dz[inside, local[inside]] += g[inside]
            dz /= temperature
            if t is not None:
                dz *= 1.0 - t * t
            if need_db:
                db[cols] += dz.sum(0)
            dz_in = dz.to(hidden.dtype)
            if need_dh:
                dh[rows] += (dz_in @ w).float()
            if need_dw:
                dw[cols] += (dz_in.T @ h).float()
    return dh, dw, db


# --------------------------------------------------------------------------------------------------
# Entry points on compacted tokens (used by the fused losses, which drive the backward themselves)
# --------------------------------------------------------------------------------------------------


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(logp, lse)``, each fp32 ``[M]``, for ``M`` tokens whose targets are all valid.

    Equals ``z = cap(hidden @ weight.T + bias) / temperature; (z.log_softmax(-1)[targets], z.logsumexp(-1))``
    in fp32. No autograd: pair it with :func:`logprobs_backward`.
    """
    if hidden.shape[0] == 0:
        empty = torch.zeros(0, device=hidden.device, dtype=torch.float32)
        return empty, empty.clone()
    if backend == "triton":
        bias = bias.contiguous() if bias is not None else None
        return _triton_forward(hidden, weight, bias, targets.contiguous(), temperature, softcap)
    return _torch_forward(hidden, weight, bias, targets, temperature, softcap)


def logprobs_backward(
    grad_logp: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    filter_eps: float = 0.0,
    backend: str = "torch",
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(dhidden, dweight, dbias)`` of ``sum(grad_logp * logp)``, in the inputs' dtypes.

    ``filter_eps > 0`` (triton backend only) skips vocab tiles whose probabilities all fall below it.
    Gradients that are not needed come back as None.
    """
    needs = (needs_input_grad[0], needs_input_grad[1], needs_input_grad[2] and bias is not None)
    grad_logp = grad_logp.float().contiguous()
    if hidden.shape[0] == 0:
        dh, dw, db = (
            torch.zeros(0, hidden.shape[1], device=hidden.device, dtype=torch.float32),
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32),
            torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32),
        )
    elif backend == "triton":
        bias = bias.contiguous() if bias is not None else None
        dh, dw, db = _triton_backward(
            grad_logp, hidden, weight, bias, targets.contiguous(), lse.contiguous(), temperature, softcap,
            filter_eps, needs,
        )  # fmt: skip
    else:
        dh, dw, db = _torch_backward(
            grad_logp, hidden, weight, bias, targets, lse, temperature, softcap, needs
        )
    return (
        dh.to(hidden.dtype) if needs[0] else None,
        dw.to(weight.dtype) if needs[1] else None,
        db.to(bias.dtype) if needs[2] else None,
    )


# --------------------------------------------------------------------------------------------------
# Autograd and the public op
# --------------------------------------------------------------------------------------------------


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd node for :func:`linear_logprobs`; saves only hidden's valid-row indices and the lse."""

    @staticmethod
    def forward(
        ctx, hidden2d, weight, bias, targets1d, ignore_index, temperature, softcap, filter_eps, backend
    ):
        valid_rows = (targets1d != ignore_index).nonzero()[:, 0]
        compact = valid_rows.numel() != targets1d.numel()
        h = hidden2d.index_select(0, valid_rows) if compact else hidden2d
        tgt = targets1d.index_select(0, valid_rows) if compact else targets1d.contiguous()
        logp, lse = logprobs_forward(
            h, weight, bias, tgt, temperature=temperature, softcap=softcap, backend=backend
        )
        out = torch.zeros(targets1d.shape[0], device=hidden2d.device, dtype=torch.float32)
        out.index_copy_(0, valid_rows, logp)
        ctx.save_for_backward(hidden2d, weight, bias, tgt, lse, valid_rows)
        ctx.compact = compact
        ctx.opts = (temperature, softcap, filter_eps, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden2d, weight, bias, tgt, lse, valid_rows = ctx.saved_tensors
        temperature, softcap, filter_eps, backend = ctx.opts
        h = hidden2d.index_select(0, valid_rows) if ctx.compact else hidden2d
        dh, dw, db = logprobs_backward(
            grad_out.index_select(0, valid_rows), h, weight, bias, tgt, lse,
            temperature=temperature, softcap=softcap, filter_eps=filter_eps, backend=backend,
            needs_input_grad=ctx.needs_input_grad[:3],
        )  # fmt: skip
        if dh is not None and ctx.compact:
            dh = torch.zeros_like(hidden2d).index_copy_(0, valid_rows, dh)
        return dh, dw, db, None, None, None, None, None, None


def _validate(hidden, weight, targets, bias, ignore_index, temperature, softcap):
    if not all(isinstance(x, torch.Tensor) for x in (hidden, weight, targets)):
        raise TypeError("hidden, weight and targets must be torch.Tensors")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of them"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 token ids), got {targets.dtype}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., D] with at least 2 dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"hidden size mismatch: hidden has D={hidden.shape[-1]}, weight is [V, D]={list(weight.shape)}"
        )
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    if hidden.numel() == 0 or weight.numel() == 0:
        raise ValueError(f"empty input: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    devices = {hidden.device, weight.device, targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must be a [V]={weight.shape[0]} tensor, got {getattr(bias, 'shape', bias)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
        devices.add(bias.device)
    if len(devices) > 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    real = targets[targets != ignore_index]
    if real.numel() and (bool((real < 0).any()) or bool((real >= weight.shape[0]).any())):
        bad = real[(real < 0) | (real >= weight.shape[0])][0].item()
        raise ValueError(
            f"target {bad} is outside [0, V={weight.shape[0]}) and is not ignore_index={ignore_index}"
        )


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    filter_eps: float | str | None = "auto",
    backend: str | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Per-token log-probs of the targets, without materializing the ``[..., V]`` logits.

    Equals, in plain PyTorch::

        z = hidden @ weight.T + bias
        z = softcap * torch.tanh(z / softcap)          # if softcap
        logp = (z / temperature).float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        logp[targets == ignore_index] = 0.0

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16.
        weight: ``[V, D]``, same dtype and device as hidden.
        targets: ``[...]`` integer token ids, hidden's leading shape; ``ignore_index`` marks no-loss tokens.
        bias: optional ``[V]``.
        ignore_index: target value that yields exactly 0.0 and no gradient.
        temperature: divides the (soft-capped) logits.
        softcap: Gemma-2 final-logit soft-capping value, or None.
        filter_eps: backward gradient filtering (triton backend): vocab tiles whose softmax probabilities
            are all below this threshold and hold no target are skipped. ``"auto"`` is
            ``finfo(dtype).eps / 32``; None turns filtering off.
        backend: ``"triton"`` or ``"torch"``; default ``FASTDPO_BACKEND``, else triton on CUDA, torch
            elsewhere.
        group: a process group over which the vocabulary is sharded (tensor parallelism): ``weight`` and
            ``bias`` are then this rank's rows, placed in group-rank order; see
            ``fastdpo.ops.vocab_parallel.vocab_parallel_linear_logprobs``. None for a whole head.

    Returns:
        fp32 ``[...]`` log-probs. Gradients flow to hidden, weight and bias in their own dtypes.
    """
    if group is not None:
        from fastdpo.ops.vocab_parallel import vocab_parallel_linear_logprobs

        return vocab_parallel_linear_logprobs(
            hidden, weight, targets, bias, group=group, ignore_index=ignore_index, temperature=temperature,
            softcap=softcap, filter_eps=filter_eps, backend=backend,
        )  # fmt: skip
    _validate(hidden, weight, targets, bias, ignore_index, temperature, softcap)
    chosen = resolve_backend(hidden.device, backend)
    eps = filter_threshold(filter_eps, hidden.dtype) if chosen == "triton" else 0.0
    out = LinearLogprobsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).long(),
        ignore_index, float(temperature), None if softcap is None else float(softcap), eps, chosen,
    )  # fmt: skip
    return out.reshape(targets.shape)
