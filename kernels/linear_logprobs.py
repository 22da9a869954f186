"""Triton kernels for log_softmax(cap(H @ W.T + b) / T)[target], without materializing the logits.

Dimension letters: M valid (non-ignored) tokens, D hidden, V vocab. ``cap(z) = c * tanh(z / c)`` is
Gemma-2's final-logit soft-capping and T the temperature. Launchers live in ``fastdpo/ops/_head_triton.py``.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def tanh(x, IS_INTERPRETED: tl.constexpr):
    """libdevice's tanh on a GPU; under the CPU interpreter, which lacks libdevice, a series-backed twin."""
    if IS_INTERPRETED:
        # (1 - e) / (1 + e) with e = exp(-2|x|) is accurate to a few ulp except near 0, where it cancels;
        # there the odd Taylor series to x^7 is exact to fp32 rounding (the first dropped term is below
        # 2e-10 * |x| for |x| < 0.125).
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        big = (1.0 - e) / (1.0 + e)
        x2 = x * x
        small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
        t = tl.where(ax < 0.125, small, big)
        return tl.where(x < 0, -t, t)
    else:
        return libdevice.tanh(x)


@triton.jit
def _grouped_pid(pid, num_pid_m, num_pid_v, GROUP_M: tl.constexpr):
    """(pid_m, pid_v) in groups of GROUP_M token blocks, token block fastest (Triton's matmul tutorial).

    A wave then touches GROUP_M hidden tiles and few weight tiles, which stay in L2, and spreads the
    atomic adds of one weight slice over GROUP_M programs instead of every token block at once.
    """
    num_pid_in_group = GROUP_M * num_pid_v
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_v = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_v


@triton.jit
def _logits_tile(
    H,
    W,
    BIAS,
    rm,
    rv,
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
    IS_INTERPRETED: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The transformed fp32 logits tile ``z = cap(H @ W.T + b) / T``; operands cast to COMPUTE_DTYPE.

    H, W and BIAS point at the tile's first row (an int64 offset); ``rm``/``rv`` are int32 row numbers
    within the tile, so the per-element offsets stay 32-bit (the launcher checks that they fit), which
    saves the registers of 64-bit address tiles. The softcap's tanh is not returned: the backward recovers
    it as ``z * T / softcap``, so no second tile stays live beside z.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(
            H + rm[:, None] * stride_hm + offs_d[None, :] * stride_hd,
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
        w = tl.load(
            W + rv[:, None] * stride_wv + offs_d[None, :] * stride_wd,
            mask=mask_v[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = tl.dot(h.to(COMPUTE_DTYPE), tl.trans(w.to(COMPUTE_DTYPE)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rv, mask=mask_v, other=0.0).to(COMPUTE_DTYPE).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        z = (softcap * inv_temp) * tanh(acc / softcap, IS_INTERPRETED)
    else:
        z = acc * inv_temp
    return z


# The split layout is not specialized on, so that one compiled kernel serves every split count.
@triton.jit(do_not_specialize=["V_PER_SPLIT", "NUM_SPLITS"])
def _linear_logprobs_fwd_kernel(
    H,
    W,
    BIAS,
    TARGETS,
    PARTS,
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
    NUM_SPLITS,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_STATS: tl.constexpr,
    IS_INTERPRETED: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program: BLOCK_M tokens against one vocab split, with an online log-sum-exp.

    Writes the split's partial results to ``PARTS[split, k, m]`` (``fastdpo.ops._head_common.Partials``
    order: lse, target logit or 0, then with HAS_STATS mean z, log sum p^2, sum z, max left of the
    target, max); the launcher folds the splits. Programs run in groups of GROUP_M token blocks x all
    splits, token block fastest: a wave holds about one group, so the hidden tiles it re-reads for every
    vocab tile (GROUP_M of them) and the weight tiles its splits walk in step stay in L2.
    """
    pid_m, pid_s = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), NUM_SPLITS, GROUP_M)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    rv = tl.arange(0, BLOCK_V)
    mask_m = rm < M - m0
    tgt = tl.load(TARGETS + m0 + rm, mask=mask_m, other=-1)

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tgt_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_STATS:
        sum_exp_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_exp2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_z = tl.zeros((BLOCK_M,), dtype=tl.float32)
        max_before = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    v_begin = pid_s.to(tl.int64) * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        mask_v = rv < v_end - v0
        # The target's column within this tile (outside [0, BLOCK_V) when elsewhere): 32-bit compares.
        local = (tgt - v0).to(tl.int32)
        z = _logits_tile(
            H + m0 * stride_hm, W + v0 * stride_wv, BIAS + v0, rm, rv, mask_m, mask_v, D,
            stride_hm, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
            HAS_BIAS, HAS_SOFTCAP, IS_INTERPRETED, COMPUTE_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        z = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        rescale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(e, axis=1)
        if HAS_STATS:
            # Masked columns hold z = -inf and e = 0: the sums over z leave them out explicitly.
            sum_z += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
            sum_exp_z = sum_exp_z * rescale + tl.sum(tl.where(mask_v[None, :], e * z, 0.0), axis=1)
            sum_exp2 = sum_exp2 * rescale * rescale + tl.sum(e * e, axis=1)
            left = rv[None, :] < local[:, None]
            max_before = tl.maximum(max_before, tl.max(tl.where(left, z, float("-inf")), axis=1))
        run_max = new_max
        tgt_logit += tl.sum(tl.where(rv[None, :] == local[:, None], z, 0.0), axis=1)

    log_sum = tl.log(run_sum)
    out = PARTS + (pid_s.to(tl.int64) * (7 if HAS_STATS else 2)) * M + m0 + rm
    tl.store(out, run_max + log_sum, mask=mask_m)
    tl.store(out + M, tgt_logit, mask=mask_m)
    if HAS_STATS:
        tl.store(out + 2 * M, sum_exp_z / run_sum, mask=mask_m)
        tl.store(out + 3 * M, tl.log(sum_exp2) - 2.0 * log_sum, mask=mask_m)
        tl.store(out + 4 * M, sum_z, mask=mask_m)
        tl.store(out + 5 * M, max_before, mask=mask_m)
        tl.store(out + 6 * M, run_max, mask=mask_m)


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
    dz_scale,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    IS_FILTERED: tl.constexpr,
    IS_INTERPRETED: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program: one (BLOCK_M x BLOCK_V) tile of dlogits, folded into fp32 dH, dW, db with atomics.

    dz = g * (onehot - softmax), then the chain rule through temperature and softcap, times ``dz_scale``
    (a power of two that keeps fp16 dz clear of underflow; the launcher divides it out). With
    IS_FILTERED, a tile whose probabilities are all below ``filter_eps`` and which holds no target is
    skipped: its contribution sits below the output dtype's resolution (Cut Cross-Entropy's filtering).
    The adds are relaxed atomics: they commute, and nothing reads the accumulators before the kernel ends.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    pid_m, pid_v = _grouped_pid(tl.program_id(0), num_pid_m, num_pid_v, GROUP_M)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    v0 = pid_v.to(tl.int64) * BLOCK_V
    rm = tl.arange(0, BLOCK_M)
    rv = tl.arange(0, BLOCK_V)
    mask_m = rm < M - m0
    mask_v = rv < V - v0
    H += m0 * stride_hm
    W += v0 * stride_wv

    z = _logits_tile(
        H, W, BIAS + v0, rm, rv, mask_m, mask_v, D,
        stride_hm, stride_hd, stride_wv, stride_wd, inv_temp, softcap,
        HAS_BIAS, HAS_SOFTCAP, IS_INTERPRETED, COMPUTE_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    lse = tl.load(LSE + m0 + rm, mask=mask_m, other=0.0)
    local = (tl.load(TARGETS + m0 + rm, mask=mask_m, other=-1) - v0).to(tl.int32)
    g = tl.load(GRAD + m0 + rm, mask=mask_m, other=0.0)
    valid = mask_m[:, None] & mask_v[None, :]
    p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)
    is_tgt = (rv[None, :] == local[:, None]) & valid

    keep = True
    if IS_FILTERED:
        keep = (tl.max(tl.max(p, axis=1), axis=0) >= filter_eps) | (tl.sum(is_tgt.to(tl.int32)) > 0)
    if keep:
        dz = (g * (inv_temp * dz_scale))[:, None] * (is_tgt.to(tl.float32) - p)
        if HAS_SOFTCAP:
            t = z * (1.0 / (softcap * inv_temp))
            dz = dz * (1.0 - t * t)
        if HAS_DB:
            tl.atomic_add(DB + v0 + rv, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
        dz_in = dz.to(COMPUTE_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            if HAS_DH:
                w = tl.load(
                    W + rv[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                    mask=mask_v[:, None] & mask_d[None, :],
                    other=0.0,
                )
                dh = tl.dot(dz_in, w.to(COMPUTE_DTYPE), input_precision=DOT_PRECISION)
                tl.atomic_add(
                    DH + m0 * D + rm[:, None] * D + offs_d[None, :], dh,
                    mask=mask_m[:, None] & mask_d[None, :], sem="relaxed",
                )  # fmt: skip
            if HAS_DW:
                h = tl.load(
                    H + rm[:, None] * stride_hm + offs_d[None, :] * stride_hd,
                    mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0,
                )
                dw = tl.dot(tl.trans(dz_in), h.to(COMPUTE_DTYPE), input_precision=DOT_PRECISION)
                tl.atomic_add(
                    DW + v0 * D + rv[:, None] * D + offs_d[None, :], dw,
                    mask=mask_v[:, None] & mask_d[None, :], sem="relaxed",
                )  # fmt: skip
