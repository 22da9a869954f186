"""Causal attention over packed sequences, as flash-attn's varlen op computes it, as a registered torch op.

``packed_attention(q, k, v, cu_seqlens)`` equals, for every segment ``s`` of ``cu_seqlens``,
``F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True, enable_gqa=True)`` on the ``[H, L, Dh]``
slices of that segment, with no attention across segments. It saves for backward what flash-attn saves:
the inputs, the output and an fp32 log-sum-exp ``[Hq, N]``, nothing ``[N, N]``.

- Its real implementation is a float32 torch reference, segment by segment (forward, and the backward
  from the saved lse): O(L^2) memory per segment, for CPU runs, tests and validating plans. GPU training
  uses flash-attn itself (``attn_backend: flash``) or flex attention.
- Its fake (meta) implementations allocate what flash-attn 2's varlen kernels allocate: ``out`` and the
  lse forward; ``dq, dk, dv`` backward, and when planning for CUDA (:func:`fastdpo.metarun.planning_for`)
  also its fp32 workspace (``dq_accum [N + 128 S, Hq, Dh]`` and ``softmax_d [Hq, N + 128 S]``), returned
  as an output the autograd wrapper drops. So ``fastdpo plan`` sees flash-attn's memory at any length.

:func:`attention_forward` is the transformers ``AttentionInterface`` function (name ``"fastdpo_packed"``)
that :func:`fastdpo.modeling.packed_hidden_states` selects with ``attn_backend="packed"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fastdpo.metarun import planning_for

__all__ = ["ATTENTION_NAME", "attention_forward", "packed_attention", "register_attention"]

ATTENTION_NAME = "fastdpo_packed"


def _segments(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    # One host sync for the boundaries: the torch reference loops over segments on the host.
    bounds = cu_seqlens.tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 causal scores of one segment, ``[Hq, L, L]``, and their log-sum-exp ``[Hq, L]``."""
    groups = q.shape[1] // k.shape[1]
    qh = q.float().transpose(0, 1)  # [Hq, L, Dh]
    kh = k.float().transpose(0, 1).repeat_interleave(groups, 0)
    scores = qh @ kh.transpose(1, 2) * scale
    length = q.shape[0]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    return scores, torch.logsumexp(scores, dim=-1)


@torch.library.custom_op("fastdpo::packed_attention_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    groups = q.shape[1] // k.shape[1]
    for a, b in _segments(cu_seqlens):
        scores, seg_lse = _probs(q[a:b], k[a:b], scale)
        p = torch.exp(scores - seg_lse[..., None])
        vh = v[a:b].float().transpose(0, 1).repeat_interleave(groups, 0)
        out[a:b] = (p @ vh).transpose(0, 1).to(q.dtype)
        lse[:, a:b] = seg_lse
    return out, lse


@_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):  # noqa: ANN001, ANN202
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("fastdpo::packed_attention_bwd", mutates_args=())
def _bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    groups = q.shape[1] // k.shape[1]
    for a, b in _segments(cu_seqlens):
        scores, _ = _probs(q[a:b], k[a:b], scale)
        p = torch.exp(scores - lse[:, a:b, None])  # [Hq, L, L]
        do = dout[a:b].float().transpose(0, 1)
        vh = v[a:b].float().transpose(0, 1).repeat_interleave(groups, 0)
        qh = q[a:b].float().transpose(0, 1)
        kh = k[a:b].float().transpose(0, 1).repeat_interleave(groups, 0)
        delta = (do * out[a:b].float().transpose(0, 1)).sum(-1, keepdim=True)
        ds = p * (do @ vh.transpose(1, 2) - delta) * scale
        dq[a:b] = (ds @ kh).transpose(0, 1).to(q.dtype)
        # GQA: the query heads of a group add into their shared key / value head.
        dkh = (ds.transpose(1, 2) @ qh).unflatten(0, (-1, groups)).sum(1)
        dvh = (p.transpose(1, 2) @ do).unflatten(0, (-1, groups)).sum(1)
        dk[a:b] = dkh.transpose(0, 1).to(k.dtype)
        dv[a:b] = dvh.transpose(0, 1).to(v.dtype)
    return dq, dk, dv, q.new_empty(0, dtype=torch.float32)


@_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):  # noqa: ANN001, ANN202
    workspace = 0
    if planning_for() == "cuda":
        rows = q.shape[0] + 128 * (cu_seqlens.shape[0] - 1)
        workspace = rows * q.shape[1] * (q.shape[2] + 1)  # dq_accum and softmax_d, fp32
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        q.new_empty(workspace, dtype=torch.float32),
    )


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx: Any, dout: torch.Tensor, dlse: torch.Tensor | None) -> tuple:
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, _ = _bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    max_seqlen: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention within each packed segment: per segment ``sdpa(q_s, k_s, v_s, is_causal=True)``.

    Args:
        q: ``[N, Hq, Dh]`` queries of all segments, concatenated.
        k: ``[N, Hk, Dh]`` keys (``Hq`` a multiple of ``Hk``: grouped-query attention).
        v: ``[N, Hk, Dh]`` values.
        cu_seqlens: ``[S+1]`` int32 segment boundaries (``0, ..., N``).
        max_seqlen: The longest segment (a host int, as flash-attn takes it).
        scale: Score scale; default ``Dh ** -0.5``.

    Returns:
        ``[N, Hq, Dh]`` attention output in q's dtype.
    """
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[0] != k.shape[0]:
        raise ValueError(
            f"q must be [N, Hq, Dh] and k, v [N, Hk, Dh], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q heads {q.shape[1]} must be a multiple of k heads {k.shape[1]}, same head dim")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = _fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, int(max_seqlen), scale)
    return out


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers ``AttentionInterface`` function: ``[B, H, T, Dh]`` inputs, ``[B, T, H, Dh]`` output.

    One packed row (``B = 1``) has its segments in ``cu_seq_lens_q`` and ``max_length_q``, the keywords
    flash-attn's varlen path takes, which :func:`fastdpo.modeling.packed_hidden_states` passes to the
    decoder; without them every row is one causal sequence (an unpadded batch).
    """
    if dropout:
        raise ValueError(f"packed attention has no dropout; got attention dropout {dropout}")
    batch, _, length, _ = query.shape
    cu_seqlens, max_seqlen = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None:
        cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=query.device) * length
        max_seqlen = length
    elif batch != 1:
        raise ValueError(f"packed attention with cu_seq_lens_q takes one packed row, got batch {batch}")

    def rows(t: torch.Tensor) -> torch.Tensor:  # [B, H, T, Dh] -> [B * T, H, Dh]
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[3])

    out = packed_attention(
        rows(query), rows(key), rows(value), cu_seqlens, max_seqlen=max_seqlen, scale=scaling
    )
    return out.view(batch, length, *out.shape[1:]), None


def register_attention() -> None:
    """Registers :func:`attention_forward` with transformers under ``"fastdpo_packed"``.

    No mask function is registered with it, so transformers builds no mask (and reads no position ids) for
    it: the segments travel as ``cu_seq_lens_q``.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
