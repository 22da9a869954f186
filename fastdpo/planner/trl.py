"""The same plan for stock TRL 1.16 ``DPOTrainer``'s compute path, for ``fastdpo plan --compare-trl``.

What runs on the meta device is TRL's own code: the model with TRL's fused head
(``trl.trainer.utils.add_fused_lm_head``, its ``ChunkedLogProbFunction`` in ``[4096 x chunk]`` cuBLAS
tiles) on the padded ``[2B, T]`` batch of the same pairs (chosen rows, then rejected rows), TRL's sigmoid
loss on the summed log-probs, backward and the optimizer step, with the same LoRA, dtype, checkpointing and
attention as the fastdpo plan but none of fastdpo's memory mechanisms. Two stand-ins:

- TRL's Triton fold writes into TRL's own buffers in place and allocates nothing, so on meta its torch
  fallback (which allocates tile-sized temporaries the kernel keeps in registers) is replaced by a no-op.
- Attention is the packed attention op's flash-attn stand-in (out and lse, no mask), one causal sequence
  per padded row (the synthetic rows need no padding), as in the fastdpo plan.
- On CUDA TRL first copies the scored positions' hidden states (``hidden[mask]``, ``[M, D]``); a boolean
  index has no size on meta, so the plan scores every position without that copy, as TRL does off CUDA.
  The planned TRL peak is therefore low by at most ``M x D`` elements of the compute dtype.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from fastdpo.memtrack import LiveBytes, current_tracker, label
from fastdpo.metarun import autocast_dtype, meta_autocast, plan_for
from fastdpo.ops.packed_attention import ATTENTION_NAME, register_attention
from fastdpo.planner.step import (
    StepMeasure,
    _init_optimizer_state,
    _region_hooks,
    _static_bytes,
    _step_and_breakdown,
    fit_tokens,
    synthetic_split,
)
from fastdpo.train.build import add_lora, build_optimizer, prepare_model
from fastdpo.train.config import DTYPES, TrainConfig

__all__ = ["NOT_IN_TRL", "TRLStepPlanner", "plan_trl"]

NOT_IN_TRL = ("offload_activations", "offload_checkpoints", "tiled_mlp", "lean_norms")


class _MetaAutocastTorch:
    """``torch`` for TRL's head module, whose autocast queries (unknown device type ``meta``) answer with
    the planner's meta autocast."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def is_autocast_enabled(device_type: str = "cuda") -> bool:
        return autocast_dtype(device_type) is not None

    @staticmethod
    def get_autocast_dtype(device_type: str) -> torch.dtype:
        return autocast_dtype(device_type)


@contextmanager
def _trl_on_meta() -> Any:
    import trl.kernels.chunked_logprob as chunked

    def no_fold(*args: Any, **kwargs: Any) -> None:
        return None

    saved = chunked._forward_tile, chunked._backward_tile, chunked.torch
    chunked._forward_tile = chunked._backward_tile = no_fold
    chunked.torch = _MetaAutocastTorch()
    try:
        yield
    finally:
        chunked._forward_tile, chunked._backward_tile, chunked.torch = saved


def _trl_policy(config: TrainConfig, model_config: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=DTYPES[config.param_dtype])
    model = prepare_model(config, model, torch.device("meta"))
    # flash-attn's memory at any length, and no mask (whose checks read values): the packed op's fakes.
    register_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    add_fused_lm_head(model)  # before peft, as TRL does
    return add_lora(config, model) if config.lora_r else model


def _head_after_backbone(model: nn.Module) -> Any:
    """Labels what the fused head allocates (after the backbone returns) as the head's."""

    def enter(module: nn.Module, args: Any, out: Any) -> None:
        tracker = current_tracker()
        if tracker is not None:
            tracker.where.region, tracker.where.layer = "head", None

    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    return backbone.base_model.register_forward_hook(enter)


class TRLStepPlanner:
    """TRL's policy built once on meta; ``measure(tokens)`` plans one step of that many tokens."""

    def __init__(self, config: TrainConfig, model_config: Any, target: str) -> None:
        # Stock TRL has none of fastdpo's memory mechanisms, whatever the fastdpo config turns on.
        config = dataclasses.replace(config, **dict.fromkeys(NOT_IN_TRL, False))
        self.config, self.target = config, target
        self.model = _trl_policy(config, model_config)
        self.static = _static_bytes(self.model)

    def measure(self, tokens_per_step: int) -> StepMeasure:
        config = dataclasses.replace(self.config, tokens_per_step=tokens_per_step)
        model, split = self.model, synthetic_split(config)
        # TRL pads chosen and rejected rows to the longest sequence: [2B, T].
        width = max(p + max(c, r) for p, c, r in split.lengths)
        rows = 2 * len(split.lengths)
        auto = "bf16" if self.target == "cuda" else "fp32"
        compute = DTYPES[auto if config.dtype == "auto" else config.dtype]
        optimizer = build_optimizer(config, model)
        with ExitStack() as stack:
            stack.enter_context(_trl_on_meta())
            stack.enter_context(plan_for(self.target))
            tracker = stack.enter_context(LiveBytes(exclude=[*model.parameters(), *model.buffers()]))
            stack.enter_context(_region_hooks(model, nn.Identity()))
            stack.callback(_head_after_backbone(model).remove)
            with label(phase="optimizer"), torch.no_grad():
                _init_optimizer_state(model, optimizer)
            ids = torch.zeros(rows, width, dtype=torch.long, device="meta")
            positions = torch.arange(width, device="meta").expand(rows, width)
            with (
                label(phase="forward"),
                meta_autocast(compute) if compute != torch.float32 else nullcontext(),
            ):
                out = model(input_ids=ids, position_ids=positions, labels=ids, fused_lm_head=True)
                logps = out.log_probs.sum(-1)
                margin = logps[: rows // 2] - logps[rows // 2 :]
                loss = -torch.nn.functional.logsigmoid(config.beta * margin).mean()
            with label(phase="backward"):
                loss.backward()
            with label(phase="optimizer", region="other", layer=None):
                breakdown = _step_and_breakdown(tracker, model, optimizer, self.static)
        w = tracker.peak.where
        return StepMeasure(
            peak_bytes=tracker.peak.bytes + sum(self.static.values()),
            where={"phase": w.phase, "layer": w.layer, "op": tracker.peak.op, "region": w.region},
            breakdown=breakdown,
            host_bytes=tracker.host_peak,
            tokens=rows * width,
            num_pairs=rows // 2,
            static=dict(self.static),
        )


def plan_trl(
    config: TrainConfig, model_config: Any, target: str, *, budget: int | None, fit: bool
) -> dict[str, Any]:
    """TRL's plan of ``config``'s step as a JSON-ready dict; with ``fit``, its largest step in ``budget``."""
    planner = TRLStepPlanner(config, model_config, target)
    measure = planner.measure(config.tokens_per_step)
    rows = 2 * measure.num_pairs
    result = {
        "peak_bytes": measure.peak_bytes,
        "where": measure.where,
        "breakdown": measure.breakdown,
        "padded_shape": [rows, measure.tokens // rows],
    }
    if fit and budget is not None:
        result["max_tokens_per_step"] = fit_tokens(planner, 2 * config.max_length, budget)
    return result
