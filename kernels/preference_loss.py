"""Triton kernel of the fused preference losses: per-pair losses, rewards and d loss / d logp in one launch.

Bit ``k`` of ``LOSS_TYPES`` enables one loss type; the table lives in ``fastdpo.ops.preference_loss``
(``KERNEL_LOSS_BITS``): 0 sigmoid, 1 hinge, 2 ipo, 3 exo_pair, 4 nca_pair, 5 robust, 6 bco_pair,
7 sppo_hard, 8 apo_zero, 9 apo_down, 10 discopop, 11 sigmoid_norm, 12 simpo, 13 orpo.
``F_DIVERGENCE``: 0 reverse_kl, 1 forward_kl, 2 js_divergence, 3 alpha_divergence.
"""

import triton
import triton.language as tl


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _one_minus_exp(x):
    # 1 - exp(x) loses all precision as x -> 0-, and ORPO's average log-probs live there; on [-ln 2, 0]
    # use -x * (expm1(x) / x) with the Taylor series of expm1(x) / x (truncation < 1e-9 relative).
    s = 1.0 + x / 11.0
    s = 1.0 + x / 10.0 * s
    s = 1.0 + x / 9.0 * s
    s = 1.0 + x / 8.0 * s
    s = 1.0 + x / 7.0 * s
    s = 1.0 + x / 6.0 * s
    s = 1.0 + x / 5.0 * s
    s = 1.0 + x / 4.0 * s
    s = 1.0 + x / 3.0 * s
    s = 1.0 + x / 2.0 * s
    return tl.where(x < -0.6931471805599453, 1.0 - tl.exp(x), -x * s)


@triton.jit
def _f_divergence_score(logratio, f_alpha_coef, F_DIVERGENCE: tl.constexpr):
    """Returns (score, d score / d logratio) of TRL's f-divergence reparameterization."""
    if F_DIVERGENCE == 1:
        e = tl.exp(-logratio)
        score = 1.0 - e
        dscore = e
    elif F_DIVERGENCE == 2:
        score = 0.6931471805599453 + _logsigmoid(logratio)
        dscore = tl.sigmoid(-logratio)
    elif F_DIVERGENCE == 3:
        t = (f_alpha_coef - 1.0) * logratio
        # TRL clamps t at 80 so exp(t) stays finite; the clamp has zero gradient above it.
        clamped = tl.where(t > 80.0, 80.0, t)
        e = tl.exp(clamped)
        score = (e - 1.0) / (f_alpha_coef - 1.0)
        dscore = tl.where(t > 80.0, 0.0, e)
    else:
        score = logratio
        dscore = tl.full(logratio.shape, 1.0, tl.float32)
    return score, dscore


@triton.jit
def _preference_loss_fwd_kernel(
    policy_logps_ptr,
    ref_logps_ptr,
    lengths_ptr,
    loss_weights_ptr,
    losses_ptr,
    coefs_ptr,
    rewards_ptr,
    log_odds_ptr,
    num_pairs,
    inv_num_pairs,
    beta,
    label_smoothing,
    discopop_tau,
    simpo_gamma,
    f_alpha_coef,
    LOSS_TYPES: tl.constexpr,
    F_DIVERGENCE: tl.constexpr,
    HAS_REFERENCE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Per pair j: losses[j] = sum_k w_k * loss_k(j); coefs[s] = d mean_j(losses) / d policy_logps[s].

    Sequences are numbered as in ``fastdpo.packing``: chosen of pair j is j, rejected is B + j.
    rewards[s] = beta * (policy_logps[s] - ref_logps[s]); log_odds[j] is ORPO's log odds ratio.
    """
    # Default config: BLOCK_SIZE = min(1024, next_power_of_2(B)), num_warps=4 -- one program covers a whole
    # batch of pairs in practice; the work is a few dozen flops per pair.
    pid = tl.program_id(0)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < num_pairs

    # Masked lanes get a log-prob of -1 so ORPO's log(1 - exp(logp)) stays finite there.
    pc = tl.load(policy_logps_ptr + offs, mask=mask, other=-1.0).to(tl.float32)
    pr = tl.load(policy_logps_ptr + num_pairs + offs, mask=mask, other=-1.0).to(tl.float32)
    if HAS_REFERENCE:
        rc = tl.load(ref_logps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rr = tl.load(ref_logps_ptr + num_pairs + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        rc = tl.zeros_like(pc)
        rr = tl.zeros_like(pc)
    # Clamped at 1 as TRL does; the op layer rejects empty sequences for the types that divide by them.
    nc = tl.maximum(tl.load(lengths_ptr + offs, mask=mask, other=1.0).to(tl.float32), 1.0)
    nr = tl.maximum(tl.load(lengths_ptr + num_pairs + offs, mask=mask, other=1.0).to(tl.float32), 1.0)

    lc = pc - rc
    lr = pr - rr
    sc, dsc = _f_divergence_score(lc, f_alpha_coef, F_DIVERGENCE)
    sr, dsr = _f_divergence_score(lr, f_alpha_coef, F_DIVERGENCE)
    z = beta * (sc - sr)
    cr = beta * lc
    rj = beta * lr

    loss = tl.zeros_like(pc)
    # d loss / d pc and d loss / d pr, accumulated over the enabled loss types
    gc = tl.zeros_like(pc)
    gr = tl.zeros_like(pc)

    if (LOSS_TYPES >> 0) & 1:  # sigmoid
        w = tl.load(loss_weights_ptr + 0)
        dz = -tl.sigmoid(-z) * beta * w
        loss += -_logsigmoid(z) * w
        gc += dz * dsc
        gr -= dz * dsr
    if (LOSS_TYPES >> 1) & 1:  # hinge
        w = tl.load(loss_weights_ptr + 1)
        dz = tl.where(1.0 - z > 0.0, -beta * w, 0.0)
        loss += tl.maximum(1.0 - z, 0.0) * w
        gc += dz * dsc
        gr -= dz * dsr
    if (LOSS_TYPES >> 2) & 1:  # ipo: length-normalized scores
        w = tl.load(loss_weights_ptr + 2)
        err = sc / nc - sr / nr - 0.5 / beta
        loss += err * err * w
        gc += 2.0 * err * w * dsc / nc
        gr -= 2.0 * err * w * dsr / nr
    if (LOSS_TYPES >> 3) & 1:  # exo_pair
        w = tl.load(loss_weights_ptr + 3)
        log_pw = tl.log(1.0 - label_smoothing)
        log_pl = tl.log(label_smoothing)
        qw = tl.sigmoid(z)
        ql = tl.sigmoid(-z)
        log_qw = _logsigmoid(z)
        log_ql = _logsigmoid(-z)
        loss += (qw * (log_qw - log_pw) + ql * (log_ql - log_pl)) * w
        dz = qw * ql * (z - log_pw + log_pl) * beta * w
        gc += dz * dsc
        gr -= dz * dsr
    if (LOSS_TYPES >> 4) & 1:  # nca_pair
        w = tl.load(loss_weights_ptr + 4)
        loss += (-_logsigmoid(cr) - 0.5 * _logsigmoid(-cr) - 0.5 * _logsigmoid(-rj)) * w
        gc += (-tl.sigmoid(-cr) + 0.5 * tl.sigmoid(cr)) * beta * w
        gr += 0.5 * tl.sigmoid(rj) * beta * w
    if (LOSS_TYPES >> 5) & 1:  # robust
        w = tl.load(loss_weights_ptr + 5)
        inv = w / (1.0 - 2.0 * label_smoothing)
        loss += (-(1.0 - label_smoothing) * _logsigmoid(z) + label_smoothing * _logsigmoid(-z)) * inv
        dz = (-(1.0 - label_smoothing) * tl.sigmoid(-z) - label_smoothing * tl.sigmoid(z)) * inv * beta
        gc += dz * dsc
        gr -= dz * dsr
    if (LOSS_TYPES >> 6) & 1:  # bco_pair
        w = tl.load(loss_weights_ptr + 6)
        loss += (-_logsigmoid(cr) - _logsigmoid(-rj)) * w
        gc += -tl.sigmoid(-cr) * beta * w
        gr += tl.sigmoid(rj) * beta * w
    if (LOSS_TYPES >> 7) & 1:  # sppo_hard
        w = tl.load(loss_weights_ptr + 7)
        ec = lc - 0.5 / beta
        er = lr + 0.5 / beta
        loss += (ec * ec + er * er) * w
        gc += 2.0 * ec * w
        gr += 2.0 * er * w
    if (LOSS_TYPES >> 8) & 1:  # apo_zero
        w = tl.load(loss_weights_ptr + 8)
        sig_c = tl.sigmoid(cr)
        sig_r = tl.sigmoid(rj)
        loss += (1.0 - sig_c + sig_r) * w
        gc += -sig_c * (1.0 - sig_c) * beta * w
        gr += sig_r * (1.0 - sig_r) * beta * w
    if (LOSS_TYPES >> 9) & 1:  # apo_down
        w = tl.load(loss_weights_ptr + 9)
        sig_c = tl.sigmoid(cr)
        sig_m = tl.sigmoid(cr - rj)
        loss += (sig_c + 1.0 - sig_m) * w
        gc += (sig_c * (1.0 - sig_c) - sig_m * (1.0 - sig_m)) * beta * w
        gr += sig_m * (1.0 - sig_m) * beta * w
    if (LOSS_TYPES >> 10) & 1:  # discopop
        w = tl.load(loss_weights_ptr + 10)
        mod = tl.sigmoid(z / discopop_tau)
        dmod = mod * (1.0 - mod) / discopop_tau
        logistic = -_logsigmoid(z)
        expo = tl.exp(-z)
        loss += (logistic * (1.0 - mod) + expo * mod) * w
        dz = (-tl.sigmoid(-z) * (1.0 - mod) - logistic * dmod - expo * mod + expo * dmod) * beta * w
        gc += dz * dsc
        gr -= dz * dsr
    if (LOSS_TYPES >> 11) & 1:  # sigmoid_norm: length-normalized scores
        w = tl.load(loss_weights_ptr + 11)
        zn = beta * (sc / nc - sr / nr)
        dz = -tl.sigmoid(-zn) * beta * w
        loss += -_logsigmoid(zn) * w
        gc += dz * dsc / nc
        gr -= dz * dsr / nr
    if (LOSS_TYPES >> 12) & 1:  # simpo: reference-free, gamma margin, label smoothing as in TRL's CPO
        w = tl.load(loss_weights_ptr + 12)
        zs = beta * (pc - pr) - simpo_gamma
        loss += (-(1.0 - label_smoothing) * _logsigmoid(zs) - label_smoothing * _logsigmoid(-zs)) * w
        dz = (-(1.0 - label_smoothing) * tl.sigmoid(-zs) + label_smoothing * tl.sigmoid(zs)) * beta * w
        gc += dz
        gr -= dz
    if (LOSS_TYPES >> 13) & 1:  # orpo: -beta * log sigmoid(log odds ratio); its NLL term is added per token
        w = tl.load(loss_weights_ptr + 13)
        om_c = _one_minus_exp(pc)
        om_r = _one_minus_exp(pr)
        log_odds = (pc - pr) - (tl.log(om_c) - tl.log(om_r))
        loss += -beta * _logsigmoid(log_odds) * w
        dlo = -beta * tl.sigmoid(-log_odds) * w
        gc += dlo / om_c
        gr -= dlo / om_r
        tl.store(log_odds_ptr + offs, log_odds, mask=mask)

    # NaN/Inf in any input must reach the loss: the branches above (where, maximum) can swallow them.
    poison = (pc - pc) + (pr - pr) + (rc - rc) + (rr - rr)
    tl.store(losses_ptr + offs, loss + poison, mask=mask)
    tl.store(coefs_ptr + offs, gc * inv_num_pairs + poison, mask=mask)
    tl.store(coefs_ptr + num_pairs + offs, gr * inv_num_pairs + poison, mask=mask)
    tl.store(rewards_ptr + offs, cr, mask=mask)
    tl.store(rewards_ptr + num_pairs + offs, rj, mask=mask)
