"""What a run is built from: the process's place in the job, the device, models, LoRA, the optimizer and
the learning-rate schedule."""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdpo.distributed import DistState, init_distributed
from fastdpo.longctx import install_long_context
from fastdpo.losses import LOSS_TYPES, FusedLinearDPOLoss
from fastdpo.metarun import device_type
from fastdpo.train.config import DTYPES, TrainConfig

logger = logging.getLogger("fastdpo")

__all__ = [
    "add_lora",
    "build_dpo_loss",
    "build_optimizer",
    "build_scheduler",
    "join_job",
    "load_model",
    "logit_transform",
    "prepare_model",
    "resolve_device",
    "seed_everything",
    "warmup_cosine",
    "warn_max_length",
]


def join_job(config: TrainConfig, rank: int | None, world_size: int | None) -> DistState:
    """Joins the torchrun job (or describes one process) and checks it against the config and args."""
    state = init_distributed(backend="gloo" if config.device == "cpu" else None)
    if (rank is not None and rank != state.rank) or (
        world_size is not None and world_size != state.world_size
    ):
        raise ValueError(
            f"rank={rank}, world_size={world_size}: expected this process's place in the job, rank "
            f"{state.rank} of {state.world_size} (launch several ranks with torchrun)"
        )
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    if state.world_size > 1 and config.strategy == "none":
        raise ValueError(
            f"strategy: expected ddp or fsdp2 with {state.world_size} ranks, got 'none' (each rank would "
            "train its own copy)"
        )
    if config.strategy != "none" and not grouped:
        raise ValueError(
            f"strategy: {config.strategy!r} needs a process group; launch with torchrun "
            f"(torchrun --nproc_per_node=K -m fastdpo train --strategy {config.strategy} ...) or use 'none'"
        )
    return state


def resolve_device(config: TrainConfig, dist: DistState) -> torch.device:
    """The job's device under a strategy, else ``config.device`` (``auto``: CUDA if available)."""
    if config.strategy != "none":
        return dist.device
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def load_model(config: TrainConfig, path: str, device: torch.device, *, trainable: bool = True) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path)`` (safetensors only), prepared by ``prepare_model``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[config.param_dtype],
        use_safetensors=True,
        trust_remote_code=config.trust_remote_code,
    )
    return prepare_model(config, model, device, trainable=trainable)


def prepare_model(
    config: TrainConfig, model: nn.Module, device: torch.device, *, trainable: bool = True
) -> nn.Module:
    """Moves ``model`` to ``device``, turns off its KV cache and dropout, and sets up checkpointing (a
    trainable model) or freezes it (a reference)."""
    # FSDP2 moves the policy to the device one sharded unit at a time, so it stays where it is.
    if not (trainable and config.strategy == "fsdp2"):
        model = model.to(device)
    model.config.use_cache = False
    if config.disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if not trainable:
        model.eval().requires_grad_(False)
    elif config.gradient_checkpointing:
        # Non-reentrant checkpointing saves each layer's input through autograd's saved-tensor hooks,
        # which is what lets offload_activations move those inputs to CPU.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    install_long_context(
        model,
        tiled_mlp=config.tiled_mlp,
        lean_norms=config.lean_norms,
        tile_tokens=config.tile_tokens,
        offload_checkpoints=trainable and config.offload_checkpoints,
    )
    return model


def add_lora(config: TrainConfig, model: nn.Module) -> nn.Module:
    """``model`` with peft LoRA adapters on ``config.lora_target_modules``."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def build_dpo_loss(config: TrainConfig, *, temperature: float, softcap: float | None) -> nn.Module:
    """The run's ``FusedLinearDPOLoss`` (statistics on, reference-free under ``reference: none``)."""
    return FusedLinearDPOLoss(
        beta=config.beta,
        loss_type=config.loss_type,
        label_smoothing=config.label_smoothing,
        reference_free=LOSS_TYPES[config.loss_type].needs_reference and config.reference == "none",
        stats=True,
        temperature=temperature,
        softcap=softcap,
        backend=config.backend,
    )


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; matrices get ``weight_decay``, biases and norms none."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": config.lr, "betas": (0.9, 0.999), "eps": 1e-8}
    devices = sorted({p.device.type for p in params})
    if devices == ["meta"]:
        # fastdpo plan: fused AdamW refuses meta parameters; the single-tensor loop holds, besides the
        # state, one parameter's temporaries at a time (the fused kernel none; unfused foreach, all of them).
        fused = config.fused_adamw and device_type("meta") in _fused_adamw_devices()
        return torch.optim.AdamW(groups, foreach=False if fused else None, **kwargs)
    if config.fused_adamw and params:
        if all(d in _fused_adamw_devices() for d in devices):
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        logger.info("fused AdamW: this torch has no fused kernel on %s; using the unfused AdamW", devices)
    return torch.optim.AdamW(groups, **kwargs)


def _fused_adamw_devices() -> tuple[str, ...]:
    # AdamW(fused=True) only checks the devices at its first step (meta, the planner's, fails there), so
    # ask torch's own list up front; a torch without it gets the two this project runs on.
    from torch.optim import optimizer

    listed = getattr(optimizer, "_get_fused_kernels_supported_devices", None)
    return tuple(listed()) if listed is not None else ("cuda", "cpu")


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int, *, last_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to ``lr`` over ``warmup_steps`` (or ``warmup_ratio`` of the steps), then cosine decay
    to ``lr * min_lr_ratio`` at ``total_steps``; ``last_step`` > 0 starts it there (the optimizer's param
    groups then need ``initial_lr``)."""
    warmup = config.warmup_steps or round(config.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: warmup_cosine(s, warmup=warmup, total=total_steps, min_ratio=config.min_lr_ratio),
        last_epoch=last_step - 1,
    )


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR factor of optimizer step ``step`` (0-based): linear warmup to 1, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    """Seeds python's ``random``, numpy's global generator and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """``(temperature, softcap)`` that make the fused head compute the model's own logits.

    Gemma-2 style ``final_logit_softcapping`` c: ``c * tanh(logits / c)``; Cohere style ``logit_scale``
    s: ``logits * s``, i.e. temperature ``1 / s``.
    """
    model_config: Any = getattr(model, "config", None)
    softcap = getattr(model_config, "final_logit_softcapping", None)
    scale = getattr(model_config, "logit_scale", None)
    if scale is not None and not scale > 0:
        raise ValueError(f"model config: expected logit_scale > 0, got {scale!r}")
    return (1.0 / float(scale) if scale is not None else 1.0), (None if softcap is None else float(softcap))


def warn_max_length(config: TrainConfig, model: nn.Module) -> None:
    """Warns when ``max_length`` exceeds the positions the model was built for: longer rows would run on
    position embeddings (or RoPE angles) it never trained on."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and config.max_length > limit:
        logger.warning(
            "max_length %d is over the model's max_position_embeddings %d: tokens past %d get positions the "
            "model never saw; expected max_length <= %d",
            config.max_length,
            limit,
            limit,
            limit,
        )
