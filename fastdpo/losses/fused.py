"""The head-loss machinery shared by the fused losses: head options, autocast, and one autograd Function.

A fused loss is ``loss(reduce(logp))`` where ``logp`` are the per-token log-probs of the valid tokens under
``lm_head``. The Function below runs the head's forward op (``fastdpo::linear_logprobs_fwd``, which
compacts the ignored rows itself), hands the log-probs to a family's *sequence loss* (DPO's pair losses in
``dpo.py``, KTO's in ``kto.py``), and in its backward scales the per-token coefficients ``d loss / d logp``
that the sequence loss returned by the incoming gradient and drives the head's backward op
(``fastdpo::linear_logprobs_bwd``). No per-token autograd graph exists. On the meta device (``fastdpo
plan``) the ops' fakes stand in for the head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from fastdpo.errors import finite_float
from fastdpo.losses.tokens import Tokens, gather_rows, reduce_tokens, scatter_rows
from fastdpo.metarun import autocast_dtype, autocast_off
from fastdpo.ops.linear_logprobs import (
    TokenStats,
    filter_threshold,
    linear_logprobs_bwd,
    linear_logprobs_fwd,
    resolve_backend,
    resolve_impl,
)


@dataclass(frozen=True)
class HeadOptions:
    """How the lm_head's logits are formed and which code computes them."""

    temperature: float = 1.0
    softcap: float | None = None
    filter_eps: float | str | None = None
    backend: str | None = None
    impl: str | None = None


def head_options(
    *,
    temperature: float,
    softcap: float | None,
    filter_eps: float | str | None,
    backend: str | None,
    impl: str | None = None,
) -> HeadOptions:
    """Validated ``HeadOptions``; raises ``ValueError`` / ``TypeError`` naming the bad argument."""
    finite_float("temperature", temperature)
    if softcap is not None:
        finite_float("softcap", softcap)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if impl not in (None, "fused", "chunked"):
        raise ValueError(f"impl must be None, 'fused' or 'chunked', got {impl!r}")
    filter_threshold(filter_eps, torch.float32)
    return HeadOptions(
        temperature=float(temperature),
        softcap=None if softcap is None else float(softcap),
        filter_eps=filter_eps,
        backend=backend,
        impl=impl,
    )


@dataclass
class LossParts:
    """What a family's sequence loss returns from the per-token log-probs.

    Attributes:
        loss: 0-dim fp32 loss.
        token_grad: ``[M]`` fp32 ``d loss / d logp`` of every valid token.
        outputs: detached tensors returned beside the loss (rewards, per-sequence values, ...).
    """

    loss: torch.Tensor
    token_grad: torch.Tensor
    outputs: tuple[torch.Tensor, ...]


# (per-token log-probs [M], their TokenStats or None) -> LossParts
SequenceLoss = Callable[[torch.Tensor, "TokenStats | None"], LossParts]


def detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


@dataclass(frozen=True)
class _Run:
    """One call's resolved head: backend, impl, the dtype the products run in, and the filter threshold."""

    head: HeadOptions
    backend: str
    impl: str
    compute_dtype: torch.dtype
    filter_eps: float

    @staticmethod
    def resolve(head: HeadOptions, hidden: torch.Tensor) -> _Run:
        # Under autocast the caller's tensors (e.g. fp32 masters) come in uncast: the head casts each chunk or
        # tile to the autocast dtype, sums in fp32 and returns gradients in the callers' dtypes, as TRL's
        # chunked head does; outside autocast everything runs in hidden's dtype.
        compute_dtype = autocast_dtype(hidden.device) or hidden.dtype
        backend = resolve_backend(hidden.device, head.backend)
        impl = resolve_impl(head.impl)
        fused = backend == "triton" and impl == "fused"
        eps = filter_threshold(head.filter_eps, compute_dtype) if fused else 0.0
        return _Run(head, backend, impl, compute_dtype, eps)

    def forward(self, hidden2d, weight, bias, tokens: Tokens, stats: bool = False):
        """``(logp [M], lse [N], stats [M] or None)`` of the valid tokens, through the registered head op."""
        logp, lse, extra, _ = linear_logprobs_fwd(
            hidden2d, weight, bias, tokens.labels, tokens.ignore_index, self.head.temperature,
            self.head.softcap, self.filter_eps, self.backend, self.impl, stats, self.compute_dtype,
        )  # fmt: skip
        token_stats = TokenStats(*(gather_rows(x, tokens) for x in extra)) if stats else None
        return gather_rows(logp, tokens), lse, token_stats

    def backward(self, grad_logp, hidden2d, weight, bias, tokens: Tokens, lse, needs):
        """``(dhidden [N, D], dweight, dbias)`` of ``sum(grad_logp * logp)``, None where not needed."""
        grad = scatter_rows(grad_logp, hidden2d, tokens)
        needs = [needs[0], needs[1], needs[2] and bias is not None]
        grads = linear_logprobs_bwd(
            grad, hidden2d, weight, bias, tokens.labels, lse, tokens.ignore_index, self.head.temperature,
            self.head.softcap, self.filter_eps, self.backend, self.impl, needs, self.compute_dtype,
        )  # fmt: skip
        return tuple(g if need else None for g, need in zip(grads[:3], needs, strict=True))


def scored_logps(
    hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: Tokens, head: HeadOptions
) -> torch.Tensor:
    """``[S]`` scored sequence log-probs (token-weighted sums), without autograd.

    Under autocast, hidden, weight and bias may be uncast: the products run in the autocast dtype.
    """
    run = _Run.resolve(head, hidden2d)
    with torch.no_grad():
        logp, _, _ = run.forward(hidden2d.detach(), weight.detach(), detach(bias), tokens)
    return reduce_tokens(logp, tokens)


class _FusedLinearPreferenceLossFunction(torch.autograd.Function):
    """Head forward on the valid tokens, then the sequence loss; the backward scales its token grads."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, tokens, run, stats, sequence_loss):
        logp, lse, token_stats = run.forward(hidden2d, weight, bias, tokens, stats)
        parts = sequence_loss(logp, token_stats)
        ctx.save_for_backward(hidden2d, weight, bias, lse, parts.token_grad)
        ctx.tokens = tokens
        ctx.run = run
        extra = (*parts.outputs, *(token_stats or ()))
        ctx.mark_non_differentiable(*extra)
        return (parts.loss, *extra)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused_grads):
        hidden2d, weight, bias, lse, token_grad = ctx.saved_tensors
        dh, dw, db = ctx.run.backward(
            token_grad * grad_loss.float(), hidden2d, weight, bias, ctx.tokens, lse, ctx.needs_input_grad[:3]
        )
        return dh, dw, db, None, None, None, None


def fused_head_loss(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: Tokens,
    head: HeadOptions,
    sequence_loss: SequenceLoss,
    *,
    stats: bool = False,
) -> tuple[Any, ...]:
    """``(loss, *outputs)`` of ``sequence_loss`` on the head's log-probs of ``tokens``; one autograd node.

    The loss is differentiable with respect to ``tokens.hidden2d``, ``weight`` and ``bias``, whose
    gradients come back in their own dtypes. Under autocast pass them uncast: the head casts inside. With
    ``stats=True`` the valid tokens' ``TokenStats`` (from the same pass) follow the outputs, and the
    sequence loss receives them too.
    """
    hidden2d = tokens.hidden2d
    run = _Run.resolve(head, hidden2d)
    # The sequence loss's fp32 math must not be autocast; the head disables autocast itself.
    with autocast_off(hidden2d.device):
        out = _FusedLinearPreferenceLossFunction.apply(
            hidden2d, weight, bias, tokens, run, stats, sequence_loss
        )
    if not stats:
        return out
    return (*out[:-4], TokenStats(*out[-4:]))
