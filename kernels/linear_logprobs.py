"""Triton kernels for log_softmax(cap(H @ W.T + b) / T)[target], without materializing the logits.

Dimension letters: M valid (non-ignored) tokens, D hidden, V vocab. ``cap(z) = c * tanh(z / c)`` is
Gemma-2's final-logit soft-capping and T the temperature. Launchers live in
``fastdpo/ops/linear_logprobs.py``.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # libdevice's tanh is unavailable under the CPU interpreter. (1 - e) / (1 + e) with e = exp(-2|x|)
    # is accurate to a few ulp except near 0, where it cancels; there the odd Taylor series to x^7 is
    # exact to fp32 rounding (the first dropped term is below 2e-10 * |x| for |x| < 0.125).
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(
    H,
    W,
    BIAS,
    offs_m,
    offs_v,
    mask_m,
    mask_v,
    D,
    stride_hm,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Returns (z, t): the transformed fp32 logits tile and tanh(raw / softcap) (1.0 without softcap)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < D
        h = tl.load(
            H + offs_m[:, None] * stride_hm + offs_d[None, :] * stride_hd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        w = tl.load(
            W + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
            mask=mask_v[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(acc / softcap)
        z = softcap * t * inv_temp
    else:
        t = tl.full((BLOCK_M, BLOCK_V), 1.0, dtype=tl.float32)
        z = acc * inv_temp
    return z, t


@triton.jit
def _linear_logprobs_fwd_kernel(
    H,
    W,
    BIAS,
    TARGETS,
    PART_LSE,
    PART_TGT,
    M,
    V,
    D,
    stride_hm,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temp,
    softcap,
    V_PER_SPLIT,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_M tokens against one vocab split, with an online log-sum-exp.

    Writes the split's partial log-sum-exp and its share of the target logit (0 when the target lies in
    another split) to ``PART_*[split, m]``; the launcher folds the splits.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    mask_m = offs_m < M
    tgt = tl.load(TARGETS + offs_m, mask=mask_m, other=-1)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tgt_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_begin = pid_s.to(tl.int64) * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < v_end
        z, t = _logits_tile(
            H, W, BIAS, offs_m, offs_v, mask_m, mask_v, D,
            stride_hm, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        z = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        tgt_logit += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)

    lse = run_max + tl.log(run_sum)
    out = pid_s.to(tl.int64) * M + offs_m
    tl.store(PART_LSE + out, lse, mask=mask_m)
    tl.store(PART_TGT + out, tgt_logit, mask=mask_m)


@triton.jit
def _linear_logprobs_bwd_kernel(
    H,
    W,
    BIAS,
    TARGETS,
    LSE,
    GRAD,
    DH,
    DW,
    DB,
    M,
    V,
    D,
    stride_hm,
    stride_hd,
    stride_wv,
    stride_wd,
    inv_temp,
    softcap,
    filter_eps,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    IS_FILTERED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: one (BLOCK_M x BLOCK_V) tile of dlogits, folded into fp32 dH, dW, db with atomics.

    dz = g * (onehot - softmax), then the chain rule through temperature and softcap. With IS_FILTERED,
    a tile whose probabilities are all below ``filter_eps`` and which holds no target is skipped: its
    contribution sits below the output dtype's resolution (Cut Cross-Entropy's gradient filtering).
    """
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    mask_m = offs_m < M
    mask_v = offs_v < V

    z, t = _logits_tile(
        H, W, BIAS, offs_m, offs_v, mask_m, mask_v, D,
        stride_hm, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
        HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    tgt = tl.load(TARGETS + offs_m, mask=mask_m, other=-1)
    g = tl.load(GRAD + offs_m, mask=mask_m, other=0.0)
    valid = mask_m[:, None] & mask_v[None, :]
    p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
    is_tgt = (offs_v[None, :] == tgt[:, None]) & valid

    keep = True
    if IS_FILTERED:
        keep = (tl.max(tl.max(p, axis=1), axis=0) >= filter_eps) | (tl.sum(is_tgt.to(tl.int32)) > 0)
    if keep:
        dz = g[:, None] * (is_tgt.to(tl.float32) - p) * inv_temp
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        if HAS_DB:
            tl.atomic_add(DB + offs_v, tl.sum(dz, axis=0), mask=mask_v)
        dz_in = dz.to(H.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            mask_d = offs_d < D
            if HAS_DH:
                w = tl.load(
                    W + offs_v[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=mask_v[:, None] & mask_d[None, :],
                    other=0.0,
                )
                dh = tl.dot(dz_in, w.to(H.dtype.element_ty), input_precision=DOT_PRECISION)
                tl.atomic_add(
                    DH + offs_m[:, None] * D + offs_d[None, :], dh, mask=mask_m[:, None] & mask_d[None, :]
                )
            if HAS_DW:
                h = tl.load(
                    H + offs_m[:, None] * stride_hm + offs_d[None, :] * stride_hd,
                    mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0,
                )
                dw = tl.dot(tl.trans(dz_in), h, input_precision=DOT_PRECISION)
                tl.atomic_add(
                    DW + offs_v[:, None] * D + offs_d[None, :], dw, mask=mask_v[:, None] & mask_d[None, :]
                )
