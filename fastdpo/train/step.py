"""One optimizer step's compute, shared by ``fastdpo train`` and ``fastdpo plan``: every micro-batch's
forward, loss and backward, then clipping and the update. The planner runs exactly these functions on the
meta device, so a change here moves the planned memory by itself."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fastdpo.distributed import gradient_sync
from fastdpo.memtrack import label
from fastdpo.train.forward import PackedForward
from fastdpo.train.plan import Split
from fastdpo.train.reference import reference_inputs

__all__ = ["accumulate", "clip_gradients"]


def accumulate(
    fwd: PackedForward,
    model: nn.Module,
    split: Split,
    bins: Sequence[np.ndarray],
    *,
    reference: str,
    ref_model: nn.Module | None,
    world_size: int,
) -> tuple[torch.Tensor, int]:
    """Forward and backward of this rank's micro-batches of ``bins`` (all ranks'), gradients accumulated.

    Returns:
        ``(sums, pairs)``: the sums of ``fwd.metric_names`` over this rank's real pairs, and their count.
    """
    step_pairs = sum(len(b) for b in bins)
    sums = torch.zeros(len(fwd.metric_names), device=fwd.device)
    local_pairs = 0
    plan = fwd.shard(bins, split.tokens)
    for k, (b, real) in enumerate(plan):
        with gradient_sync(model, enabled=k == len(plan) - 1):
            batch = fwd.batch(split, b)
            with label(phase="reference"):
                ref = reference_inputs(fwd, reference, ref_model, split, b, batch)
            with label(phase="forward"):
                out = fwd.loss(batch, ref)
            # Weighting each micro-batch mean by its share of the step's pairs makes the accumulated
            # gradient that of the mean over all pairs of the step, however they were binned; the
            # world_size factor undoes DDP's and FSDP2's averaging over ranks.
            share = batch.num_pairs * world_size / step_pairs if real else 0.0
            with label(phase="backward"):
                (out.loss * share).backward()
        if real:
            sums += fwd.pair_sums(out, batch.num_pairs)
            local_pairs += batch.num_pairs
    return sums, local_pairs


def clip_gradients(model: nn.Module, max_grad_norm: float | None) -> torch.Tensor:
    """Clips the trainable parameters' gradients to ``max_grad_norm`` (None or 0: no clipping); their norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    return grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
