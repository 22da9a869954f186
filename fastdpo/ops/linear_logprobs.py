"""The public fused head: ``linear_logprobs`` and its autograd node.

Dimension letters: N tokens, M valid (non-ignored) tokens, D hidden, V vocab.

The op drops ignored tokens, then runs one of four code paths on the rest (see :mod:`fastdpo.ops._head`):
``backend="triton" | "torch"`` x ``impl="fused" | "chunked"``. Everything below the public function lives
in ``_head*`` modules, which the tensor-parallel head (:mod:`fastdpo.ops.vocab_parallel`) imports too; this
module imports that one only when ``group=`` is given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fastdpo.metarun import autocast_dtype
from fastdpo.ops._head import logprobs_backward, logprobs_forward
from fastdpo.ops._head_common import (
    IGNORE_INDEX,
    LogprobsWithStats,
    TokenStats,
    filter_threshold,
    resolve_backend,
    resolve_impl,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = [
    "IGNORE_INDEX",
    "LogprobsWithStats",
    "TokenStats",
    "filter_threshold",
    "linear_logprobs",
    "logprobs_backward",
    "logprobs_forward",
    "resolve_backend",
    "resolve_impl",
]


# --------------------------------------------------------------------------------------------------
# Autograd and the public op
# --------------------------------------------------------------------------------------------------


def _scatter_rows(values: torch.Tensor, valid_rows: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.zeros(n, device=values.device, dtype=values.dtype)
    return out.index_copy_(0, valid_rows, values)


class LinearLogprobsFunction(torch.autograd.Function):
    """Autograd node for :func:`linear_logprobs`; saves only hidden's valid-row indices and the lse.

    Returns the log-probs, followed by the four statistics when requested (no gradient).
    """

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets1d, ignore_index, opts):
        temperature, softcap, filter_eps, backend, impl, stats, compute_dtype = opts
        valid_rows = (targets1d != ignore_index).nonzero()[:, 0]
        compact = valid_rows.numel() != targets1d.numel()
        h = hidden2d.index_select(0, valid_rows) if compact else hidden2d
        tgt = targets1d.index_select(0, valid_rows) if compact else targets1d.contiguous()
        result = logprobs_forward(
            h, weight, bias, tgt, temperature=temperature, softcap=softcap, backend=backend, impl=impl,
            stats=stats, compute_dtype=compute_dtype,
        )  # fmt: skip
        n = targets1d.shape[0]
        ctx.save_for_backward(hidden2d, weight, bias, tgt, result[1], valid_rows)
        ctx.compact = compact
        ctx.opts = opts
        out = _scatter_rows(result[0], valid_rows, n)
        if not stats:
            return out
        extra = tuple(_scatter_rows(x, valid_rows, n) for x in result[2])
        ctx.mark_non_differentiable(*extra)
        return (out, *extra)

    @staticmethod
    def backward(ctx, grad_out, *_):
        hidden2d, weight, bias, tgt, lse, valid_rows = ctx.saved_tensors
        temperature, softcap, filter_eps, backend, impl, _, compute_dtype = ctx.opts
        h = hidden2d.index_select(0, valid_rows) if ctx.compact else hidden2d
        dh, dw, db = logprobs_backward(
            grad_out.index_select(0, valid_rows), h, weight, bias, tgt, lse,
            temperature=temperature, softcap=softcap, filter_eps=filter_eps, backend=backend, impl=impl,
            needs_input_grad=ctx.needs_input_grad[:3], compute_dtype=compute_dtype,
        )  # fmt: skip
        if dh is not None and ctx.compact:
            dh = torch.zeros_like(hidden2d).index_copy_(0, valid_rows, dh)
        return dh, dw, db, None, None, None


def _validate(hidden, weight, targets, bias, ignore_index, temperature, softcap, amp_dtype):
    if not all(isinstance(x, torch.Tensor) for x in (hidden, weight, targets)):
        raise TypeError("hidden, weight and targets must be torch.Tensors")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if weight.dtype != hidden.dtype and amp_dtype is None:
        raise TypeError(
            f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}; cast one of them or run "
            "under torch.autocast (both are then cast to its dtype inside)"
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
        if bias.dtype != hidden.dtype and (amp_dtype is None or bias.dtype not in _FLOAT_DTYPES):
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
    impl: str | None = None,
    stats: bool = False,
    group: ProcessGroup | None = None,
) -> torch.Tensor | LogprobsWithStats:
    """Per-token log-probs of the targets, without materializing the ``[..., V]`` logits.

    Equals, in plain PyTorch::

        z = hidden @ weight.T + bias
        z = softcap * torch.tanh(z / softcap)          # if softcap
        logp = (z / temperature).float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        logp[targets == ignore_index] = 0.0

    Under ``torch.autocast``, hidden, weight and bias enter in their own dtypes and are cast to the
    autocast dtype inside, chunk by chunk or tile by tile; products are summed in fp32 and the gradients
    come back in the dtypes passed (fp32 masters get fp32 gradients), as TRL 1.16's chunked head does.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16.
        weight: ``[V, D]``, same dtype (any float dtype under autocast) and device as hidden.
        targets: ``[...]`` integer token ids, hidden's leading shape; ``ignore_index`` marks no-loss tokens.
        bias: optional ``[V]``.
        ignore_index: target value that yields exactly 0.0 and no gradient.
        temperature: divides the (soft-capped) logits.
        softcap: Gemma-2 final-logit soft-capping value, or None.
        filter_eps: backward gradient filtering (triton backend, fused impl): vocab tiles whose softmax
            probabilities are all below this threshold and hold no target are skipped. ``"auto"`` is
            ``finfo(dtype).eps / 32``; None turns filtering off.
        backend: ``"triton"`` or ``"torch"``; default ``FASTDPO_BACKEND``, else triton on CUDA, torch
            elsewhere.
        impl: ``"fused"`` (logits tiles never leave the chip) or ``"chunked"`` (``torch.mm`` into one
            reusable buffer plus Triton folds; bitwise reproducible); default: see ``resolve_impl``
            (chunked under ``torch.use_deterministic_algorithms(True)``, else ``FASTDPO_IMPL``, else the
            cost model's choice). The torch backend runs the chunked code for both.
        stats: also return the per-token entropy, mean logit, whether the target is the argmax and
            ``log sum p^2`` (see :class:`TokenStats`), from the same pass; no gradient flows through them.
        group: a process group over which the vocabulary is sharded (tensor parallelism): ``weight`` and
            ``bias`` are then this rank's rows, placed in group-rank order; see
            ``fastdpo.ops.vocab_parallel.vocab_parallel_linear_logprobs``. None for a whole head.

    Returns:
        fp32 ``[...]`` log-probs, or with ``stats=True`` a :class:`LogprobsWithStats` of ``[...]`` tensors.
        Gradients flow to hidden, weight and bias in their own dtypes.
    """
    if group is not None:
        from fastdpo.ops.vocab_parallel import vocab_parallel_linear_logprobs

        return vocab_parallel_linear_logprobs(
            hidden, weight, targets, bias, group=group, ignore_index=ignore_index, temperature=temperature,
            softcap=softcap, filter_eps=filter_eps, backend=backend, impl=impl, stats=stats,
        )  # fmt: skip
    amp_dtype = autocast_dtype(hidden.device) if isinstance(hidden, torch.Tensor) else None
    _validate(hidden, weight, targets, bias, ignore_index, temperature, softcap, amp_dtype)
    chosen = resolve_backend(hidden.device, backend)
    chosen_impl = resolve_impl(impl)
    compute_dtype = amp_dtype or hidden.dtype
    fused = chosen == "triton" and chosen_impl == "fused"
    eps = filter_threshold(filter_eps, compute_dtype)  # validated on every path, used by the fused one
    eps = eps if fused else 0.0
    cap = None if softcap is None else float(softcap)
    opts = (float(temperature), cap, eps, chosen, chosen_impl, bool(stats), compute_dtype)
    out = LinearLogprobsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).long(), ignore_index, opts
    )
    if not stats:
        return out.reshape(targets.shape)
    return LogprobsWithStats(*(x.reshape(targets.shape) for x in out))
