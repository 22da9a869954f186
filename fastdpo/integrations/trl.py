"""TRL integration: ``FastDPOTrainer``, a ``trl.DPOTrainer`` whose loss runs on fastdpo's fused kernels.

Supported TRL versions: 1.16.x (tested with 1.16.0). Other versions raise ``RuntimeError`` when the trainer
is built, because the override below mirrors the internals of TRL 1.16's ``DPOTrainer._compute_loss``.

What changes against the stock trainer: the policy forward returns the backbone's last hidden states to
``fastdpo.losses.FusedLinearDPOLoss`` (lm_head + log-softmax + gather + DPO loss in one autograd node,
no ``[N, V]`` logits), and the reference log-probs come from ``fastdpo.losses.sequence_logps``. Data
collation, reference handling (``ref_model``, ``precompute_ref_log_probs``, PEFT adapters disabled), the
metric names and their cross-process gathering are TRL's own.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.utils import ModelOutput

try:
    import trl
    from accelerate.utils import is_peft_model
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as exc:  # pragma: no cover - exercised only without trl installed
    raise ImportError(
        "fastdpo.integrations.trl needs trl 1.16.x: pip install 'fastdpo[trl]' (or 'trl>=1.16,<1.17')"
    ) from exc

from fastdpo.losses import FusedLinearDPOLoss, PreferenceLossOutput, sequence_logps
from fastdpo.packing import IGNORE_INDEX

__all__ = [
    "SUPPORTED_TRL_VERSIONS",
    "TRL_LOSS_TYPES",
    "FastDPOModelOutput",
    "FastDPOTrainer",
    "check_trl_version",
]

SUPPORTED_TRL_VERSIONS = ">=1.16,<1.17"

# The loss types TRL 1.16's DPOTrainer accepts; fastdpo's loss implements each with TRL's formula.
TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

_TRANSFORMERS_4 = Version(transformers.__version__) < Version("5.0.0")
_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


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
            f"FastDPOTrainer supports trl {SUPPORTED_TRL_VERSIONS} (tested with 1.16.0), but trl "
            f"{installed} is installed; install a supported version with pip install "
            f"'trl{SUPPORTED_TRL_VERSIONS}', or use fastdpo.losses.FusedLinearDPOLoss in your own loop"
        )


@dataclass
class FastDPOModelOutput(ModelOutput):
    """What the model's forward returns when called with a ``fastdpo=`` request.

    A ``ModelOutput`` (a dict) so that DDP finds ``loss`` among the outputs and Accelerate's fp32 output
    conversion can walk it. Per-token fields are ``[2B, T - 1]`` (aligned with TRL's shifted completion
    mask), zero where the label is ignored, and None unless logit metrics were asked for.

    Attributes:
        loss: scalar DPO loss (policy forward only).
        chosen_logps: ``[B]`` scored chosen log-probs, detached.
        rejected_logps: ``[B]`` scored rejected log-probs, detached.
        chosen_rewards: ``[B]`` ``beta * (chosen_logps - ref_chosen_logps)``, detached.
        rejected_rewards: ``[B]``.
        nll_loss: NLL term of ``rpo_alpha`` / ``sft``, when the loss has one.
        entropy: per-token entropy of the next-token distribution.
        mean_logits: per-token mean logit over the vocabulary.
        is_top1: per-token bool, whether the label is the first argmax.
        aux_loss: MoE load-balancing loss, when router logits were requested.
    """

    loss: torch.Tensor | None = None
    chosen_logps: torch.Tensor | None = None
    rejected_logps: torch.Tensor | None = None
    chosen_rewards: torch.Tensor | None = None
    rejected_rewards: torch.Tensor | None = None
    nll_loss: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class _Request:
    """What the patched forward does with the hidden states: the policy loss, or reference log-probs.

    DDP leaves non-tensor keyword arguments such as this one untouched when it scatters inputs.
    """

    loss_fn: FusedLinearDPOLoss | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    logit_metrics: bool = False
    ld_alpha: float | None = None
    backend: str | None = None


def _logit_transform(text_config: Any) -> tuple[float, float | None]:
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


@torch.no_grad()
def _logit_statistics(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(entropy, mean logit, label is argmax)`` of ``cap(hidden @ weight.T + bias)``, no grad.

    These feed TRL's ``entropy``, ``logits/*`` and ``mean_token_accuracy`` metrics, which fastdpo's
    log-prob kernels do not produce. The logits are built a row chunk at a time (at most ``2**24``
    values), so memory stays bounded for any vocabulary.
    """
    compute_dtype = (
        torch.get_autocast_dtype(hidden.device.type)
        if torch.is_autocast_enabled(hidden.device.type)
        else hidden.dtype
    )
    vocab = weight.shape[0]
    rows = max(1, 2**24 // vocab)
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    entropy, mean_logits, is_top1 = [], [], []
    for start in range(0, hidden.shape[0], rows):
        z = hidden[start : start + rows].to(compute_dtype) @ w.T
        if b is not None:
            z = z + b
        z = z.float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        log_z = torch.logsumexp(z, dim=-1)
        entropy.append(log_z - (torch.softmax(z, dim=-1) * z).sum(-1))
        mean_logits.append(z.mean(-1))
        is_top1.append(z.argmax(-1) == targets[start : start + rows])
    return torch.cat(entropy), torch.cat(mean_logits), torch.cat(is_top1)


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
    model: nn.Module, backbone_attr: str, request: _Request, args: tuple, kwargs: dict[str, Any]
) -> FastDPOModelOutput:
    """The body of the patched forward: backbone, then fastdpo's fused head on its last hidden states."""
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
    scale, softcap = _logit_transform(text_config)
    if scale != 1.0:
        # scale * (h @ W.T + b) == (scale * h) @ W.T + scale * b, so the kernels need no extra argument.
        hidden = hidden * scale
        bias = None if bias is None else bias * scale

    if request.loss_fn is None:
        with torch.no_grad():
            chosen, rejected = sequence_logps(
                hidden,
                weight,
                targets,
                bias,
                ld_alpha=request.ld_alpha,
                softcap=softcap,
                backend=request.backend,
            )
        return FastDPOModelOutput(chosen_logps=chosen, rejected_logps=rejected)

    result: PreferenceLossOutput = request.loss_fn(
        hidden,
        weight,
        targets,
        bias,
        ref_chosen_logps=request.ref_chosen_logps,
        ref_rejected_logps=request.ref_rejected_logps,
    )
    per_token: dict[str, torch.Tensor] = {}
    if request.logit_metrics:
        mask = targets != IGNORE_INDEX
        stats = _logit_statistics(
            hidden.detach()[mask],
            weight.detach(),
            None if bias is None else bias.detach(),
            targets[mask],
            softcap,
        )
        for name, values in zip(("entropy", "mean_logits", "is_top1"), stats, strict=True):
            per_token[name] = values.new_zeros(mask.shape).masked_scatter(mask, values)[:, :-1]
    aux_loss = None
    if kwargs.get("output_router_logits"):
        aux_loss = _router_aux_loss(model, text_config, backbone_outputs, kwargs.get("attention_mask"))
    # Built in one go: ModelOutput keeps only the fields given at construction in its dict, and the dict
    # is what DDP searches for the loss.
    return FastDPOModelOutput(
        loss=result.loss,
        chosen_logps=result.chosen_logps,
        rejected_logps=result.rejected_logps,
        chosen_rewards=result.chosen_rewards,
        rejected_rewards=result.rejected_rewards,
        nll_loss=result.metrics.get("nll_loss"),
        aux_loss=aux_loss,
        **per_token,
    )


def _install_fused_head(model: nn.Module) -> None:
    """Patches ``model.forward`` so that ``model(..., labels=labels, fastdpo=request)`` runs fastdpo's head.

    Without ``fastdpo=`` the previous forward runs unchanged (generation, TRL's own fused head). The patch
    sits on the transformers model itself (under any PEFT or DDP wrapper, which pass the keyword through),
    so the loss is computed inside whichever wrapper's forward the trainer calls. Idempotent.

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
    def forward(self: nn.Module, *args: Any, fastdpo: _Request | None = None, **kwargs: Any) -> Any:
        if fastdpo is None:
            return previous_forward(*args, **kwargs)
        return _fused_forward(self, backbone_attr, fastdpo, args, kwargs)

    model.forward = types.MethodType(forward, model)
    model._fastdpo_head_installed = True


def _gathered_mean(accelerator: Any, values: torch.Tensor) -> float:
    return accelerator.gather(values).mean().item()


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` (TRL 1.16.x) with fastdpo's fused lm_head + DPO loss doing the work.

    Takes the same arguments as ``trl.DPOTrainer``, plus the keyword-only options below. On the same batch
    the loss, gradients and metrics equal the stock trainer's for every TRL 1.16 loss type, loss-type
    combination (``loss_weights``), ``ld_alpha`` and ``f_divergence_type``; the per-token log-probs come
    from fastdpo's kernels instead of TRL's chunked head.

    Distributed data parallel: the loss is computed *inside* the forward of the model the Trainer hands to
    ``compute_loss`` (the DDP wrapper in multi-process runs). The trainer calls
    ``model(**batch, labels=labels, fastdpo=request)``; the patched forward of the underlying transformers
    model runs the backbone and ``FusedLinearDPOLoss`` on the last hidden states and lm_head weight, and
    returns the scalar loss among its outputs. So ``DistributedDataParallel.forward`` runs and arms its
    reducer for this backward, and with ``find_unused_parameters`` DDP's graph walk from the outputs
    reaches lm_head through the loss. The loss is an ordinary ``torch.autograd.Function`` node (no
    ``torch.func`` transform, which cannot run inside DDP's forward), so the gradients of hidden states and
    lm_head flow through autograd and DDP's per-parameter hooks all-reduce them as usual. A loss run on the
    unwrapped module, outside DDP's forward, silently skips that all-reduce: the failure of Liger's DPO
    loss inside TRL (huggingface/trl#7245), which the DDP test reproduces as its negative control.

    Args:
        *args: Positional arguments of ``trl.DPOTrainer``.
        rpo_alpha: Adds ``rpo_alpha`` times the token-mean NLL of the chosen responses (RPO); logged as
            ``nll_loss``. TRL 1.16's ``DPOConfig`` no longer has it.
        reference_free: Use zero reference log-probs: no reference forward is run, and a reference model
            that TRL built or was given is dropped. TRL 1.16's ``DPOConfig`` no longer has it.
        logit_metrics: Log TRL's ``entropy``, ``logits/chosen``, ``logits/rejected`` and
            ``mean_token_accuracy``. fastdpo's kernels do not produce these, so they cost one extra
            no-grad lm_head product over the completion tokens; ``False`` skips it and omits those metrics.
        backend: fastdpo backend, ``"triton"``, ``"torch"`` or None (triton on CUDA, else torch; or
            ``FASTDPO_BACKEND``).
        filter_eps: Backward gradient filtering of the triton backend (see ``fastdpo.linear_logprobs``).
        **kwargs: Keyword arguments of ``trl.DPOTrainer``.

    Raises:
        RuntimeError: The installed trl is not 1.16.x.
        ValueError: A configuration fastdpo cannot run: ``use_weighting`` (WPO), DeepSpeed ZeRO-3, or a
            loss type outside TRL 1.16's.
    """

    _tag_names = [*DPOTrainer._tag_names, "fastdpo"]

    def __init__(
        self,
        *args: Any,
        rpo_alpha: float | None = None,
        reference_free: bool = False,
        logit_metrics: bool = True,
        backend: str | None = None,
        filter_eps: float | str | None = "auto",
        **kwargs: Any,
    ) -> None:
        check_trl_version()
        if backend not in (None, "triton", "torch"):
            raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
        # Set before TRL's __init__, which may precompute reference log-probs through compute_ref_log_probs.
        self.rpo_alpha = rpo_alpha
        self.reference_free = bool(reference_free)
        self.logit_metrics = bool(logit_metrics)
        self.fastdpo_backend = backend
        super().__init__(*args, **kwargs)

        if self.use_weighting:
            raise ValueError(
                "use_weighting=True (WPO) is not supported by FastDPOTrainer: its weights need log(sum p^2) "
                "per token, which fastdpo's kernels do not compute; use trl.DPOTrainer for WPO"
            )
        if is_deepspeed_zero3_enabled():
            raise ValueError(
                "DeepSpeed ZeRO-3 is not supported by FastDPOTrainer: the fused loss's backward reads the "
                "full lm_head weight, which ZeRO-3 keeps partitioned outside lm_head's own forward; use "
                "ZeRO-1/2, or trl.DPOTrainer"
            )
        unknown = [t for t in self.loss_types if t not in TRL_LOSS_TYPES]
        if unknown:
            raise ValueError(
                f"unknown loss_type {unknown}; expected TRL 1.16 DPO loss types {list(TRL_LOSS_TYPES)}"
            )
        _, softcap = _logit_transform(self.model.config.get_text_config())
        self.fastdpo_loss = FusedLinearDPOLoss(
            beta=self.beta,
            loss_type=list(self.loss_types),
            loss_weights=list(self.loss_weights),
            label_smoothing=self.label_smoothing,
            rpo_alpha=rpo_alpha,
            ld_alpha=self.ld_alpha,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
            discopop_tau=self.args.discopop_tau,
            reference_free=self.reference_free,
            softcap=softcap,
            filter_eps=filter_eps,
            backend=backend,
        )
        if self.reference_free:
            self.ref_model = None
        _install_fused_head(self._head_owner(self.model))

    def _head_owner(self, model: nn.Module) -> nn.Module:
        """The transformers model under any DDP / DeepSpeed / PEFT wrapper: where the forward is patched."""
        unwrapped = self.accelerator.unwrap_model(model)
        return unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped

    def compute_ref_log_probs(
        self, model: nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen_logps [B], rejected_logps [B])`` of one padded batch, from fastdpo's kernels.

        Same contract as TRL's: ``model`` is the reference model, or the policy itself, whose PEFT adapters
        are then disabled (or the ``"ref"`` adapter selected). Also used to precompute reference log-probs.
        """
        _install_fused_head(self._head_owner(model))
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(
                unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None
            )
        request = _Request(ld_alpha=self.ld_alpha, backend=self.fastdpo_backend)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            outputs = model(**model_kwargs, labels=labels, fastdpo=request)
        return outputs.chosen_logps, outputs.rejected_logps

    def _compute_loss(
        self, model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """TRL's ``_compute_loss`` with fastdpo's forward and loss; TRL's metrics, gathered as TRL does."""
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)

        ref_chosen_logps = ref_rejected_logps = None
        if self.precompute_ref_logps and not self.reference_free:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        elif not self.reference_free:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_chosen_logps, ref_rejected_logps = self.compute_ref_log_probs(ref_model, inputs)

        request = _Request(
            loss_fn=self.fastdpo_loss,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            logit_metrics=self.logit_metrics,
        )
        # `model` is what the Trainer wraps (DDP in multi-process runs): calling it, rather than the unwrapped
        # module, is what keeps DDP's gradient all-reduce armed for this backward.
        outputs = model(**model_kwargs, labels=labels, fastdpo=request)
        loss = outputs.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item()
            )
        self._log_metrics(mode, inputs, outputs)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode: str, inputs: Mapping[str, Any], outputs: FastDPOModelOutput) -> None:
        """Appends TRL's metrics for one batch, gathered across processes exactly as TRL 1.16 gathers them."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        shift_completion_mask = inputs["completion_mask"][..., 1:]
        seq_len = shift_completion_mask.size(1)
        chosen_mask, rejected_mask = shift_completion_mask.chunk(2, dim=0)

        if outputs.entropy is not None:
            entropy_sum = (outputs.entropy[:, -seq_len:] * shift_completion_mask).sum()
            total_tokens = acc.gather_for_metrics(shift_completion_mask.sum()).sum()
            entropy_sum = acc.gather_for_metrics(entropy_sum).sum()
            metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)

        if mode == "train":
            num_tokens = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        if outputs.mean_logits is not None:
            chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2, dim=0)
            for name, logits, mask in (
                ("chosen", chosen_logits, chosen_mask),
                ("rejected", rejected_logits, rejected_mask),
            ):
                total = acc.gather_for_metrics(logits[mask.bool()].sum()).sum().item()
                count = acc.gather_for_metrics(mask.sum()).sum().item()
                metrics[f"logits/{name}"].append(total / count if count > 0 else 0.0)
            chosen_is_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)
            correct = acc.gather_for_metrics((chosen_is_top1 & chosen_mask.bool()).sum()).sum()
            count = acc.gather_for_metrics(chosen_mask.sum()).sum()
            metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        chosen_rewards, rejected_rewards = outputs.chosen_rewards, outputs.rejected_rewards
        metrics["rewards/chosen"].append(_gathered_mean(acc, chosen_rewards))
        metrics["rewards/rejected"].append(_gathered_mean(acc, rejected_rewards))
        metrics["rewards/accuracies"].append(_gathered_mean(acc, (chosen_rewards > rejected_rewards).float()))
        metrics["rewards/margins"].append(_gathered_mean(acc, chosen_rewards - rejected_rewards))
        metrics["logps/chosen"].append(_gathered_mean(acc, outputs.chosen_logps))
        metrics["logps/rejected"].append(_gathered_mean(acc, outputs.rejected_logps))
        if self.rpo_alpha is not None and outputs.nll_loss is not None:
            metrics["nll_loss"].append(acc.gather_for_metrics(outputs.nll_loss.reshape(1)).mean().item())
