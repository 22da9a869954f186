"""``FastDPOTrainer``: a ``trl.DPOTrainer`` whose loss runs on fastdpo's fused kernels.

What changes against the stock trainer: the policy forward returns the backbone's last hidden states to
``fastdpo.losses.FusedLinearDPOLoss`` (lm_head + log-softmax + gather + DPO loss in one autograd node,
no ``[N, V]`` logits), and the reference log-probs come from ``fastdpo.losses.sequence_logps``. Data
collation, reference handling (``ref_model``, ``precompute_ref_log_probs``, PEFT adapters disabled), the
metric names and their cross-process gathering are TRL's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from fastdpo.integrations.trl.common import (
    HeadInputs,
    check_not_zero3,
    check_trainer_options,
    completion_labels,
    gathered_mean,
    head_impl,
    head_owner,
    install_fused_head,
    log_token_metrics,
    logit_transform,
    model_inputs,
    policy_loss,
    ref_adapter,
    token_stats_grid,
)
from fastdpo.losses import FusedLinearDPOLoss, PreferenceLossOutput, sequence_logps

__all__ = ["TRL_LOSS_TYPES", "FastDPOModelOutput", "FastDPOTrainer"]

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

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})


@dataclass
class FastDPOModelOutput(ModelOutput):
    """What the model's forward returns when called with a DPO ``fastdpo=`` request.

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
    """What the patched forward does with the head's inputs: the policy loss, or reference log-probs."""

    loss_fn: FusedLinearDPOLoss | None = None
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    ld_alpha: float | None = None
    backend: str | None = None
    impl: str | None = None

    def __call__(self, head: HeadInputs) -> FastDPOModelOutput:
        if self.loss_fn is None:
            with torch.no_grad():
                chosen, rejected = sequence_logps(
                    head.hidden,
                    head.weight,
                    head.targets,
                    head.bias,
                    ld_alpha=self.ld_alpha,
                    softcap=head.softcap,
                    backend=self.backend,
                    impl=self.impl,
                )
            return FastDPOModelOutput(chosen_logps=chosen, rejected_logps=rejected)

        result: PreferenceLossOutput = self.loss_fn(
            head.hidden,
            head.weight,
            head.targets,
            head.bias,
            ref_chosen_logps=self.ref_chosen_logps,
            ref_rejected_logps=self.ref_rejected_logps,
        )
        per_token = token_stats_grid(
            head.targets,
            result.token_stats,
            (("entropy", "entropy"), ("mean_logits", "mean_logit"), ("is_top1", "is_argmax")),
        )
        # Built in one go: ModelOutput keeps only the fields given at construction in its dict, and the dict
        # is what DDP searches for the loss.
        return FastDPOModelOutput(
            loss=result.loss,
            chosen_logps=result.chosen_logps,
            rejected_logps=result.rejected_logps,
            chosen_rewards=result.chosen_rewards,
            rejected_rewards=result.rejected_rewards,
            nll_loss=result.metrics.get("nll_loss"),
            aux_loss=head.aux_loss,
            **per_token,
        )


class FastDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` (TRL 1.16.x) with fastdpo's fused lm_head + DPO loss doing the work.

    Takes the same arguments as ``trl.DPOTrainer``, plus the keyword-only options below. On the same batch
    the loss, gradients and metrics equal the stock trainer's for every TRL 1.16 loss type, loss-type
    combination (``loss_weights``), ``ld_alpha``, ``f_divergence_type`` and WPO (``use_weighting``), also
    under bf16 autocast (the head casts inside, sums in fp32 and returns fp32 gradients, as TRL's chunked
    head does); the per-token log-probs and TRL's logit statistics come from fastdpo's kernels, in one
    pass over the vocabulary, instead of TRL's chunked head.

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
            ``mean_token_accuracy``, computed by the loss's own pass over the vocabulary (no extra lm_head
            product); ``False`` omits those metrics.
        backend: fastdpo backend, ``"triton"``, ``"torch"`` or None (triton on CUDA, else torch; or
            ``FASTDPO_BACKEND``).
        impl: fastdpo head implementation, ``"fused"``, ``"chunked"`` or None. None picks ``"chunked"``
            under TRL's ``full_determinism`` (bitwise reproducible), else ``resolve_impl``'s choice (see
            ``fastdpo.linear_logprobs``).
        filter_eps: Backward gradient filtering of the triton backend (see ``fastdpo.linear_logprobs``).
        **kwargs: Keyword arguments of ``trl.DPOTrainer``.

    Raises:
        RuntimeError: The installed trl is not 1.16.x.
        ValueError: A configuration fastdpo cannot run: DeepSpeed ZeRO-3, or a loss type outside TRL
            1.16's.
    """

    _tag_names = [*DPOTrainer._tag_names, "fastdpo"]

    def __init__(
        self,
        *args: Any,
        rpo_alpha: float | None = None,
        reference_free: bool = False,
        logit_metrics: bool = True,
        backend: str | None = None,
        impl: str | None = None,
        filter_eps: float | str | None = "auto",
        **kwargs: Any,
    ) -> None:
        check_trainer_options(backend, impl)
        # Set before TRL's __init__, which may precompute reference log-probs through compute_ref_log_probs.
        self.rpo_alpha = rpo_alpha
        self.reference_free = bool(reference_free)
        self.logit_metrics = bool(logit_metrics)
        self.fastdpo_backend = backend
        self.fastdpo_impl = impl
        super().__init__(*args, **kwargs)

        check_not_zero3("FastDPOTrainer", "trl.DPOTrainer")
        unknown = [t for t in self.loss_types if t not in TRL_LOSS_TYPES]
        if unknown:
            raise ValueError(
                f"unknown loss_type {unknown}; expected TRL 1.16 DPO loss types {list(TRL_LOSS_TYPES)}"
            )
        _, softcap = logit_transform(self.model.config.get_text_config())
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
            use_weighting=self.use_weighting,
            stats=self.logit_metrics,
            softcap=softcap,
            filter_eps=filter_eps,
            backend=backend,
            impl=self._head_impl(),
        )
        if self.reference_free:
            self.ref_model = None
        install_fused_head(head_owner(self.accelerator, self.model))

    def _head_impl(self) -> str | None:
        """The head impl asked for, else ``"chunked"`` under ``full_determinism`` (bitwise reproducible)."""
        return head_impl(self.fastdpo_impl, self.args)

    def compute_ref_log_probs(
        self, model: nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(chosen_logps [B], rejected_logps [B])`` of one padded batch, from fastdpo's kernels.

        Same contract as TRL's: ``model`` is the reference model, or the policy itself, whose PEFT adapters
        are then disabled (or the ``"ref"`` adapter selected). Also used to precompute reference log-probs.
        """
        install_fused_head(head_owner(self.accelerator, model))
        model_kwargs = model_inputs(inputs, _NON_MODEL_KEYS)
        labels = completion_labels(inputs["input_ids"], inputs["completion_mask"])
        request = _Request(ld_alpha=self.ld_alpha, backend=self.fastdpo_backend, impl=self._head_impl())
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            ref_adapter(self),
            self.accelerator.autocast(),
        ):
            outputs = model(**model_kwargs, labels=labels, fastdpo=request)
        return outputs.chosen_logps, outputs.rejected_logps

    def _compute_loss(
        self, model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """TRL's ``_compute_loss`` with fastdpo's forward and loss; TRL's metrics, gathered as TRL does."""
        mode = "train" if self.model.training else "eval"
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
        )
        loss, outputs, model_kwargs = policy_loss(self, model, mode, inputs, _NON_MODEL_KEYS, request)
        self._log_metrics(mode, inputs, outputs)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _log_metrics(self, mode: str, inputs: Mapping[str, Any], outputs: FastDPOModelOutput) -> None:
        """Appends TRL's metrics for one batch, gathered across processes exactly as TRL 1.16 gathers them."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        shift_completion_mask = log_token_metrics(self, mode, inputs, outputs.entropy)
        seq_len = shift_completion_mask.size(1)
        chosen_mask, rejected_mask = shift_completion_mask.chunk(2, dim=0)

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
        metrics["rewards/chosen"].append(gathered_mean(acc, chosen_rewards))
        metrics["rewards/rejected"].append(gathered_mean(acc, rejected_rewards))
        metrics["rewards/accuracies"].append(gathered_mean(acc, (chosen_rewards > rejected_rewards).float()))
        metrics["rewards/margins"].append(gathered_mean(acc, chosen_rewards - rejected_rewards))
        metrics["logps/chosen"].append(gathered_mean(acc, outputs.chosen_logps))
        metrics["logps/rejected"].append(gathered_mean(acc, outputs.rejected_logps))
        if self.rpo_alpha is not None and outputs.nll_loss is not None:
            metrics["nll_loss"].append(acc.gather_for_metrics(outputs.nll_loss.reshape(1)).mean().item())
