"""Triton folds of the chunked head: a logits chunk, computed by a matmul, into log-probs or into dz.

Dimension letters: a chunk is ``[n, n_cols]`` logits of n tokens against the vocab columns
``[v0, v0 + n_cols)``, rows ``stride_t`` apart. The driver is ``fastdpo/ops/_head_chunked.py``; its
``torch_fold_forward`` / ``torch_fold_backward`` are these kernels in torch.
"""

import triton
import triton.language as tl

from .linear_logprobs import tanh


@triton.jit
def _transform(raw, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, IS_INTERPRETED: tl.constexpr):
    if HAS_SOFTCAP:
        return (softcap * inv_temp) * tanh(raw / softcap, IS_INTERPRETED)
    else:
        return raw * inv_temp


@triton.jit
def _chunked_logprobs_fwd_kernel(
    TILE,
    stride_t,
    TARGETS,
    STATE,
    stride_state,
    n_cols,
    v0,
    inv_temp,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_STATS: tl.constexpr,
    IS_INTERPRETED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per token: folds its row of the chunk into the running state ``STATE[k, row]``.

    State rows: max, sum exp(z - max), target logit, then with HAS_STATS sum exp(z - max) * z,
    sum exp(z - max)^2, sum z and the largest logit left of the target.
    """
    row = tl.program_id(0).to(tl.int64)
    tile = TILE + row * stride_t
    state = STATE + row
    run_max = tl.load(state)
    run_sum = tl.load(state + stride_state)
    local = tl.load(TARGETS + row) - v0
    if HAS_STATS:
        sum_exp_z = tl.load(state + 3 * stride_state)
        sum_exp2 = tl.load(state + 4 * stride_state)
        sum_z = tl.load(state + 5 * stride_state)
        max_before = tl.load(state + 6 * stride_state)
    for c0 in range(0, n_cols, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        mask = offs < n_cols
        raw = tl.load(tile + offs, mask=mask, other=0.0).to(tl.float32)
        z_in = tl.where(mask, _transform(raw, inv_temp, softcap, HAS_SOFTCAP, IS_INTERPRETED), 0.0)
        z = tl.where(mask, z_in, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        rescale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max)
        run_sum = run_sum * rescale + tl.sum(e, axis=0)
        if HAS_STATS:
            sum_exp_z = sum_exp_z * rescale + tl.sum(e * z_in, axis=0)
            sum_exp2 = sum_exp2 * rescale * rescale + tl.sum(e * e, axis=0)
            sum_z += tl.sum(z_in, axis=0)
            max_before = tl.maximum(max_before, tl.max(tl.where(offs < local, z, float("-inf")), axis=0))
        run_max = new_max
    tl.store(state, run_max)
    tl.store(state + stride_state, run_sum)
    if HAS_STATS:
        tl.store(state + 3 * stride_state, sum_exp_z)
        tl.store(state + 4 * stride_state, sum_exp2)
        tl.store(state + 5 * stride_state, sum_z)
        tl.store(state + 6 * stride_state, max_before)
    if (local >= 0) & (local < n_cols):
        raw = tl.load(tile + local).to(tl.float32)
        tl.store(state + 2 * stride_state, _transform(raw, inv_temp, softcap, HAS_SOFTCAP, IS_INTERPRETED))


@triton.jit
def _chunked_logprobs_bwd_kernel(
    TILE,
    stride_t,
    TARGETS,
    LSE,
    GRAD,
    n_cols,
    v0,
    inv_temp,
    softcap,
    dz_scale,
    HAS_SOFTCAP: tl.constexpr,
    IS_INTERPRETED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per (token, BLOCK columns): overwrites the logits with ``dz_scale * d logp / d raw``.

    ``dz = g * (onehot - softmax) / T``, times ``1 - tanh^2`` through the softcap. ``dz_scale`` is a power
    of two that keeps fp16 dz clear of underflow; the driver divides it out of the fp32 accumulators.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n_cols
    ptrs = TILE + row * stride_t + offs
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        t = tanh(raw / softcap, IS_INTERPRETED)
        z = (softcap * inv_temp) * t
    else:
        z = raw * inv_temp
    p = tl.exp(z - tl.load(LSE + row))
    is_tgt = (offs + v0) == tl.load(TARGETS + row)
    dz = (tl.load(GRAD + row) * (inv_temp * dz_scale)) * (is_tgt.to(tl.float32) - p)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    tl.store(ptrs, dz.to(TILE.dtype.element_ty), mask=mask)
