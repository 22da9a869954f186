"""The chunked head (``impl="chunked"``, and the whole torch backend): matmuls into one reusable buffer.

Dimension letters: M valid tokens, D hidden, V vocab; a chunk is ``[CM, CV]`` tokens x vocab.

Forward, per chunk: ``buf = H_c @ W_c.T (+ b_c)`` by ``torch.mm`` (cuBLAS on a GPU) in the compute dtype,
then a fold turns the chunk into the running max, sum-exp, target logit and the statistics (on the CPU
by blocks of rows that stay in cache; every step is row-wise, so the blocks change no bit). Backward
recomputes each chunk, the fold turns it in place into ``dz = d logp / d logits``, and
``dH += dz @ W_c``, ``dW_c += dz.T @ H_c`` accumulate in fp32. The fold is a Triton kernel on the triton
backend (:mod:`fastdpo.ops._head_triton`) and the same math in torch on the torch backend. Every step is a
deterministic matmul or a row-wise fold, so results are bitwise reproducible run to run.

The numerics follow TRL 1.16's ``trl/kernels/chunked_logprob.py``: the logits chunk is rounded once to
the compute dtype (as a matmul output in that dtype is), dz once to it, and products are summed in fp32
without an intermediate rounding. Only fp16 differs: dz is scaled by a power of two first so that its
small entries do not underflow, and the accumulators are divided by it at the end (exact). The torch
fold's statistics are summed in one pass in their own fixed order (:mod:`fastdpo.ops._moments`), so they
agree with TRL's to a few ulp.
"""

from __future__ import annotations

import functools
import math
import threading

import torch

from fastdpo.metarun import device_type
from fastdpo.ops._head_common import Partials
from fastdpo.ops._moments import softmax_moments

__all__ = ["chunk_shape", "chunked_backward", "chunked_forward"]

# Elements of the one logits buffer (the impl's extra memory beside the fp32 gradient accumulators). On a
# GPU, TRL's tile of 4096 x 32768 (256 MiB in bf16) keeps cuBLAS at full speed. On the CPU the torch fold
# adds an fp32 copy of a bf16/fp16 chunk, so the buffer stays at 4M elements (16 MiB).
_GPU_CHUNK_ELEMENTS = 4096 * 32768
_CPU_CHUNK_ELEMENTS = 4096 * 1024
_CHUNK_M = 4096
_MAX_CHUNK_V = 32768
_MIN_CHUNK_V = 256
_CPU_SCRATCH = threading.local()
# Elements per row block of the torch fold on the CPU: 2 MiB of fp32 logits (and as much of exponentials
# with statistics) stay in the last-level cache through the block's max, exponentials, sums and moments.
_FOLD_BLOCK_ELEMENTS = 1 << 19
# |dz| <= |g| / T; scaled to at most 2**14, the largest fp16 product stays finite and entries down to
# 2**-38 of the largest survive (fp16's smallest subnormal is 2**-24).
_FP16_DZ_MAX = 2.0**14


def chunk_shape(m: int, v: int, device: torch.device) -> tuple[int, int]:
    """``(CM, CV)``: TRL's 4096 x 32768 chunk, with fewer vocab columns where the buffer budget says so.

    The buffer holds ``CM * CV <= 2**27`` elements on CUDA and at most ``max(2**22, 256 * CM)`` elsewhere.
    Where the budget does not cut it, the chunk boundaries are TRL's, so that sums run in its order.
    """
    budget = _GPU_CHUNK_ELEMENTS if device_type(device) == "cuda" else _CPU_CHUNK_ELEMENTS
    cm = max(1, min(m, _CHUNK_M))
    cv = min(v, _MAX_CHUNK_V, max(_MIN_CHUNK_V, budget // cm))
    return cm, cv


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` into fp32 ``acc`` without rounding the product to the operands' dtype first."""
    if device_type(acc.device) == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _transform(raw: torch.Tensor, inv_temp: float, softcap: float | None):
    """``(z, t)``: ``z = cap(raw) / T`` and ``t = tanh(raw / softcap)`` (None without softcap), in fp32.

    The order of operations is TRL's, so that both round alike (skipping a product by 1.0 changes no
    bit). ``z`` may be ``raw`` itself: callers do not write to it.
    """
    if softcap is None:
        return (raw if inv_temp == 1.0 else raw * inv_temp), None
    t = torch.tanh(raw / softcap)
    return softcap * t * inv_temp, t


def _exp_scratch(shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Flat fp32 room for the exponentials of one :func:`_fold_rows` block of any chunk up to ``shape``.

    On the CPU a block holds at most ``max(_FOLD_BLOCK_ELEMENTS, CV)`` elements, and the buffer is one per
    thread, kept and reused: a fresh one each call costs a page fault per 4 KiB page, more than the
    statistics themselves. CUDA's caching allocator reuses memory already.
    """
    cm, cv = shape
    if device_type(device) != "cpu":
        return torch.empty(cm * cv, device=device, dtype=torch.float32)
    numel = min(cm * cv, max(_FOLD_BLOCK_ELEMENTS, cv))
    # Kept per device type: a meta run planning for the CPU (fastdpo plan) keeps one as the CPU does.
    buf = getattr(_CPU_SCRATCH, device.type, None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, device=device, dtype=torch.float32)
        setattr(_CPU_SCRATCH, device.type, buf)
    return buf[:numel]


def release_scratch(device_type: str) -> None:
    """Drops the kept exponentials buffer of ``device_type``, so that the next fold allocates it anew."""
    _CPU_SCRATCH.__dict__.pop(device_type, None)


def new_state(m: int, device: torch.device, stats: bool) -> torch.Tensor:
    """fp32 ``[K, M]`` running state: max, sum_exp, target, and with stats sum_exp_z, sum_exp2, sum_z,
    max_before.

    ``sum_exp*`` are relative to the running max; ``max_before`` is as in ``Partials``.
    """
    fill = [float("-inf"), 0.0, 0.0] + ([0.0, 0.0, 0.0, float("-inf")] if stats else [])
    return torch.tensor(fill, device=device, dtype=torch.float32)[:, None].repeat(1, m)


def torch_fold_forward(tile, targets, state, v0, inv_temp, softcap, scratch=None):
    """Folds one logits chunk ``[n, CV]`` into ``state``, the chunk's rows ``[K, n]`` of :func:`new_state`.

    The chunk is scratch afterwards. With statistics the exponentials go to ``scratch`` (flat fp32 of
    :func:`_exp_scratch`, one row block's worth) and :func:`softmax_moments` reads the logits and them.
    """
    z, _ = _transform(tile.float(), inv_temp, softcap)
    run_max, sum_exp, target = state[0], state[1], state[2]
    has_stats = state.shape[0] > 3
    local = targets - v0
    n_rows, n_cols = z.shape
    inside = (local >= 0) & (local < n_cols)
    picked = z.gather(1, local.clamp(0, n_cols - 1)[:, None])[:, 0]
    target.copy_(torch.where(inside, picked, target))
    chunk_max, new_max, chunk_sum, moments = _fold_rows(z, run_max, scratch if has_stats else None)
    if has_stats:
        max_before = state[6]
        # max_before only decides ``target > max_before`` (see Partials): a chunk wholly left of the
        # target adds its max. Inside the target's chunk only a target equal to the chunk's max can be the
        # first maximum, so only those rows (usually few) are scanned; where an equal logit lies left of
        # the target, that logit is the exact largest one left of it.
        max_before.copy_(torch.where(local >= n_cols, torch.maximum(max_before, chunk_max), max_before))
        rows = (inside & (picked == chunk_max)).nonzero()[:, 0]
        # argmax gives the first maximum. Scanning the whole chunk costs less than copying out most of it.
        first = z.argmax(-1)[rows] if 2 * rows.numel() > n_rows else z[rows].argmax(-1)
        late = rows[first < local[rows]]
        max_before[late] = torch.maximum(max_before[late], picked[late])
    rescale = torch.exp(run_max - new_max)
    sum_exp.mul_(rescale).add_(chunk_sum)
    if has_stats:
        sum_z, sum_exp_z, sum_exp2 = state[5], state[3], state[4]
        sum_z += moments[0]
        sum_exp_z.mul_(rescale).add_(moments[1])
        sum_exp2.mul_(rescale * rescale).add_(moments[2])
    run_max.copy_(new_max)


def _row_block(n_rows: int, n_cols: int, device: torch.device) -> int:
    """Rows per block of :func:`_fold_rows`: about ``_FOLD_BLOCK_ELEMENTS`` elements on the CPU, else all."""
    if device_type(device) != "cpu":
        return n_rows
    return max(1, min(n_rows, _FOLD_BLOCK_ELEMENTS // max(n_cols, 1)))


def _fold_rows(z, run_max, scratch):
    """``(chunk max, new running max, sum e, moments or None)`` of ``e = exp(z - new max)``, row by row.

    Every step is torch's own row-wise op, so the bits do not depend on the blocks; blocks of rows keep the
    chunk in the last-level cache from its max to its moments, instead of streaming it from memory for each
    step. Without ``scratch`` the exponentials overwrite ``z``; with it they go there, and
    :func:`softmax_moments` reads ``z`` and them while both are in cache.
    """
    n_rows, n_cols = z.shape
    chunk_max, new_max, sums = (torch.empty(n_rows, device=z.device, dtype=torch.float32) for _ in range(3))
    moments = None if scratch is None else torch.empty(3, n_rows, device=z.device, dtype=torch.float32)
    step = _row_block(n_rows, n_cols, z.device)
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        zb = z[rows]
        torch.amax(zb, -1, out=chunk_max[rows])
        torch.maximum(run_max[rows], chunk_max[rows], out=new_max[rows])
        if scratch is None:
            e = zb.sub_(new_max[rows, None])
        else:
            e = torch.sub(zb, new_max[rows, None], out=scratch[: zb.numel()].view(zb.shape))
        torch.sum(e.exp_(), -1, out=sums[rows])
        if moments is not None:
            softmax_moments(zb, e, out=moments[:, rows])
    return chunk_max, new_max, sums, moments


def torch_fold_backward(tile, targets, lse, grad, v0, inv_temp, softcap, scale):
    """Turns one logits chunk in place into ``scale * d(sum grad * logp) / d(raw logits)``."""
    z, t = _transform(tile.float(), inv_temp, softcap)
    local = targets - v0
    rows = ((local >= 0) & (local < z.shape[1])).nonzero()[:, 0]
    cols = local[rows]
    dz = z.sub_(lse[:, None]).exp_()  # z is the chunk itself or a fresh copy: scratch either way
    p_target = dz[rows, cols]
    # grad * (onehot - p), as TRL writes it: -(grad * p) off the target, grad * (1 - p) on it.
    dz.mul_(-grad[:, None])
    dz[rows, cols] = grad[rows] * (1 - p_target)
    if inv_temp != 1.0:
        dz *= inv_temp
    if t is not None:
        dz *= 1 - t * t
    if scale != 1.0:
        dz *= scale
    tile.copy_(dz)


def _folds(backend: str):
    if backend == "triton":
        from fastdpo.ops import _head_triton

        return _head_triton.fold_forward, _head_triton.fold_backward
    return torch_fold_forward, torch_fold_backward


def _chunks(hidden, weight, bias, compute_dtype, buf):
    """Yields ``(rows, cols, h_c, w_c, tile)``, ``tile = h_c @ w_c.T + b_c`` in ``buf`` (compute dtype)."""
    m, v = hidden.shape[0], weight.shape[0]
    cm, cv = buf.shape
    for m0 in range(0, m, cm):
        rows = slice(m0, min(m0 + cm, m))
        h = hidden[rows].to(compute_dtype)
        for v0 in range(0, v, cv):
            cols = slice(v0, min(v0 + cv, v))
            w = weight[cols].to(compute_dtype)
            tile = buf[: h.shape[0], : w.shape[0]]
            torch.mm(h, w.T, out=tile)
            if bias is not None:
                tile.add_(bias[cols].to(compute_dtype))
            yield rows, cols, h, w, tile


def chunked_forward(hidden, weight, bias, targets, *, temperature, softcap, backend, stats, compute_dtype):
    """One ``Partials`` part (the whole vocabulary) of the M rows, by chunks; see ``logprobs_partials``."""
    m, v = hidden.shape[0], weight.shape[0]
    buf = torch.empty(chunk_shape(m, v, hidden.device), device=hidden.device, dtype=compute_dtype)
    state = new_state(m, hidden.device, stats)
    fold_forward, _ = _folds(backend)
    if stats and backend == "torch":
        fold_forward = functools.partial(fold_forward, scratch=_exp_scratch(buf.shape, hidden.device))
    for rows, cols, _, _, tile in _chunks(hidden, weight, bias, compute_dtype, buf):
        fold_forward(tile, targets[rows], state[:, rows], cols.start, 1.0 / temperature, softcap)
    run_max, sum_exp, target = state[0], state[1], state[2]
    lse = run_max + torch.log(sum_exp)
    parts = Partials(lse[None], target[None])
    if stats:
        sum_exp_z, sum_exp2, sum_z, max_before = state[3], state[4], state[5], state[6]
        log_sum_p2 = torch.log(sum_exp2) - 2 * torch.log(sum_exp)
        parts = Partials(lse[None], target[None], (sum_exp_z / sum_exp)[None], log_sum_p2[None],
                         sum_z[None], max_before[None], run_max[None])  # fmt: skip
    return parts


def dz_scale(grad: torch.Tensor, temperature: float, compute_dtype: torch.dtype) -> float:
    """A power of two that lifts fp16 dz clear of underflow (1.0 for other dtypes)."""
    if compute_dtype != torch.float16 or grad.numel() == 0 or grad.is_meta:
        return 1.0
    # One host sync per fp16 backward: the scale is a host float the kernels and folds take as an
    # argument. It runs inside the head's backward op, which torch.compile does not trace into.
    peak = grad.abs().max().item() / temperature
    # A non-finite gradient has no scale to lift; it goes through unscaled and poisons dz as it should.
    if peak == 0 or not math.isfinite(peak):
        return 1.0
    return 2.0 ** math.floor(math.log2(_FP16_DZ_MAX / peak))


def chunked_backward(grad, hidden, weight, bias, targets, lse, *, temperature, softcap, backend, needs,
                     compute_dtype, scale):  # fmt: skip
    """fp32 ``(dH, dW, db)`` times ``scale`` (None where not needed); see ``_head.logprobs_backward``."""
    m, d = hidden.shape
    v = weight.shape[0]
    need_dh, need_dw, need_db = needs
    dh = torch.zeros(m, d, device=hidden.device, dtype=torch.float32) if need_dh else None
    dw = torch.zeros(v, d, device=hidden.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros(v, device=hidden.device, dtype=torch.float32) if need_db else None
    buf = torch.empty(chunk_shape(m, v, hidden.device), device=hidden.device, dtype=compute_dtype)
    _, fold_backward = _folds(backend)
    for rows, cols, h, w, tile in _chunks(hidden, weight, bias, compute_dtype, buf):
        inv_temp = 1.0 / temperature
        fold_backward(tile, targets[rows], lse[rows], grad[rows], cols.start, inv_temp, softcap, scale)
        if need_dh:
            _addmm_fp32(dh[rows], tile, w)
        if need_dw:
            _addmm_fp32(dw[cols], tile.T, h)
        if need_db:
            db[cols] += tile.sum(0, dtype=torch.float32)
    return dh, dw, db
