"""Data-parallel training on PyTorch's own stack: process group, DDP / FSDP2, collectives, bins per rank.

``launch`` joins the torchrun job and wraps the model; ``collectives`` holds the reductions, the metric
means and the bin plan. Sharded (DCP) checkpoints live in ``fastdpo.checkpoint.sharded``.
"""

from fastdpo.distributed.collectives import (
    DEFAULT_TIMEOUT_S,
    all_reduce_sum,
    gather_metrics,
    global_pair_count,
    shard_bins,
)
from fastdpo.distributed.launch import (
    STRATEGIES,
    DistState,
    gradient_sync,
    init_distributed,
    unsharded_lm_head,
    unwrap_model,
    wrap_model,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "STRATEGIES",
    "DistState",
    "all_reduce_sum",
    "gather_metrics",
    "global_pair_count",
    "gradient_sync",
    "init_distributed",
    "shard_bins",
    "unsharded_lm_head",
    "unwrap_model",
    "wrap_model",
]
