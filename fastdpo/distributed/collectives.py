"""Collectives that fail instead of hanging: sums, the global pair count, metric means, bins per rank.

Collectives fail instead of hanging: the process group has a timeout (gloo and NCCL raise once it
expires; NCCL's watchdog tears the process down under PyTorch's default ``TORCH_NCCL_ASYNC_ERROR_HANDLING``),
and a peer that exits closes its connections, which fails pending collectives at once. The helpers here
re-raise such failures naming the rank and the likely cause. Without a process group every helper is the
single-process identity.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from fastdpo.packing import balance_bins

if TYPE_CHECKING:
    from fastdpo.distributed.launch import DistState

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "all_agree",
    "all_reduce_sum",
    "collective",
    "comm_device",
    "gather_metrics",
    "global_pair_count",
    "is_distributed",
    "rank",
    "set_timeout",
    "shard_bins",
    "world_size",
]

DEFAULT_TIMEOUT_S = 1800.0
_timeout_s = DEFAULT_TIMEOUT_S


def is_distributed() -> bool:
    """Whether a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank; 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the default group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def set_timeout(seconds: float) -> None:
    """Records the process-group timeout that failure messages quote (set by ``init_distributed``)."""
    global _timeout_s
    _timeout_s = float(seconds)


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Re-raises a failed collective with the rank, the timeout and the likely cause."""
    try:
        yield
    except RuntimeError as err:
        raise RuntimeError(
            f"{what} failed on rank {rank()} of {world_size()}: another rank probably crashed, was killed or "
            f"stalled past the {_timeout_s:g} s process-group timeout ({type(err).__name__}: {err})"
        ) from err


def comm_device() -> torch.device:
    """The device collectives of the default group take tensors on (CUDA for NCCL)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_agree(ok: bool, what: str) -> bool:
    """Whether ``ok`` holds on every rank; every rank learns the same answer."""
    if not is_distributed():
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=comm_device())
    with collective(what):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_reduce_sum(x: torch.Tensor | float | int) -> torch.Tensor | float | int:
    """Equals ``sum(x over ranks)`` (``x`` itself without a process group), as a new tensor or a number.

    Args:
        x: a tensor (any shape, same on every rank) or a Python int / float.

    Returns:
        The elementwise sum, of ``x``'s type (an int stays an int).
    """
    if isinstance(x, bool) or not isinstance(x, torch.Tensor | int | float):
        raise TypeError(f"all_reduce_sum takes a tensor, int or float, got {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        if not is_distributed():
            return x.clone()
        buf = x.detach().to(comm_device(), copy=True)
        with collective("all_reduce_sum"):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(x.device)
    if not is_distributed():
        return x
    dtype = torch.int64 if isinstance(x, int) else torch.float64
    total = all_reduce_sum(torch.tensor(x, dtype=dtype))
    return int(total) if isinstance(x, int) else float(total)


def global_pair_count(n_local: int) -> int:
    """Equals the number of pairs over all ranks: ``sum(n_local over ranks)``.

    Scale each rank's mean loss by ``n_local * world_size / global_pair_count(n_local)`` before backward
    so that DDP's and FSDP2's gradient averaging yields the gradient of the mean over all pairs.

    Args:
        n_local: pairs this rank contributes to the step (0 for a padding step).
    """
    if isinstance(n_local, bool) or not isinstance(n_local, int | np.integer) or n_local < 0:
        raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
    return int(all_reduce_sum(int(n_local)))


def gather_metrics(
    metrics: Mapping[str, float | torch.Tensor], weights: float | Mapping[str, float]
) -> dict[str, float]:
    """Equals ``sum_r(w_r * m_r) / sum_r(w_r)`` per metric: the global mean one process would log.

    Metrics that are means over the local pairs (TRL's ``rewards/*``, ``logps/*``) weighted by the local
    pair count give the mean over all pairs of the step. A rank with weight 0 (a padding step) does not
    count, even if its metric is NaN; a metric whose weights are 0 on every rank comes back NaN.

    Args:
        metrics: name -> scalar (float or one-element tensor); the same names on every rank.
        weights: one weight for every metric (e.g. the local pair count), or name -> weight.

    Returns:
        name -> global weighted mean, the same on every rank.

    Raises:
        ValueError: ranks pass different metric names, a weight is negative or missing.
    """
    names = sorted(metrics)
    if isinstance(weights, Mapping):
        missing = [k for k in names if k not in weights]
        if missing:
            raise ValueError(f"weights has no entry for metrics {missing}")
        w = [float(weights[k]) for k in names]
    else:
        w = [float(weights)] * len(names)
    if any(not x >= 0 for x in w):
        raise ValueError(f"metric weights must be >= 0, got {dict(zip(names, w, strict=True))}")
    values = [float(metrics[k]) for k in names]
    if is_distributed():
        fingerprint = zlib.crc32("\0".join(names).encode())
        # One MAX over (count, fingerprint) and their negations tells every rank whether all agree.
        agree = torch.tensor(
            [len(names), fingerprint, -len(names), -fingerprint], dtype=torch.float64, device=comm_device()
        )
        with collective("gather_metrics"):
            dist.all_reduce(agree, op=dist.ReduceOp.MAX)
        count, crc, neg_count, neg_crc = agree.tolist()
        if count != -neg_count or crc != -neg_crc:
            raise ValueError(f"ranks pass different metric names to gather_metrics; this rank has {names}")
    stacked = torch.tensor(
        [0.0 if wi == 0 else wi * v for wi, v in zip(w, values, strict=True)] + w, dtype=torch.float64
    )
    totals = all_reduce_sum(stacked).tolist()
    n = len(names)
    return {k: (totals[i] / totals[n + i] if totals[n + i] > 0 else math.nan) for i, k in enumerate(names)}


def shard_bins(bin_tokens: Sequence[int] | np.ndarray, state: DistState) -> np.ndarray:
    """Equals this rank's bins under LPT over ranks, padded with -1 to the same count on every rank.

    ``fastdpo.packing.balance_bins`` gives each bin to the least-loaded rank, largest bin first, so token
    counts are balanced. Each rank's bins come largest first (ties by index), so the k-th micro-batches of
    all ranks are of similar size. FSDP2 gathers parameters in every micro-batch, so every rank must run the
    same number of them: a ``-1`` entry is a padding step. Run it as a normal step on any bin (e.g. the
    rank's first, or bin 0) with its loss multiplied by 0, a pair count of 0 in ``global_pair_count`` and
    a weight of 0 in ``gather_metrics``: its collectives match the other ranks' and it changes nothing.

    Args:
        bin_tokens: ``[m]`` token count per bin, identical on every rank.
        state: from :func:`init_distributed`.

    Returns:
        int64 ``[k]`` bin indices for this rank, ``k = max bins per rank``, -1 for padding (at the end).
    """
    tokens = np.asarray(bin_tokens)
    groups = balance_bins(tokens, state.world_size)
    tokens = tokens.astype(np.int64)
    counts = np.bincount(groups, minlength=state.world_size)
    mine = np.flatnonzero(groups == state.rank)
    mine = mine[np.argsort(-tokens[mine], kind="stable")]
    pad = int(counts.max()) - mine.size
    return np.concatenate([mine, np.full(pad, -1, dtype=np.int64)]).astype(np.int64)
