"""Triton kernel of the fused KTO loss: per-sequence losses, rewards and d loss / d logp in one launch.

TRL 1.16's ``KTOTrainer`` writes, with ``r = policy_logp - ref_logp`` and ``z = beta * (r - kl)``:
desirable ``1 - sigmoid(z)``, undesirable ``1 - sigmoid(-z)``; ``apo_zero_unpaired`` is the same with
``kl = 0``. Both are ``sigmoid(x)`` with ``x = -z`` (desirable) or ``x = z`` (undesirable), which the kernel
evaluates directly: ``sigmoid(x)`` keeps the digits that ``1 - sigmoid(-x)`` loses near 0.
"""

import triton
import triton.language as tl


@triton.jit
def _kto_loss_fwd_kernel(
    policy_logps_ptr,
    ref_logps_ptr,
    desirable_ptr,
    kl_ptr,
    losses_ptr,
    coefs_ptr,
    rewards_ptr,
    num_seqs,
    inv_num_seqs,
    beta,
    desirable_weight,
    undesirable_weight,
    HAS_REFERENCE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Per sequence s: losses[s] = w_s * sigmoid(x_s); coefs[s] = d mean_s(losses) / d policy_logps[s].

    rewards[s] = beta * (policy_logps[s] - ref_logps[s]); kl is one fp32 value (0 for apo_zero_unpaired).
    """
    # Default config: BLOCK_SIZE = min(1024, next_power_of_2(S)), num_warps=4 -- one program covers a whole
    # batch in practice; the work is a few dozen flops per sequence.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < num_seqs

    p = tl.load(policy_logps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_REFERENCE:
        r = tl.load(ref_logps_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        r = tl.zeros_like(p)
    desirable = tl.load(desirable_ptr + offs, mask=mask, other=0) != 0
    kl = tl.load(kl_ptr).to(tl.float32)

    logratio = p - r
    z = beta * (logratio - kl)
    x = tl.where(desirable, -z, z)
    w = tl.where(desirable, desirable_weight, undesirable_weight)
    sig = tl.sigmoid(x)
    # d x / d p is -beta for a desirable sequence and +beta for an undesirable one.
    dx = tl.where(desirable, -beta, beta)
    grad = w * sig * (1.0 - sig) * dx

    # NaN/Inf in any input must reach the loss: sigmoid saturates to a finite value on Inf.
    poison = (p - p) + (r - r) + (kl - kl)
    tl.store(losses_ptr + offs, w * sig + poison, mask=mask)
    tl.store(coefs_ptr + offs, grad * inv_num_seqs + poison, mask=mask)
    tl.store(rewards_ptr + offs, beta * logratio, mask=mask)
