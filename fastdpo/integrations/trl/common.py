"""What every fastdpo TRL trainer shares: version guard, fused-head install, batch and metric plumbing.

A trainer (``dpo.py``, ``kto.py``) calls ``model(**model_inputs(batch), labels=labels, fastdpo=request)``.
The forward that ``install_fused_head`` patches onto the transformers model runs the backbone, turns its
last hidden states into the head's inputs (``HeadInputs``: logit scale folded in, labels shifted, FSDP2
shards gathered, the MoE router loss computed) and returns whatever ``request(head)`` returns. Calling the
model the Trainer wraps (DDP in multi-process runs), rather than the unwrapped module, is what keeps DDP's
gradient all-reduce armed for the loss's backward.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

try:
    import trl
    from accelerate.utils import is_peft_model
    from trl.trainer.utils import use_adapter
except ImportError as exc:  # pragma: no cover - exercised only without trl installed
    raise ImportError(
        "fastdpo.integrations.trl needs trl 1.16.x: pip install 'fastdpo[trl]' (or 'trl>=1.16,<1.17')"
    ) from exc

from fastdpo.packing import IGNORE_INDEX

SUPPORTED_TRL_VERSIONS = ">=1.16,<1.17"

_TRANSFORMERS_4 = Version(transformers.__version__) < Version("5.0.0")


def check_trl_version(version: str | None = None) -> None:
    """Raises ``RuntimeError`` unless ``version`` (default: the installed ``trl.__version__``) is 1.16.x.

    Args:
        version: A version string to check instead of the installed one.

    Raises:
        RuntimeError: The version is outside ``SUPPORTED_TRL_VERSIONS`` or cannot be parsed.
    """
    installed = trl.__version__ if version is None else version
    try:
        release = Version(str(installed)).release
    except ValueError:
        release = ()
    if release[:2] != (1, 16):
        raise RuntimeError(
            f"fastdpo's TRL integration supports trl {SUPPORTED_TRL_VERSIONS} (tested with 1.16.0), but trl "
            f"{installed} is installed; install a supported version with pip install "
            f"'trl{SUPPORTED_TRL_VERSIONS}', or use fastdpo's losses in your own loop"
        )


def check_backend(backend: str | None) -> None:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")


@dataclass
class HeadInputs:
    """What the patched forward hands a request: the backbone's outputs as the fused head's inputs.

    Attributes:
        hidden: ``[R, T, D]`` last hidden states, times the model's logit scale.
        weight: ``[V, D]`` lm_head weight (gathered from FSDP2 shards, differentiably).
        bias: ``[V]`` lm_head bias (times the logit scale), or None.
        targets: ``[R, T]`` labels aligned with hidden: position t predicts token t + 1; the last position
            and the ignored labels hold ``IGNORE_INDEX``.
        softcap: the model's final-logit soft-capping, or None.
        aux_loss: MoE load-balancing loss, when router logits were requested.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    softcap: float | None
    aux_loss: torch.Tensor | None = None


HeadRequest = Callable[[HeadInputs], Any]


def logit_transform(text_config: Any) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a model config, read with the same rules as TRL's fused LM head."""
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), softcap


def _router_aux_loss(
    model: nn.Module, text_config: Any, backbone_outputs: Any, attention_mask: Any
) -> torch.Tensor:
    """MoE load-balancing loss, computed exactly as TRL 1.16's fused LM head does."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    if _TRANSFORMERS_4:
        num_experts, top_k = model.num_experts, model.num_experts_per_tok
    elif text_config.model_type == "gpt_oss" and Version(transformers.__version__) < Version("5.6.0"):
        num_experts, top_k = model.num_experts, text_config.num_experts_per_tok
    else:
        num_experts, top_k = text_config.num_experts, text_config.num_experts_per_tok
    return load_balancing_loss_func(backbone_outputs.router_logits, num_experts, top_k, attention_mask)


def _fused_forward(
    model: nn.Module, backbone_attr: str, request: HeadRequest, args: tuple, kwargs: dict[str, Any]
) -> Any:
    """The body of the patched forward: the backbone, then ``request`` on the head's inputs."""
    text_config = model.config.get_text_config()
    labels = kwargs.pop("labels")
    kwargs["use_cache"] = False
    if getattr(text_config, "output_router_logits", False):
        kwargs.setdefault("output_router_logits", True)
    backbone_outputs = getattr(model, backbone_attr)(*args, **kwargs)

    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        # FSDP2 shards the head as DTensors; the gather is differentiable and returns grads to the shards.
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    hidden = backbone_outputs.last_hidden_state.to(weight.device)
    # fastdpo's padded layout wants labels aligned with hidden: position t predicts token t + 1, and the
    # last position predicts nothing.
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(weight.device)
    scale, softcap = logit_transform(text_config)
    if scale != 1.0:
        # scale * (h @ W.T + b) == (scale * h) @ W.T + scale * b, so the kernels need no extra argument.
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _router_aux_loss(model, text_config, backbone_outputs, kwargs.get("attention_mask"))
    return request(HeadInputs(hidden, weight, bias, targets, softcap, aux_loss))


def install_fused_head(model: nn.Module) -> None:
    """Patches ``model.forward`` so that ``model(..., labels=labels, fastdpo=request)`` runs fastdpo's head.

    Without ``fastdpo=`` the previous forward runs unchanged (generation, TRL's own fused head). The patch
    sits on the transformers model itself (under any PEFT or DDP wrapper, which pass the keyword through),
    so the loss is computed inside whichever wrapper's forward the trainer calls. Idempotent. DDP leaves
    non-tensor keyword arguments such as the request untouched when it scatters inputs.

    Args:
        model: A transformers causal LM (not a PEFT or DDP wrapper).
    """
    if getattr(model, "_fastdpo_head_installed", False):
        return
    previous_forward = model.forward
    # As TRL: before transformers 5, vision-language models expose their language backbone as `model`.
    is_vlm = model.config.get_text_config() is not model.config
    backbone_attr = "model" if is_vlm and _TRANSFORMERS_4 else "base_model"

    # Keep the original signature: generate() validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self: nn.Module, *args: Any, fastdpo: HeadRequest | None = None, **kwargs: Any) -> Any:
        if fastdpo is None:
            return previous_forward(*args, **kwargs)
        return _fused_forward(self, backbone_attr, fastdpo, args, kwargs)

    model.forward = types.MethodType(forward, model)
    model._fastdpo_head_installed = True


def head_owner(accelerator: Any, model: nn.Module) -> nn.Module:
    """The transformers model under any DDP / DeepSpeed / PEFT wrapper: where the forward is patched."""
    unwrapped = accelerator.unwrap_model(model)
    return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped


def model_inputs(inputs: Mapping[str, Any], exclude: Iterable[str]) -> dict[str, Any]:
    """The batch's model keyword arguments: every key but ``exclude``, without a KV cache."""
    skip = set(exclude)
    kwargs = {k: v for k, v in inputs.items() if k not in skip}
    kwargs["use_cache"] = False
    return kwargs


def completion_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """TRL's labels: the input ids, ``IGNORE_INDEX`` outside the completion."""
    return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)


def gathered_mean(accelerator: Any, values: torch.Tensor) -> float:
    """Mean over every process's ``values``, as TRL logs its per-sequence metrics."""
    return accelerator.gather(values).mean().item()


def check_trainer_options(backend: str | None, impl: str | None) -> None:
    """Raises unless trl is 1.16.x and ``backend`` / ``impl`` are ones fastdpo's head knows."""
    check_trl_version()
    check_backend(backend)
    if impl not in (None, "fused", "chunked"):
        raise ValueError(f"impl must be None, 'fused' or 'chunked', got {impl!r}")


def check_not_zero3(trainer: str, fallback: str) -> None:
    """Raises ``ValueError`` under DeepSpeed ZeRO-3, naming ``trainer`` and the stock ``fallback``."""
    if is_deepspeed_zero3_enabled():
        raise ValueError(
            f"DeepSpeed ZeRO-3 is not supported by {trainer}: the fused loss's backward reads the "
            "full lm_head weight, which ZeRO-3 keeps partitioned outside lm_head's own forward; use "
            f"ZeRO-1/2, or {fallback}"
        )


def head_impl(impl: str | None, args: Any) -> str | None:
    """The head impl asked for, else ``"chunked"`` under ``args.full_determinism`` (bitwise reproducible)."""
    return "chunked" if impl is None and args.full_determinism else impl


def ref_adapter(trainer: Any) -> contextlib.AbstractContextManager:
    """As TRL: without ``ref_model``, a PEFT policy scores the reference with its "ref" adapter, if any."""
    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    return contextlib.nullcontext()


def token_stats_grid(
    targets: torch.Tensor, stats: Any, fields: Iterable[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    """The loss's per-token ``stats`` (one value per scored token, row-major) on TRL's ``[rows, T - 1]`` grid.

    ``fields`` pairs each output name with its ``stats`` attribute; values are zero where ``targets`` are
    ignored. Empty when the loss gave no stats.
    """
    if stats is None:
        return {}
    mask = targets != IGNORE_INDEX
    return {
        name: getattr(stats, attr).new_zeros(mask.shape).masked_scatter(mask, getattr(stats, attr))[:, :-1]
        for name, attr in fields
    }


def log_token_metrics(
    trainer: Any, mode: str, inputs: Mapping[str, Any], entropy: torch.Tensor | None
) -> torch.Tensor:
    """Appends TRL's ``entropy`` and ``num_tokens`` metrics, gathered as TRL 1.16 gathers them.

    Returns:
        The shifted completion mask ``[rows, T - 1]`` the other per-token metrics use.
    """
    acc, metrics = trainer.accelerator, trainer._metrics[mode]
    shift_completion_mask = inputs["completion_mask"][:, 1:]
    if entropy is not None:
        entropy_sum = (entropy[:, -shift_completion_mask.size(1) :] * shift_completion_mask).sum()
        total_tokens = acc.gather_for_metrics(shift_completion_mask.sum()).sum()
        entropy_sum = acc.gather_for_metrics(entropy_sum).sum()
        metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)
    if mode == "train":
        num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        trainer._total_train_tokens += num_tokens // trainer._tp_size
    metrics["num_tokens"] = [trainer._total_train_tokens]
    return shift_completion_mask


def policy_loss(
    trainer: Any, model: nn.Module, mode: str, inputs: Mapping[str, Any], exclude: Iterable[str], request: Any
) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """The policy forward with ``request``: ``(loss, outputs, model kwargs)``, TRL's router loss included.

    With ``aux_loss_enabled`` the MoE router loss, weighted by ``router_aux_loss_coef``, joins the loss and
    is logged as ``aux_loss``.
    """
    model_kwargs = model_inputs(inputs, exclude)
    if trainer.aux_loss_enabled:
        model_kwargs["output_router_logits"] = True
    labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
    # `model` is what the Trainer wraps (DDP in multi-process runs): calling it, rather than the unwrapped
    # module, is what keeps DDP's gradient all-reduce armed for this backward (see the module docstring).
    outputs = model(**model_kwargs, labels=labels, fastdpo=request)
    loss = outputs.loss
    if trainer.aux_loss_enabled:
        loss = loss + trainer.router_aux_loss_coef * outputs.aux_loss
        aux = trainer.accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
        trainer._metrics[mode]["aux_loss"].append(aux)
    return loss, outputs, model_kwargs
