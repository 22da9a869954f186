"""The head's entry points on compacted tokens: forward and backward for every backend x impl.

Dimension letters: M valid (non-ignored) tokens, D hidden, V vocab. The public op
(:mod:`fastdpo.ops.linear_logprobs`), the tensor-parallel head (:mod:`fastdpo.ops.vocab_parallel`) and the
fused losses all call these two functions; the losses drive the backward themselves.

=============  ===========================================  ==========================================
backend        ``impl="fused"``                             ``impl="chunked"``
=============  ===========================================  ==========================================
``"triton"``   fused kernels: logits tiles never leave the  ``torch.mm`` into one buffer, Triton folds
               chip; backward adds into fp32 with atomics   (:mod:`fastdpo.ops._head_chunked`)
``"torch"``    the chunked code with torch folds (the torch backend has no fused kernels)
=============  ===========================================  ==========================================
"""

from __future__ import annotations

import torch

from fastdpo.metarun import autocast_off
from fastdpo.ops._head_chunked import chunk_shape, chunked_backward, chunked_forward, dz_scale
from fastdpo.ops._head_common import Partials, TokenStats, combine_partials

__all__ = [
    "backward_workspace_bytes",
    "forward_workspace_bytes",
    "logprobs_backward",
    "logprobs_forward",
    "logprobs_partials",
]


def logprobs_partials(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "torch",
    impl: str = "fused",
    stats: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> Partials:
    """The sums behind :func:`logprobs_forward`, one ``Partials`` part per vocab split (``[S, M]`` each).

    :func:`~fastdpo.ops._head_common.combine_partials` turns them into ``(logp, lse, stats)``; the
    tensor-parallel head gathers them from every rank first.
    """
    compute_dtype = compute_dtype or hidden.dtype
    if hidden.shape[0] == 0:
        empty = torch.zeros(1, 0, device=hidden.device, dtype=torch.float32)
        return Partials(*([empty] * (7 if stats else 2)))
    targets = targets.contiguous()
    # The casts are explicit; an ambient autocast must not recast the fp32 accumulations.
    with autocast_off(hidden.device):
        if backend == "triton" and impl == "fused":
            from fastdpo.ops import _head_triton

            return _head_triton.fused_forward(
                hidden, weight, bias.contiguous() if bias is not None else None, targets,
                temperature=temperature, softcap=softcap, stats=stats, compute_dtype=compute_dtype,
            )  # fmt: skip
        return chunked_forward(
            hidden, weight, bias, targets, temperature=temperature, softcap=softcap, backend=backend,
            stats=stats, compute_dtype=compute_dtype,
        )  # fmt: skip


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "torch",
    impl: str = "fused",
    stats: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, TokenStats]:
    """Returns ``(logp, lse)``, each fp32 ``[M]``, for ``M`` tokens whose targets are valid or -1.

    Equals, in plain PyTorch (no autograd: pair it with :func:`logprobs_backward`)::

        z = cap(hidden.to(cd) @ weight.to(cd).T + bias.to(cd)).float() / temperature
        logp, lse = z.log_softmax(-1)[targets], z.logsumexp(-1)

    with ``cd = compute_dtype`` (default hidden's dtype): hidden, weight and bias may come in their own
    dtypes (e.g. fp32 masters under autocast) and are cast chunk by chunk or tile by tile; sums run in
    fp32. A target of -1 picks no logit (``logp = -lse``; the tensor-parallel head uses it for targets
    outside its shard). With ``stats=True`` it returns ``(logp, lse, TokenStats)``; without, the kernels
    compile without the statistics' code and it costs nothing.
    """
    parts = logprobs_partials(
        hidden, weight, bias, targets, temperature=temperature, softcap=softcap, backend=backend, impl=impl,
        stats=stats, compute_dtype=compute_dtype,
    )  # fmt: skip
    logp, lse, token_stats = combine_partials(parts, weight.shape[0])
    return (logp, lse, token_stats) if stats else (logp, lse)


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
    impl: str = "fused",
    needs_input_grad: tuple[bool, bool, bool] = (True, True, True),
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``(dhidden, dweight, dbias)`` of ``sum(grad_logp * logp)``, in the dtypes of those passed.

    Gradients are accumulated in fp32 and cast once at the end, so fp32 master tensors get fp32
    gradients whatever ``compute_dtype`` the products ran in. ``filter_eps > 0`` (triton backend, fused
    impl) skips vocab tiles whose probabilities all fall below it. Gradients that are not needed come back
    as None.
    """
    compute_dtype = compute_dtype or hidden.dtype
    needs = (needs_input_grad[0], needs_input_grad[1], needs_input_grad[2] and bias is not None)
    grad_logp = grad_logp.float().contiguous()
    scale = dz_scale(grad_logp, temperature, compute_dtype)
    if hidden.shape[0] == 0:
        dh, dw, db = (
            torch.zeros(0, hidden.shape[1], device=hidden.device, dtype=torch.float32),
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32),
            torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32),
        )
    elif backend == "triton" and impl == "fused":
        from fastdpo.ops import _head_triton

        with autocast_off(hidden.device):
            dh, dw, db = _head_triton.fused_backward(
                grad_logp, hidden, weight, bias.contiguous() if bias is not None else None,
                targets.contiguous(), lse.contiguous(), temperature=temperature, softcap=softcap,
                eps=filter_eps, needs=needs, compute_dtype=compute_dtype, scale=scale,
            )  # fmt: skip
    else:
        with autocast_off(hidden.device):
            dh, dw, db = chunked_backward(
                grad_logp, hidden, weight, bias, targets.contiguous(), lse.contiguous(),
                temperature=temperature, softcap=softcap, backend=backend, needs=needs,
                compute_dtype=compute_dtype, scale=scale,
            )  # fmt: skip
    if scale != 1.0:
        # A power of two: dividing it out of the fp32 accumulators is exact.
        for acc in (dh, dw, db):
            if acc is not None:
                acc /= scale
    return (
        dh.to(hidden.dtype) if needs[0] else None,
        dw.to(weight.dtype) if needs[1] else None,
        db.to(bias.dtype) if needs[2] else None,
    )


def _head_chunk(m: int, v: int, d: int, hidden_dtype, weight_dtype, compute_dtype, backend: str) -> int:
    """Bytes one chunk of the chunked impl holds: the logits buffer, the chunk's casts, the torch fold's
    fp32 copy of the tile (``_head_chunked``)."""
    cm, cv = chunk_shape(m, v, torch.device("meta"))
    size = compute_dtype.itemsize
    total = cm * cv * size
    total += cm * d * size if hidden_dtype != compute_dtype else 0
    total += cv * d * size if weight_dtype != compute_dtype else 0
    return total + (cm * cv * 4 if backend == "torch" else 0)


def forward_workspace_bytes(m, n, d, v, hidden_dtype, weight_dtype, compute_dtype, *, backend, impl, stats):
    """The bytes :func:`logprobs_forward` and the op's compaction hold beside the op's ``[N]`` outputs.

    ``m`` valid of ``n`` rows: the compacted hidden copy (none when every row is valid), then the fused
    kernel's fp32 partials (one vocab split, as on meta: the split count follows the SM count and adds
    O(M) fp32 per split) or the chunked impl's running state and one chunk.
    """
    k = 7 if stats else 2
    total = m * d * hidden_dtype.itemsize if m < n else 0
    if m == 0:
        return total
    if backend == "triton" and impl == "fused":
        return total + k * m * 4
    return total + k * m * 4 + _head_chunk(m, v, d, hidden_dtype, weight_dtype, compute_dtype, backend)


def backward_workspace_bytes(m, n, d, v, hidden_dtype, weight_dtype, compute_dtype, *, backend, impl, needs):
    """The bytes :func:`logprobs_backward` and the op's compaction hold at their peak, less the op's outputs
    (a tracker sees those anyway), for ``m`` valid of ``n`` rows and a bias in weight's dtype.

    Three moments: while the chunks run (the compacted rows, grad and lse, the fp32 accumulators, one
    chunk); while the accumulators are cast to the inputs' dtypes; and while the compacted ``dH`` is
    scattered into the ``[N, D]`` output (the accumulators are gone by then).
    """
    compact = m < n
    need_dh, need_dw, need_db = needs
    hs, ws = hidden_dtype.itemsize, weight_dtype.itemsize
    rows = m * d * hs + 2 * m * 4 if compact else 0
    acc = (m * d * 4 if need_dh else 0) + (v * d * 4 if need_dw else 0) + (v * 4 if need_db else 0)
    cast = m * d * hs if need_dh and hidden_dtype != torch.float32 else 0  # fp32 gradients are not copied
    if weight_dtype != torch.float32:
        cast += (v * d * ws if need_dw else 0) + (v * ws if need_db else 0)
    chunk = 0
    if m and not (backend == "triton" and impl == "fused"):
        chunk = _head_chunk(m, v, d, hidden_dtype, weight_dtype, compute_dtype, backend)
    outputs = (n * d * hs if need_dh else 0) + (v * d * ws if need_dw else 0) + (v * ws if need_db else 0)
    scatter = outputs + (m * d * hs if need_dh and compact else 0)
    return max(0, max(rows + acc + chunk, rows + acc + cast, scatter) - outputs)
