"""Vocab-parallel fused head: target log-probs when the lm_head rows are sharded over a process group.

Dimension letters: N tokens, M valid (non-ignored) tokens, D hidden, V vocab, ``V_r`` rows held by rank r.

Megatron-style tensor parallelism splits the lm_head weight ``[V, D]`` by rows: rank r holds rows
``[offset_r, offset_r + V_r)`` and every rank holds the same hidden states and targets. Each rank runs the
head's kernels (:mod:`fastdpo.ops._head`) on its own rows only, so no rank ever sees more than
``[M, V_r]`` logits, and the ranks exchange O(M) numbers per token to make the result exact:

* forward: each rank computes its shard's log-sum-exp ``lse_r`` and its share of the target logit (the
  logit itself when the target row lies in the shard, else 0: the kernels pick up no target for a local
  target of -1). One all-reduce MAX of ``lse_r`` and one all-reduce SUM of ``exp(lse_r - max)`` and of the
  target shares give the global ``lse`` and ``logp = target_logit - lse``. With ``stats=True`` the ranks
  also all-gather their shards' seven partial sums per token (``_head_common.Partials``), which fold into
  the whole vocabulary's statistics exactly as vocab splits do on one GPU.
* backward: with the global ``lse`` each rank's kernels give the exact gradient of its own weight rows and
  bias entries, and a partial hidden gradient (its rows' share of ``dlogits @ W``); one all-reduce SUM
  over the group completes the hidden gradient. That is the all-reduce Megatron runs in the backward of a
  column-parallel layer's input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastdpo.ops._head import logprobs_backward, logprobs_partials
from fastdpo.ops._head_common import (
    IGNORE_INDEX,
    LogprobsWithStats,
    Partials,
    TokenStats,
    combine_partials,
    filter_threshold,
    merge_partials,
    resolve_backend,
    resolve_impl,
)

__all__ = ["vocab_parallel_linear_logprobs"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Per-rank layout facts exchanged in one all-gather: shard rows, offset (-1: derive), tokens, hidden size,
# valid targets, a checksum of the targets, and whether the local checks passed.
_ROWS, _OFFSET, _TOKENS, _HIDDEN, _VALID, _CHECKSUM, _OK = range(7)


@dataclass(frozen=True)
class _Layout:
    """Where this rank's rows sit in the global vocabulary, and every group rank's ``(offset, rows)``."""

    offset: int
    rows: int
    vocab_size: int
    shards: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Opts:
    group: dist.ProcessGroup | None
    ignore_index: int
    temperature: float
    softcap: float | None
    filter_eps: float
    backend: str
    impl: str
    stats: bool


def _local_problem(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    softcap: float | None,
) -> str | None:
    """Returns what is wrong with this rank's inputs, or None; every rank reports before anyone raises."""
    if hidden.dim() < 2:
        return f"hidden must be [..., D] with at least 2 dims, got shape {tuple(hidden.shape)}"
    if weight.dim() != 2 or weight.shape[0] == 0:
        return f"weight_shard must be a non-empty [V_r, D], got shape {tuple(weight.shape)}"
    if weight.shape[1] != hidden.shape[-1]:
        return f"hidden has D={hidden.shape[-1]} but weight_shard is [V_r, D]={list(weight.shape)}"
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        return (
            f"targets shape {tuple(targets.shape)} must be {tuple(hidden.shape)[:-1]}, hidden's leading shape"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return f"bias_shard must be [V_r]=[{weight.shape[0]}], got {tuple(bias.shape)}"
    devices = {hidden.device, weight.device, targets.device} | ({bias.device} if bias is not None else set())
    if len(devices) > 1:
        return f"all inputs must be on one device, got {sorted(str(d) for d in devices)}"
    if not temperature > 0:
        return f"temperature must be > 0, got {temperature}"
    if softcap is not None and not softcap > 0:
        return f"softcap must be None or > 0, got {softcap}"
    return None


def _check_types(hidden: object, weight: object, targets: object, bias: object) -> None:
    if not all(isinstance(x, torch.Tensor) for x in (hidden, weight, targets)):
        raise TypeError("hidden, weight_shard and targets must be torch.Tensors")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias_shard must be a torch.Tensor or None, got {type(bias).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    for name, t in (("weight_shard", weight), ("bias_shard", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from hidden dtype {hidden.dtype}; cast either")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor (int64 token ids), got {targets.dtype}")


def _targets_checksum(valid_targets: torch.Tensor) -> int:
    """An order-sensitive int64 fingerprint of the targets, equal on ranks that hold the same batch."""
    if valid_targets.numel() == 0:
        return 0
    weights = torch.arange(valid_targets.numel(), device=valid_targets.device) % 65521 + 1
    return int((valid_targets * weights).sum())


def _exchange_layout(
    group: dist.ProcessGroup | None,
    weight: torch.Tensor,
    vocab_offset: int | None,
    num_tokens: int,
    valid_targets: torch.Tensor,
    problem: str | None,
) -> _Layout:
    """All-gathers each rank's shard facts once, checks that they agree, and places this rank's rows."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local_ok = problem is None
    facts = [
        weight.shape[0] if weight.dim() == 2 else 0,
        -1 if vocab_offset is None else vocab_offset,
        num_tokens,
        weight.shape[-1] if weight.dim() >= 1 else 0,
        valid_targets.numel(),
        _targets_checksum(valid_targets) if local_ok else 0,
        int(local_ok),
    ]
    mine = torch.tensor(facts, dtype=torch.int64, device=weight.device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()

    bad = [r for r in range(world) if not table[r][_OK]]
    if bad:
        detail = problem if problem is not None else "see the failing ranks' errors"
        raise ValueError(f"vocab-parallel inputs rejected on group rank(s) {bad}: {detail}")
    for field, what in ((_TOKENS, "token count N"), (_HIDDEN, "hidden size D"), (_VALID, "valid targets")):
        values = [row[field] for row in table]
        if len(set(values)) > 1:
            raise ValueError(
                f"every rank of the group must hold the same hidden states and targets; {what} per rank is "
                f"{values}"
            )
    if len({row[_CHECKSUM] for row in table}) > 1:
        raise ValueError("every rank of the group must hold the same targets; they differ between ranks")
    offsets = [row[_OFFSET] for row in table]
    rows = [row[_ROWS] for row in table]
    given = [o >= 0 for o in offsets]
    if any(given) and not all(given):
        raise ValueError(f"vocab_offset must be given on every rank or on none; per rank: {offsets}")
    if not any(given):
        offsets = [sum(rows[:r]) for r in range(world)]
    vocab_size = sum(rows)
    expected = 0
    for r in sorted(range(world), key=lambda r: offsets[r]):
        if offsets[r] != expected:
            raise ValueError(
                f"vocab shards must tile [0, V) without gaps or overlaps; (offset, rows) per rank: "
                f"{list(zip(offsets, rows, strict=True))}"
            )
        expected += rows[r]
    shards = tuple(zip(offsets, rows, strict=True))
    return _Layout(offset=offsets[rank], rows=rows[rank], vocab_size=vocab_size, shards=shards)


class _VocabParallelLogprobs(torch.autograd.Function):
    """Autograd node of :func:`vocab_parallel_linear_logprobs`; saves valid-row indices and the global lse.

    Returns the log-probs, followed by the four statistics when requested (no gradient).
    """

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets1d, layout: _Layout, opts: _Opts):
        valid_rows = (targets1d != opts.ignore_index).nonzero()[:, 0]
        compact = valid_rows.numel() != targets1d.numel()
        h = hidden2d.index_select(0, valid_rows) if compact else hidden2d
        global_targets = targets1d.index_select(0, valid_rows)
        local = global_targets - layout.offset
        local = torch.where((local >= 0) & (local < layout.rows), local, -1)
        # This shard's sums; a local target of -1 picks no logit, so the target share is 0 off the shard.
        parts = logprobs_partials(
            h, weight, bias, local, temperature=opts.temperature, softcap=opts.softcap,
            backend=opts.backend, impl=opts.impl, stats=opts.stats,
        )  # fmt: skip
        mine = merge_partials(parts)
        lse, target_logit = mine.lse[0], mine.target[0]
        token_stats = None
        if valid_rows.numel():
            lse_max = lse.clone()
            dist.all_reduce(lse_max, op=dist.ReduceOp.MAX, group=opts.group)
            sums = torch.stack([torch.exp(lse - lse_max), target_logit])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=opts.group)
            lse = lse_max + torch.log(sums[0])
            target_logit = sums[1]
            if opts.stats:
                token_stats = _gathered_stats(mine, global_targets, layout, opts.group)
        out = torch.zeros(targets1d.shape[0], device=hidden2d.device, dtype=torch.float32)
        out.index_copy_(0, valid_rows, target_logit - lse)
        ctx.save_for_backward(hidden2d, weight, bias, local, lse, valid_rows)
        ctx.compact = compact
        ctx.opts = opts
        if not opts.stats:
            return out
        if token_stats is None:
            token_stats = combine_partials(mine, layout.vocab_size)[2]  # no valid token: empty statistics
        extra = []
        for values in token_stats:
            full = torch.zeros(targets1d.shape[0], device=hidden2d.device, dtype=values.dtype)
            extra.append(full.index_copy_(0, valid_rows, values))
        ctx.mark_non_differentiable(*extra)
        return (out, *extra)

    @staticmethod
    def backward(ctx, grad_out, *_):
        hidden2d, weight, bias, local, lse, valid_rows = ctx.saved_tensors
        opts = ctx.opts
        h = hidden2d.index_select(0, valid_rows) if ctx.compact else hidden2d
        dh, dw, db = logprobs_backward(
            grad_out.index_select(0, valid_rows), h, weight, bias, local, lse,
            temperature=opts.temperature, softcap=opts.softcap, filter_eps=opts.filter_eps,
            backend=opts.backend, impl=opts.impl, needs_input_grad=ctx.needs_input_grad[:3],
        )  # fmt: skip
        if dh is not None:
            # This rank's rows give only their share of dlogits @ W; the sum over the group is the gradient.
            if valid_rows.numel():
                dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=opts.group)
            if ctx.compact:
                dh = torch.zeros_like(hidden2d).index_copy_(0, valid_rows, dh)
        return dh, dw, db, None, None, None


def _gathered_stats(
    mine: Partials, global_targets: torch.Tensor, layout: _Layout, group: dist.ProcessGroup | None
) -> TokenStats:
    """The whole vocabulary's statistics from every rank's one-part sums, gathered (7 numbers per token)."""
    world = dist.get_world_size(group)
    packed = torch.cat(list(mine)).contiguous()
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    parts = Partials(*torch.stack(gathered).unbind(1))
    # A shard wholly left of the target never saw the target (its local target was -1), so its largest
    # logit is the largest logit left of the target there.
    ends = torch.tensor([o + r for o, r in layout.shards], device=global_targets.device)
    left = ends[:, None] <= global_targets[None, :]
    parts = parts._replace(max_before=torch.where(left, parts.max_z, parts.max_before))
    return combine_partials(parts, layout.vocab_size)[2]


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    bias_shard: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None,
    vocab_offset: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
    filter_eps: float | str | None = "auto",
    backend: str | None = None,
    impl: str | None = None,
    stats: bool = False,
) -> torch.Tensor | LogprobsWithStats:
    """Equals ``linear_logprobs(hidden, W, targets, b)`` with ``W`` / ``b`` the shards stacked in row order.

    In plain PyTorch, with ``W = torch.cat(all_gather(weight_shard))`` in offset order::

        z = cap(hidden @ W.T + b) / temperature
        logp = z.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        logp[targets == ignore_index] = 0.0

    but no rank materializes more than its own ``[M, V_r]`` logits (and only tile by tile), and only
    ``O(M)`` values per rank cross the network in the forward and ``M x D`` in the backward. Every rank of
    ``group`` must call this with the same ``hidden`` values and ``targets`` (as under tensor parallelism),
    with ``hidden.requires_grad`` alike, and must take part in the backward.

    With a DTensor lm_head sharded ``Shard(0)`` over a 1-D tensor-parallel mesh (``parallelize_module``'s
    ``ColwiseParallel`` on the head), pass ``weight.to_local()`` (differentiable: the shard's gradient
    reaches the DTensor parameter), ``group=mesh.get_group()`` and leave ``vocab_offset=None``: shards are
    then placed in group-rank order, as ``Shard(0)`` places its contiguous chunks. For another placement,
    pass each rank's first row as ``vocab_offset``.

    Args:
        hidden: ``[..., D]`` float32, bfloat16 or float16, identical on every rank of the group.
        weight_shard: ``[V_r, D]`` this rank's rows of the lm_head weight, hidden's dtype and device.
        targets: ``[...]`` global token ids in ``[0, V)``, or ``ignore_index``; identical on every rank.
        bias_shard: optional ``[V_r]`` this rank's bias entries.
        group: the process group the vocabulary is sharded over (None: the default group).
        vocab_offset: this rank's first global row; None places the shards in group-rank order. Give it on
            every rank or on none.
        ignore_index: target value that yields exactly 0.0 and no gradient.
        temperature: divides the (soft-capped) logits.
        softcap: Gemma-2 final-logit soft-capping value, or None.
        filter_eps: backward gradient filtering of the triton backend, as in ``linear_logprobs``.
        backend: ``"triton"`` or ``"torch"``; default ``FASTDPO_BACKEND``, else triton on CUDA.
        impl: ``"fused"`` or ``"chunked"``, as in ``linear_logprobs``.
        stats: also return the whole vocabulary's per-token statistics (as ``linear_logprobs``): every rank
            gathers 7 numbers per valid token from every other rank.

    Returns:
        fp32 ``[...]`` log-probs, the same on every rank, or with ``stats=True`` a ``LogprobsWithStats``.
        Gradients reach hidden (complete, all-reduced over the group), and this rank's weight and bias
        shards, in their own dtypes.

    Raises:
        TypeError: a non-tensor input or mismatched dtypes (raised locally).
        ValueError: raised on every rank of the group alike when any rank's shapes or devices are wrong,
            the shards do not tile ``[0, V)``, ranks hold different hidden shapes or targets, or a target
            lies outside ``[0, V)``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("vocab_parallel_linear_logprobs needs an initialized torch.distributed group")
    if vocab_offset is not None and (isinstance(vocab_offset, bool) or not isinstance(vocab_offset, int)):
        raise TypeError(f"vocab_offset must be an int or None, got {type(vocab_offset).__name__}")
    if vocab_offset is not None and vocab_offset < 0:
        raise ValueError(f"vocab_offset must be >= 0, got {vocab_offset}")
    _check_types(hidden, weight_shard, targets, bias_shard)
    problem = _local_problem(hidden, weight_shard, targets, bias_shard, temperature, softcap)
    targets1d = targets.reshape(-1).long()
    valid_targets = targets1d[targets1d != ignore_index]
    layout = _exchange_layout(group, weight_shard, vocab_offset, targets1d.numel(), valid_targets, problem)
    if valid_targets.numel() and bool(((valid_targets < 0) | (valid_targets >= layout.vocab_size)).any()):
        bad = valid_targets[(valid_targets < 0) | (valid_targets >= layout.vocab_size)][0].item()
        raise ValueError(
            f"target {bad} is outside [0, V={layout.vocab_size}) and is not ignore_index={ignore_index}"
        )
    chosen = resolve_backend(hidden.device, backend)
    chosen_impl = resolve_impl(impl)
    eps = filter_threshold(filter_eps, hidden.dtype) if chosen == "triton" and chosen_impl == "fused" else 0.0
    opts = _Opts(
        group=group,
        ignore_index=int(ignore_index),
        temperature=float(temperature),
        softcap=None if softcap is None else float(softcap),
        filter_eps=eps,
        backend=chosen,
        impl=chosen_impl,
        stats=bool(stats),
    )
    out = _VocabParallelLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight_shard, bias_shard, targets1d, layout, opts
    )
    if not stats:
        return out.reshape(targets.shape)
    return LogprobsWithStats(*(x.reshape(targets.shape) for x in out))
