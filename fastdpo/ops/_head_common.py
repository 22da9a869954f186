"""What every implementation of the fused head shares: choosing a backend and impl, the statistics' record.

Dimension letters: M valid (non-ignored) tokens, V vocab, S partial results (vocab splits or shards).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from fastdpo.metarun import device_type

IGNORE_INDEX = -100
BACKENDS = ("triton", "torch")
IMPLS = ("fused", "chunked")

__all__ = [
    "IGNORE_INDEX",
    "LogprobsWithStats",
    "Partials",
    "TokenStats",
    "combine_partials",
    "filter_threshold",
    "interpreting",
    "merge_partials",
    "resolve_backend",
    "resolve_impl",
]


class TokenStats(NamedTuple):
    """Per-token statistics of ``p = softmax(z)``, ``z = cap(hidden @ weight.T + bias) / temperature``.

    Each is fp32 ``[M]`` (bool for ``is_argmax``), carries no gradient, and equals in plain PyTorch:

    * ``entropy``: ``-(p * p.log()).sum(-1)``;
    * ``mean_logit``: ``z.mean(-1)``;
    * ``is_argmax``: ``z.argmax(-1) == target``; on ties the first maximum wins, as in ``argmax``;
    * ``log_sum_p2``: ``(p * p).sum(-1).log()`` (TRL's WPO weights).
    """

    entropy: torch.Tensor
    mean_logit: torch.Tensor
    is_argmax: torch.Tensor
    log_sum_p2: torch.Tensor


class LogprobsWithStats(NamedTuple):
    """``linear_logprobs(..., stats=True)``: the log-probs and :class:`TokenStats`' fields, ``[...]`` each.

    At ignored positions every field is 0 (False for ``is_argmax``). Only ``logps`` carries gradients.
    """

    logps: torch.Tensor
    entropy: torch.Tensor
    mean_logit: torch.Tensor
    is_argmax: torch.Tensor
    log_sum_p2: torch.Tensor


class Partials(NamedTuple):
    """Per-part sums over a share of the vocabulary, ``[S, M]`` each, folded by :func:`combine_partials`.

    ``lse``: log-sum-exp of the part; ``target``: the target logit if the target lies in the part, else 0;
    ``mean_z``: ``sum(p_j * z_j)`` with ``p`` the part's own softmax; ``log_sum_p2``: ``log sum p_j**2``
    under that softmax; ``sum_z``: ``sum(z_j)``; ``max_before``: the largest logit left of the target
    (``-inf`` if none), or a lower bound of it that is exact wherever it reaches the target (all that
    ``is_argmax`` needs); ``max_z``: the part's largest logit. The statistics are None when not requested.
    """

    lse: torch.Tensor
    target: torch.Tensor
    mean_z: torch.Tensor | None = None
    log_sum_p2: torch.Tensor | None = None
    sum_z: torch.Tensor | None = None
    max_before: torch.Tensor | None = None
    max_z: torch.Tensor | None = None


def merge_partials(parts: Partials) -> Partials:
    """Folds ``S`` parts into one (``[1, M]`` each): the same sums over the union of their vocabularies.

    The union's probabilities are a part's own times ``w_s = exp(lse_s - lse)``, so expectations add with
    weights ``w_s`` and sums of squares with ``w_s**2``.
    """
    lse = parts.lse if parts.lse.shape[0] == 1 else torch.logsumexp(parts.lse, dim=0, keepdim=True)
    target = parts.target.sum(0, keepdim=True)
    if parts.mean_z is None:
        return Partials(lse, target)
    share = parts.lse - lse
    return Partials(
        lse,
        target,
        (torch.exp(share) * parts.mean_z).sum(0, keepdim=True),
        torch.logsumexp(2 * share + parts.log_sum_p2, dim=0, keepdim=True),
        parts.sum_z.sum(0, keepdim=True),
        parts.max_before.amax(0, keepdim=True),
        parts.max_z.amax(0, keepdim=True),
    )


def combine_partials(
    parts: Partials, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor, TokenStats | None]:
    """Folds ``S`` parts into ``(logp, lse, stats)``, the whole vocabulary's values (stats None if absent)."""
    whole = merge_partials(parts)
    lse, target = whole.lse[0], whole.target[0]
    if whole.mean_z is None:
        return target - lse, lse, None
    # The target is the first maximum when nothing left of it reaches it and nothing anywhere exceeds it.
    is_argmax = (target > whole.max_before[0]) & (target >= whole.max_z[0])
    stats = TokenStats(lse - whole.mean_z[0], whole.sum_z[0] / vocab_size, is_argmax, whole.log_sum_p2[0])
    return target - lse, lse, stats


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Picks ``"triton"`` or ``"torch"``: the argument, else ``FASTDPO_BACKEND``, else triton on CUDA."""
    choice = backend or os.environ.get("FASTDPO_BACKEND") or None
    kind = device_type(device)  # a meta device (fastdpo plan) picks as the device planned for
    if choice is None:
        return "triton" if kind == "cuda" else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be 'triton' or 'torch' (argument or FASTDPO_BACKEND), got {choice!r}")
    if choice == "triton" and kind not in ("cuda", "meta") and not interpreting():
        raise ValueError(
            f"the triton backend needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run the "
            "kernels on the CPU, or use backend='torch'"
        )
    return choice


def resolve_impl(impl: str | None = None) -> str:
    """Picks ``"fused"`` or ``"chunked"``.

    The argument wins; else ``"chunked"`` under ``torch.use_deterministic_algorithms(True)`` (it is bitwise
    reproducible; the fused backward's atomics are not); else ``FASTDPO_IMPL``; else ``"chunked"``. That
    default is the cost model's choice (issue 9's roofline estimate, modeled, not measured: the fused
    backward is bound by fp32 atomic read-modify-writes of dH and dW, the chunked one by cuBLAS) and stands
    until a GPU measures both.
    """
    choice = impl
    if choice is None and torch.are_deterministic_algorithms_enabled():
        choice = "chunked"
    choice = choice or os.environ.get("FASTDPO_IMPL") or "chunked"
    if choice not in IMPLS:
        raise ValueError(f"impl must be 'fused' or 'chunked' (argument or FASTDPO_IMPL), got {choice!r}")
    return choice


def filter_threshold(filter_eps: float | str | None, dtype: torch.dtype) -> float:
    """Gradient-filtering threshold: ``"auto"`` is ``finfo(dtype).eps / 32``; None or 0 turns it off."""
    if filter_eps is None:
        return 0.0
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, str) or filter_eps < 0:
        raise ValueError(f"filter_eps must be 'auto', None or a float >= 0, got {filter_eps!r}")
    return float(filter_eps)
