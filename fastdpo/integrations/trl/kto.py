"""``FastKTOTrainer``: a ``trl.KTOTrainer`` whose loss runs on fastdpo's fused kernels.

What changes against the stock trainer: the policy forward returns the backbone's last hidden states to
``fastdpo.losses.FusedLinearKTOLoss`` (lm_head + log-softmax + gather + KTO loss in one autograd node, no
``[N, V]`` logits); the KL completions' policy log-probs and every reference log-prob come from the same
kernels without grad. Data collation (the mismatched KL completions), reference handling (``ref_model``,
``precompute_ref_log_probs``, PEFT adapters disabled), the KL estimate (gathered across processes, clamped
at 0), the metric names and their cross-process gathering are TRL's own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput
from trl import KTOTrainer
from trl.models.utils import disable_gradient_checkpointing

from fastdpo.integrations.trl.common import (
    HeadInputs,
    check_not_zero3,
    check_trainer_options,
    completion_labels,
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
from fastdpo.losses.kto import KTO_LOSS_TYPES, FusedLinearKTOLoss, KTOLossOutput

__all__ = ["FastKTOModelOutput", "FastKTOTrainer"]

logger = logging.getLogger(__name__)

# Batch keys that are not model inputs, as TRL 1.16's KTOTrainer lists them.
_NON_MODEL_KEYS = frozenset(
    {
        "completion_mask",
        "KL_input_ids",
        "KL_attention_mask",
        "KL_completion_mask",
        "KL_token_type_ids",
        "KL_mm_token_type_ids",
        "label",
        "ref_logps",
        "ref_KL_logps",
    }
)


@dataclass
class FastKTOModelOutput(ModelOutput):
    """What the model's forward returns when called with a KTO ``fastdpo=`` request.

    A ``ModelOutput`` (a dict) so that DDP finds ``loss`` among the outputs. Per-token fields are
    ``[S, T - 1]`` (aligned with TRL's shifted completion mask), zero where the label is ignored, and None
    unless logit metrics were asked for.

    Attributes:
        loss: scalar KTO loss (policy forward only).
        logps: ``[S]`` summed completion log-probs, detached.
        rewards: ``[S]`` ``beta * (logps - ref_logps)``, detached (policy forward only).
        entropy: per-token entropy of the next-token distribution.
        mean_logits: per-token mean logit over the vocabulary.
        aux_loss: MoE load-balancing loss, when router logits were requested.
    """

    loss: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class _Request:
    """What the patched forward does with the head's inputs: the policy loss, or sequence log-probs."""

    loss_fn: FusedLinearKTOLoss
    preference_labels: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    kl: torch.Tensor | None = None

    def __call__(self, head: HeadInputs) -> FastKTOModelOutput:
        if self.preference_labels is None:
            logps = self.loss_fn.sequence_logps(head.hidden, head.weight, head.targets, head.bias)
            return FastKTOModelOutput(logps=logps)
        result: KTOLossOutput = self.loss_fn(
            head.hidden,
            head.weight,
            head.targets,
            head.bias,
            preference_labels=self.preference_labels,
            ref_logps=self.ref_logps,
            kl=self.kl,
        )
        per_token = token_stats_grid(
            head.targets, result.token_stats, (("entropy", "entropy"), ("mean_logits", "mean_logit"))
        )
        # Built in one go: ModelOutput keeps only the fields given at construction in its dict, and the dict
        # is what DDP searches for the loss.
        return FastKTOModelOutput(
            loss=result.loss, logps=result.logps, rewards=result.rewards, aux_loss=head.aux_loss, **per_token
        )


class FastKTOTrainer(KTOTrainer):
    """``trl.KTOTrainer`` (TRL 1.16.x) with fastdpo's fused lm_head + KTO loss doing the work.

    Takes the same arguments as ``trl.KTOTrainer``, plus the keyword-only options below. On the same batch
    the loss, gradients and metrics equal the stock trainer's for ``kto`` and ``apo_zero_unpaired``, with
    ``desirable_weight`` / ``undesirable_weight``, a reference model, precomputed reference log-probs, a
    PEFT model whose disabled adapters are the reference, gradient checkpointing and DDP. The per-token
    log-probs and TRL's logit statistics come from fastdpo's kernels, in one pass over the vocabulary,
    instead of TRL's chunked head; under bf16 autocast the head casts inside, sums in fp32 and returns fp32
    gradients, as TRL's chunked head does.

    As in ``FastDPOTrainer``, the loss is computed inside the forward of the model the Trainer hands to
    ``compute_loss`` (the DDP wrapper in multi-process runs), so DDP's gradient all-reduce stays armed.
    The KL term is TRL's: ``mean(KL_logps - ref_KL_logps)`` over the batch's mismatched completions,
    averaged over processes with ``gather_for_metrics`` and clamped at 0, then handed to the loss as a
    detached scalar; as TRL's, it is non-finite when a KL completion's log-prob is (a warning counts
    them). One departure: TRL averages the losses with ``nanmean``, which drops a sequence whose
    log-prob is NaN; here such a sequence makes the loss NaN, so non-finite inputs are never hidden.

    Args:
        *args: Positional arguments of ``trl.KTOTrainer``.
        logit_metrics: Log TRL's ``entropy``, ``logits/chosen`` and ``logits/rejected``, computed by the
            loss's own pass over the vocabulary (no extra lm_head product); ``False`` omits those metrics.
        backend: fastdpo backend, ``"triton"``, ``"torch"`` or None (triton on CUDA, else torch; or
            ``FASTDPO_BACKEND``).
        impl: fastdpo head implementation, ``"fused"``, ``"chunked"`` or None. None picks ``"chunked"``
            under TRL's ``full_determinism`` (bitwise reproducible), else ``resolve_impl``'s choice.
        filter_eps: Backward gradient filtering of the triton backend (see ``fastdpo.linear_logprobs``).
        **kwargs: Keyword arguments of ``trl.KTOTrainer``.

    Raises:
        RuntimeError: The installed trl is not 1.16.x.
        ValueError: A configuration fastdpo cannot run: DeepSpeed ZeRO-3, a vision dataset, or a loss type
            outside ``kto`` / ``apo_zero_unpaired``.
    """

    _tag_names = [*KTOTrainer._tag_names, "fastdpo"]

    def __init__(
        self,
        *args: Any,
        logit_metrics: bool = True,
        backend: str | None = None,
        impl: str | None = None,
        filter_eps: float | str | None = "auto",
        **kwargs: Any,
    ) -> None:
        check_trainer_options(backend, impl)
        # Set before TRL's __init__, which may precompute reference log-probs through compute_ref_log_probs.
        self.logit_metrics = bool(logit_metrics)
        self.fastdpo_backend = backend
        self.fastdpo_impl = impl
        self.fastdpo_filter_eps = filter_eps
        super().__init__(*args, **kwargs)

        check_not_zero3("FastKTOTrainer", "trl.KTOTrainer")
        if self._is_vision_dataset:
            raise ValueError(
                "vision datasets are not supported by FastKTOTrainer: fastdpo's head scores text-only "
                "batches; use trl.KTOTrainer for vision-language KTO"
            )
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(
                f"unknown loss_type {self.loss_type!r}; expected a TRL 1.16 KTO loss type "
                f"{list(KTO_LOSS_TYPES)}"
            )
        self.fastdpo_loss = self._kto_loss(self.model, stats=self.logit_metrics)
        install_fused_head(head_owner(self.accelerator, self.model))

    def _kto_loss(self, model: nn.Module, stats: bool = False) -> FusedLinearKTOLoss:
        """The fused loss with this trainer's settings and the model's final-logit soft-capping."""
        _, softcap = logit_transform(model.config.get_text_config())
        return FusedLinearKTOLoss(
            beta=self.beta,
            loss_type=self.loss_type,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
            backend=self.fastdpo_backend,
            softcap=softcap,
            filter_eps=self.fastdpo_filter_eps,
            impl=head_impl(self.fastdpo_impl, self.args),
            stats=stats,
        )

    def _scored_logps(
        self, model: nn.Module, inputs: Mapping[str, Any], prefix: str, model_kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """``[S]`` summed completion log-probs of ``{prefix}input_ids`` under ``model``, without grad."""
        labels = completion_labels(inputs[f"{prefix}input_ids"], inputs[f"{prefix}completion_mask"])
        request = _Request(loss_fn=self._kto_loss(head_owner(self.accelerator, model)))
        with torch.no_grad():
            return model(**model_kwargs, labels=labels, fastdpo=request).logps

    def _kl_model_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The KL completions' model inputs, built as TRL's ``_compute_kl_logps`` builds them."""
        kwargs = model_inputs(inputs, _NON_MODEL_KEYS | {"input_ids", "attention_mask"})
        kwargs["input_ids"] = inputs["KL_input_ids"]
        kwargs["attention_mask"] = inputs["KL_attention_mask"]
        return kwargs

    def compute_ref_log_probs(
        self, model: nn.Module, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference ``(logps [S], KL_logps [S] or None)`` of one padded batch, from fastdpo's kernels.

        Same contract as TRL's: ``model`` is the reference model, or the policy itself, whose PEFT adapters
        are then disabled (or the ``"ref"`` adapter selected). Also used to precompute reference log-probs.
        """
        install_fused_head(head_owner(self.accelerator, model))
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            ref_adapter(self),
            self.accelerator.autocast(),
        ):
            logps = self._scored_logps(model, inputs, "", model_inputs(inputs, _NON_MODEL_KEYS))
            kl_logps = None
            if self.calculate_KL:
                kl_logps = self._scored_logps(model, inputs, "KL_", self._kl_model_inputs(inputs))
        return logps, kl_logps

    def _compute_loss(
        self, model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """TRL's ``_compute_loss`` with fastdpo's forward and loss; TRL's metrics, gathered as TRL does."""
        mode = "train" if self.model.training else "eval"
        acc = self.accelerator
        inputs = {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(inputs["label"], dtype=torch.bool, device=acc.device)

        kl_logps = None
        if self.calculate_KL:
            kl_logps = self._scored_logps(model, inputs, "KL_", self._kl_model_inputs(inputs))
        if self.precompute_ref_logps:
            ref_logps, ref_kl_logps = inputs["ref_logps"], inputs.get("ref_KL_logps")
        else:
            ref_model = self.ref_model if self.ref_model is not None else self.model
            ref_logps, ref_kl_logps = self.compute_ref_log_probs(ref_model, inputs)
        kl = torch.zeros((), device=acc.device)
        if self.calculate_KL:
            kl = self._kl_term(kl_logps, ref_kl_logps)

        request = _Request(
            loss_fn=self.fastdpo_loss,
            preference_labels=desirable,
            ref_logps=ref_logps.float(),
            kl=kl if self.calculate_KL else None,
        )
        loss, outputs, model_kwargs = policy_loss(self, model, mode, inputs, _NON_MODEL_KEYS, request)
        self._log_metrics(mode, inputs, outputs, desirable, kl)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _kl_term(self, kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
        """TRL's KL term: ``mean(KL_logps - ref_KL_logps)``, averaged over processes, clamped at 0.

        As TRL's, a plain mean: a KL completion whose log-prob is non-finite (e.g. an fp16 overflow) makes
        the term non-finite, and with it the loss, exactly as in ``trl.KTOTrainer`` (whose ``nanmean`` is
        over the losses, not the KL term). Such completions are counted over all processes and reported in
        a warning, so a non-finite step is never silent.
        """
        acc = self.accelerator
        diff = (kl_logps - ref_kl_logps).detach()
        kl = acc.gather_for_metrics(diff.mean()).mean().clamp(min=0)
        non_finite = int(acc.gather_for_metrics((~diff.isfinite()).sum()).sum().item())
        if non_finite:
            total = int(acc.gather_for_metrics(torch.tensor(diff.numel(), device=diff.device)).sum().item())
            logger.warning(
                "%d of %d KL completions have a non-finite policy or reference log-prob; the KL term is %s, "
                "as trl.KTOTrainer's is, so this batch's loss is not finite",
                non_finite,
                total,
                kl.item(),
            )
        return kl

    def _log_metrics(
        self,
        mode: str,
        inputs: Mapping[str, Any],
        outputs: FastKTOModelOutput,
        desirable: torch.Tensor,
        kl: torch.Tensor,
    ) -> None:
        """Appends TRL's KTO metrics for one batch, gathered across processes exactly as TRL 1.16 does."""
        acc = self.accelerator
        metrics = self._metrics[mode]
        metrics["kl"].append(kl.item())
        shift_completion_mask = log_token_metrics(self, mode, inputs, outputs.entropy)
        seq_len = shift_completion_mask.size(1)

        groups = (("chosen", desirable), ("rejected", ~desirable))
        if outputs.mean_logits is not None:
            mean_logits = outputs.mean_logits[:, -seq_len:]
            for name, rows in groups:
                mask = shift_completion_mask[rows]
                total = acc.gather_for_metrics(mean_logits[rows][mask.bool()].sum()).sum().item()
                count = acc.gather_for_metrics(mask.sum()).sum().item()
                if count > 0:
                    metrics[f"logits/{name}"].append(total / count)

        counts = {}
        for name, rows in groups:
            counts[name] = acc.gather_for_metrics(rows.sum()).sum().item()
            if counts[name] > 0:
                for key, values in (("rewards", outputs.rewards), ("logps", outputs.logps)):
                    total = acc.gather_for_metrics(values[rows].nansum()).nansum().item()
                    metrics[f"{key}/{name}"].append(total / counts[name])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
