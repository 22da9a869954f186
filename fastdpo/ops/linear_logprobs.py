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

from fastdpo.metarun import autocast_dtype, host_values, planning_for
from fastdpo.ops._head import (
    backward_workspace_bytes,
    forward_workspace_bytes,
    logprobs_backward,
    logprobs_forward,
)
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
    "linear_logprobs_bwd",
    "linear_logprobs_fwd",
    "logprobs_backward",
    "logprobs_forward",
    "resolve_backend",
    "resolve_impl",
]


# --------------------------------------------------------------------------------------------------
# The registered ops: fastdpo::linear_logprobs_fwd / linear_logprobs_bwd, their fakes and autograd
# --------------------------------------------------------------------------------------------------


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, bool]:
    # One host sync (on CUDA), inside the op: nonzero sizes the compacted rows, so the op's outputs keep
    # the static shape [N] and torch.compile sees no data-dependent shape.
    rows = (targets != ignore_index).nonzero()[:, 0]
    return rows, rows.numel() != targets.shape[0]


def _rows_out(values: torch.Tensor, rows: torch.Tensor, n: int, compact: bool) -> torch.Tensor:
    """``[N]`` values of every row, zeros at ignored ones; a fresh tensor (an op's output is no view)."""
    if compact:
        return torch.zeros(n, device=values.device, dtype=values.dtype).index_copy_(0, rows, values)
    return values.clone() if values._base is not None else values


@torch.library.custom_op("fastdpo::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    filter_eps: float,
    backend: str,
    impl: str,
    stats: bool,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``z.log_softmax(-1)[targets]`` and ``z.logsumexp(-1)``, ``z = cap(hidden @ weight.T + bias) / T``.

    Each output is ``[N]`` with 0 at ignored rows: the log-probs, the log-sum-exp, the four
    :class:`TokenStats` (``[]`` without ``stats``), and an empty workspace (see the fake). ``filter_eps`` is
    the backward's (see :func:`linear_logprobs`), an argument here for the autograd.

    A custom op, not a ``triton_op``: beside its launches it compacts rows by data, runs ``torch.mm`` and
    picks launch configs by compiling (``ctas_per_sm``) or timing, none of which a trace can follow.
    """
    n = targets.shape[0]
    rows, compact = _valid_rows(targets, ignore_index)
    h = hidden.index_select(0, rows) if compact else hidden
    tgt = (targets.index_select(0, rows) if compact else targets).long()
    result = logprobs_forward(
        h, weight, bias, tgt, temperature=temperature, softcap=softcap, backend=backend, impl=impl,
        stats=stats, compute_dtype=compute_dtype,
    )  # fmt: skip
    extra = [_rows_out(x, rows, n, compact) for x in result[2]] if stats else []
    logp, lse = (_rows_out(x, rows, n, compact) for x in result[:2])
    return logp, lse, extra, hidden.new_empty(0, dtype=torch.uint8)


def _planned_rows(targets: torch.Tensor, ignore_index: int) -> int:
    """Valid rows on a planning run: as the targets' remembered values say, else all (an upper bound)."""
    values = host_values(targets)
    return targets.shape[0] if values is None else int((values != ignore_index).sum())


def _workspace(like: torch.Tensor, nbytes) -> torch.Tensor:  # noqa: ANN001
    # The real op's temporaries, as one output the public wrappers drop: a live-bytes tracker sees only an
    # op's outputs. Only a plan for CUDA adds them; the real CPU op returns none, and a CPU plan must
    # equal the CPU step a tracker measures.
    return like.new_empty(nbytes if planning_for() == "cuda" else 0, dtype=torch.uint8)


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, targets, ignore_index, temperature, softcap, filter_eps, backend, impl, stats,
      compute_dtype):  # noqa: ANN001, ANN202  # fmt: skip
    n, (v, d) = targets.shape[0], weight.shape
    rows = hidden.new_empty(n, dtype=torch.float32)
    extra = []
    if stats:
        argmax = torch.empty_like(rows, dtype=torch.bool)
        extra = [torch.empty_like(rows), torch.empty_like(rows), argmax, torch.empty_like(rows)]
    nbytes = 0
    if planning_for() == "cuda":
        m = _planned_rows(targets, ignore_index)
        nbytes = forward_workspace_bytes(
            m, n, d, v, hidden.dtype, weight.dtype, compute_dtype, backend=backend, impl=impl, stats=stats
        )
    return rows, torch.empty_like(rows), extra, _workspace(hidden, nbytes)


@torch.library.custom_op("fastdpo::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    filter_eps: float,
    backend: str,
    impl: str,
    needs: list[bool],
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.autograd.grad((grad * logp).sum(), (hidden, weight, bias))`` of the forward's ``logp``.

    Returns ``(dhidden [N, D], dweight, dbias, workspace)`` in the inputs' dtypes, an empty tensor for each
    gradient not in ``needs``; ``lse`` is the forward's ``[N]`` output.

    The valid rows are recomputed from the targets, so the forward saves nothing ``[M]``-shaped.
    """
    rows, compact = _valid_rows(targets, ignore_index)
    pick = (lambda t: t.index_select(0, rows)) if compact else (lambda t: t)
    dh, dw, db = logprobs_backward(
        pick(grad), pick(hidden), weight, bias, pick(targets).long(), pick(lse), temperature=temperature,
        softcap=softcap, filter_eps=filter_eps, backend=backend, impl=impl, needs_input_grad=tuple(needs),
        compute_dtype=compute_dtype,
    )  # fmt: skip
    if dh is not None and compact:
        dh = torch.zeros_like(hidden).index_copy_(0, rows, dh)
    # Outputs may not alias each other: a fresh empty tensor for each gradient not needed.
    return (
        hidden.new_empty(0) if dh is None else dh,
        hidden.new_empty(0) if dw is None else dw,
        hidden.new_empty(0) if db is None else db,
        hidden.new_empty(0, dtype=torch.uint8),
    )


@linear_logprobs_bwd.register_fake
def _(grad, hidden, weight, bias, targets, lse, ignore_index, temperature, softcap, filter_eps, backend,
      impl, needs, compute_dtype):  # noqa: ANN001, ANN202  # fmt: skip
    n, (v, d) = targets.shape[0], weight.shape
    need_db = needs[2] and bias is not None
    nbytes = 0
    if planning_for() == "cuda":
        m = _planned_rows(targets, ignore_index)
        nbytes = backward_workspace_bytes(
            m, n, d, v, hidden.dtype, weight.dtype, compute_dtype, backend=backend, impl=impl,
            needs=(needs[0], needs[1], need_db),
        )  # fmt: skip
    return (
        torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
        torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
        torch.empty_like(bias) if need_db else hidden.new_empty(0),
        _workspace(hidden, nbytes),
    )


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    hidden, weight, bias, targets, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    del options[6]  # stats: no gradient flows through the statistics
    ctx.options = tuple(options)


def _backward(ctx, grad_logp, grad_lse, grad_stats, grad_workspace):  # noqa: ANN001, ANN202
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    ignore_index, temperature, softcap, filter_eps, backend, impl, compute_dtype = ctx.options
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and bias is not None]
    dh, dw, db, _ = linear_logprobs_bwd(
        grad_logp.contiguous(), hidden, weight, bias, targets, lse, ignore_index, temperature, softcap,
        filter_eps, backend, impl, needs, compute_dtype,
    )  # fmt: skip
    return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, *[None] * 9)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    if torch.compiler.is_compiling():
        # Under torch.compile the range check stays on the device (no host sync, no data-dependent shape).
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        torch._assert_async(~bad.any(), "a target is outside [0, V) and is not ignore_index")
        return
    # Eager: one host sync, for an error that names the bad target.
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
    logp, _, extra, _ = linear_logprobs_fwd(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1).long(), int(ignore_index),
        float(temperature), cap, eps, chosen, chosen_impl, bool(stats), compute_dtype,
    )  # fmt: skip
    if not stats:
        return logp.reshape(targets.shape)
    return LogprobsWithStats(*(x.reshape(targets.shape) for x in (logp, *extra)))
