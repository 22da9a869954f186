"""The pairwise (DPO-family) fused loss: lm_head + log-softmax + gather + pair loss, without a token graph.

Dimension letters: B pairs, N tokens, M valid tokens, D hidden, V vocab.

``FusedLinearDPOLoss`` (and its functional twin ``fused_linear_dpo_loss``) takes final hidden states and the
lm_head weight and never materializes ``[N, V]`` logits: the shared Function (``fused.py``) computes the
per-token log-probs; here they are reduced to sequence log-probs and turned into the pair losses
(``fastdpo.ops.preference_loss``, one kernel launch) and per-token loss coefficients.

Loss types carry TRL 1.16's ``DPOTrainer`` names and formulas; ``simpo`` follows TRL's CPO trainer
(``loss_type="simpo"``) and ``orpo`` TRL's ORPO trainer. Sequence numbering follows ``fastdpo.packing``:
chosen of pair ``j`` is ``j``, rejected is ``B + j``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fastdpo.losses.dpo_pairs import pair_loss, pair_tokens, stat_metrics
from fastdpo.losses.dpo_spec import (
    LOSS_TYPES,
    LossTypeInfo,
    build_spec,
    check_ld_alpha,
    check_ref_logps,
    check_reference_args,
    length_reasons,
)
from fastdpo.losses.fused import fused_head_loss, head_options, scored_logps
from fastdpo.losses.tokens import Tokens, check_linear, check_tensor
from fastdpo.ops.linear_logprobs import TokenStats
from fastdpo.packing import IGNORE_INDEX

__all__ = [
    "LOSS_TYPES",
    "LossTypeInfo",
    "PreferenceLossOutput",
    "FusedLinearDPOLoss",
    "fused_linear_dpo_loss",
    "sequence_logps",
]


@dataclass
class PreferenceLossOutput:
    """Result of the fused preference loss; every tensor but ``loss`` is detached fp32.

    Attributes:
        loss: scalar training loss (differentiable w.r.t. hidden, weight, bias).
        losses: ``[B]`` per-pair loss (weighted over the pair loss types, without the NLL terms).
        chosen_logps: ``[B]`` scored policy log-probs of the chosen responses (summed, or averaged /
            LD-weighted as configured).
        rejected_logps: ``[B]`` same for the rejected responses.
        ref_chosen_logps: ``[B]`` reference log-probs used (zeros when reference-free).
        ref_rejected_logps: ``[B]``.
        chosen_rewards: ``[B]`` ``beta * (chosen_logps - ref_chosen_logps)``.
        rejected_rewards: ``[B]``.
        metrics: 0-dim tensors under TRL's names (``rewards/chosen``, ``rewards/rejected``,
            ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``; ``nll_loss``
            with an NLL term; ``log_odds_ratio`` and ``log_odds_chosen`` for ORPO; with ``stats=True``
            ``entropy`` (over all scored tokens), ``logits/chosen``, ``logits/rejected`` (mean logit over
            the chosen / rejected tokens) and ``mean_token_accuracy`` (chosen tokens whose label is the
            argmax), each 0 without tokens). Batch means, unsynced.
        token_stats: with ``stats=True``, the scored tokens' ``TokenStats`` (entropy, mean logit, label is
            argmax, ``log sum p^2``), ``[M]`` each, in the row-major order of the labels that are not
            ``ignore_index``; None otherwise.
        pair_metrics: with ``stats=True``, ``[B]`` per-pair ``entropy`` (mean over the pair's scored
            tokens) and ``mean_token_accuracy`` (over its chosen tokens), for averages over pairs that do
            not depend on how pairs were batched; empty otherwise.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    token_stats: TokenStats | None = None
    pair_metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class FusedLinearDPOLoss(nn.Module):
    """TRL's DPO-family losses fused with lm_head: ``loss(log_softmax(hidden @ weight.T + bias)[labels])``.

    Takes final hidden states instead of logits: the ``[N, V]`` logits are never materialized and no
    per-token autograd graph is built; gradients reach ``hidden``, ``weight`` and ``bias``.

    Layouts: padded ``hidden [2B, T, D]`` / ``labels [2B, T]`` (rows ``0..B-1`` chosen, ``B..2B-1`` rejected;
    labels aligned with hidden, i.e. already shifted) or packed ``hidden [N, D]`` / ``labels [N]`` with
    ``seq_index [N]`` and ``num_pairs`` (as in ``fastdpo.packing.PackedBatch``). Both give identical numbers.

    Under ``torch.autocast``, hidden, weight, bias and the reference tensors may come in any float dtype
    (e.g. fp32 masters): the products run in the autocast dtype, chunk by chunk inside the head, sums run
    in fp32, and the gradients come back in the dtypes passed (as TRL 1.16's chunked head does). Outside
    autocast, hidden, weight and bias must share a dtype. NaN or Inf in the used inputs propagates to the
    loss. A fully masked response has log-prob 0 (TRL), except for the loss types
    that divide by its length (``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo``, ``average_log_prob``), which
    raise ``ValueError``.

    Args:
        beta: DPO beta (IPO's tau; SimPO's and ORPO's beta).
        loss_type: a name from ``LOSS_TYPES`` or a list of them, combined with ``loss_weights``. All TRL 1.16
            DPO types (``aot``/``aot_unpaired`` sort across the batch and run on the torch path, ``sft`` is a
            token-level NLL; the rest run in one Triton launch), plus ``simpo`` (TRL CPO's SimPO: averaged
            log-probs, ``simpo_gamma`` margin, no reference) and ``orpo`` (TRL ORPO: averaged log-probs, odds
            ratio term plus the chosen NLL; TRL's ORPO trainer also counts prompt tokens in that NLL, here it
            covers the chosen tokens whose labels are set).
        label_smoothing: robust (in [0, 0.5)), exo_pair (in (0, 1)), aot and simpo smoothing.
        ignore_index: label marking tokens without loss.
        loss_weights: one weight per loss type (default all 1.0).
        rpo_alpha: adds ``rpo_alpha * NLL``, the token mean of ``-logp`` over all chosen tokens (RPO).
        ld_alpha: LD-DPO: response tokens past ``min(len_chosen, len_rejected)`` count with this weight.
        f_divergence_type: ``reverse_kl``, ``forward_kl``, ``js_divergence`` or ``alpha_divergence`` (TRL's
            f-DPO; only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft).
        f_alpha_divergence_coef: alpha of ``alpha_divergence``.
        discopop_tau: DiscoPOP temperature.
        simpo_gamma: SimPO target reward margin.
        average_log_prob: score the per-token mean instead of the sum of log-probs.
        reference_free: use zero reference log-probs.
        use_weighting: WPO (TRL's ``use_weighting``): each pair's loss is weighted by
            ``w_chosen * w_rejected``, ``w = exp(mean over the response's tokens of logp - log sum p^2)``,
            without gradient. Not with ``aot``, ``aot_unpaired``, ``simpo`` or ``orpo``.
        stats: also compute, in the same pass over the vocabulary, each scored token's entropy, mean logit,
            whether its label is the argmax and ``log sum p^2``: returned in ``token_stats`` and as TRL's
            ``entropy``, ``logits/*`` and ``mean_token_accuracy`` metrics. Off, they are not computed.
        temperature: divides the logits.
        softcap: final-logit soft-capping (Gemma-2), or None.
        filter_eps: backward gradient filtering of the triton backend (see ``linear_logprobs``).
        backend: ``"triton"``, ``"torch"`` or None (by device, or ``FASTDPO_BACKEND``).
        impl: ``"fused"``, ``"chunked"`` or None (``fastdpo.ops.linear_logprobs.resolve_impl``: chunked
            under ``torch.use_deterministic_algorithms(True)``, else ``FASTDPO_IMPL``, else chunked); see
            ``linear_logprobs``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
        *,
        loss_weights: Sequence[float] | None = None,
        rpo_alpha: float | None = None,
        ld_alpha: float | None = None,
        f_divergence_type: str = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        discopop_tau: float = 0.05,
        simpo_gamma: float = 0.5,
        average_log_prob: bool = False,
        reference_free: bool = False,
        use_weighting: bool = False,
        stats: bool = False,
        temperature: float = 1.0,
        softcap: float | None = None,
        filter_eps: float | str | None = "auto",
        backend: str | None = None,
        impl: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = build_spec(
            beta=beta,
            loss_type=loss_type,
            loss_weights=loss_weights,
            label_smoothing=label_smoothing,
            rpo_alpha=rpo_alpha,
            ld_alpha=ld_alpha,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef,
            discopop_tau=discopop_tau,
            simpo_gamma=simpo_gamma,
            average_log_prob=average_log_prob,
            reference_free=reference_free,
            ignore_index=ignore_index,
            head=head_options(
                temperature=temperature, softcap=softcap, filter_eps=filter_eps, backend=backend, impl=impl
            ),
            use_weighting=use_weighting,
            stats=stats,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        seq_index: torch.Tensor | None = None,
        num_pairs: int | None = None,
    ) -> PreferenceLossOutput:
        """Computes the loss, rewards and metrics of one batch.

        Args:
            hidden: ``[2B, T, D]`` (padded) or ``[N, D]`` (packed) final hidden states.
            weight: ``[V, D]`` lm_head weight.
            labels: ``[2B, T]`` or ``[N]`` next-token ids aligned with hidden, ``ignore_index`` where no loss.
            bias: optional ``[V]`` lm_head bias.
            ref_chosen_logps: ``[B]`` precomputed reference log-probs, scored like the policy's (see
                ``sequence_logps``); pass with ``ref_rejected_logps``.
            ref_rejected_logps: ``[B]``.
            ref_hidden: reference model hidden states, shaped like ``hidden``; its log-probs are computed
                without grad using ``ref_weight`` / ``ref_bias`` (default: the policy's).
            ref_weight: ``[V, D]`` reference lm_head weight.
            ref_bias: ``[V]`` reference lm_head bias.
            seq_index: packed layout: ``[N]`` sequence of each token (``-1`` at ignored tokens). Each of the
                2B sequences must appear (a fully masked response keeps its index at its ignored tokens),
                so that a ``num_pairs`` that disagrees with the batch raises ``ValueError``.
            num_pairs: packed layout: B.

        Returns:
            A ``PreferenceLossOutput``.
        """
        spec = self.spec
        # Under autocast the tensors stay uncast (e.g. fp32 hidden states and master weight): the head casts
        # each chunk to the autocast dtype and returns gradients in the dtypes passed here.
        tokens = pair_tokens(
            hidden,
            weight,
            bias,
            labels,
            seq_index,
            num_pairs,
            ignore_index=spec.ignore_index,
            ld_alpha=spec.ld_alpha,
            average=spec.average_log_prob,
            length_reasons=spec.length_reasons,
        )
        ref_logps = self._reference(
            hidden, tokens, weight, bias, ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight,
            ref_bias,
        )  # fmt: skip
        stats = spec.stats or spec.use_weighting
        loss, seq_logps, rewards, losses, nll, log_odds, *token_stats = fused_head_loss(
            weight, bias, tokens, spec.head, pair_loss(spec, tokens, ref_logps), stats=stats
        )
        if ref_logps is None:
            ref_logps = torch.zeros_like(seq_logps)
        chosen_logps, rejected_logps = seq_logps.chunk(2)
        chosen_rewards, rejected_rewards = rewards.chunk(2)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": chosen_logps.mean(),
            "logps/rejected": rejected_logps.mean(),
        }
        if spec.nll_weight:
            metrics["nll_loss"] = nll
        if "orpo" in spec.loss_types:
            metrics["log_odds_ratio"] = F.logsigmoid(log_odds).mean()
            metrics["log_odds_chosen"] = log_odds.mean()
        pair_metrics = {}
        if spec.stats:
            batch_metrics, pair_metrics = stat_metrics(token_stats[0], tokens)
            metrics.update(batch_metrics)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        return PreferenceLossOutput(
            loss=loss,
            losses=losses,
            chosen_logps=chosen_logps,
            rejected_logps=rejected_logps,
            ref_chosen_logps=ref_chosen,
            ref_rejected_logps=ref_rejected,
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            metrics=metrics,
            token_stats=token_stats[0] if spec.stats else None,
            pair_metrics=pair_metrics,
        )

    def _reference(
        self,
        hidden: torch.Tensor,
        tokens: Tokens,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ref_chosen_logps: torch.Tensor | None,
        ref_rejected_logps: torch.Tensor | None,
        ref_hidden: torch.Tensor | None,
        ref_weight: torch.Tensor | None,
        ref_bias: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """``[2B]`` reference log-probs from whichever reference was passed; None when reference-free."""
        check_reference_args(
            self.spec,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
        )
        hidden2d = tokens.hidden2d
        num_pairs = tokens.num_seqs // 2
        if ref_chosen_logps is not None:
            return torch.cat(
                [
                    check_ref_logps("ref_chosen_logps", ref_chosen_logps, num_pairs),
                    check_ref_logps("ref_rejected_logps", ref_rejected_logps, num_pairs),
                ]
            ).to(hidden2d.device)
        if ref_hidden is None:
            return None
        check_tensor("ref_hidden", ref_hidden)
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's tokens "
                f"{tuple(hidden.shape[:-1])} (same batch, same labels)"
            )
        r_weight = weight if ref_weight is None else ref_weight
        r_bias = bias if ref_weight is None and ref_bias is None else ref_bias
        r_hidden2d = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        check_linear(r_hidden2d, r_weight, r_bias, "ref_")
        if r_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight has V={r_weight.shape[0]}, the policy's weight V={weight.shape[0]}")
        return scored_logps(r_hidden2d, r_weight, r_bias, tokens, self.spec.head)

    def extra_repr(self) -> str:
        p = self.spec.pair
        return f"loss_type={list(self.spec.loss_types)}, beta={p.beta}, backend={self.spec.head.backend}"


# The keyword arguments of FusedLinearDPOLoss.forward that fused_linear_dpo_loss passes through.
_FORWARD_KEYWORDS = frozenset(
    name
    for name, p in inspect.signature(FusedLinearDPOLoss.forward).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    **kwargs: Any,
) -> PreferenceLossOutput:
    """Functional ``FusedLinearDPOLoss``: equals TRL's DPO loss on ``log_softmax(hidden @ weight.T + bias)``.

    In plain PyTorch (padded layout, ``sigmoid``, no options)::

        logp = (hidden @ weight.T + bias).float().log_softmax(-1)
        logp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != ignore_index)
        chosen, rejected = logp.sum(-1).chunk(2)
        logits = (chosen - ref_chosen_logps) - (rejected - ref_rejected_logps)
        loss = -F.logsigmoid(beta * logits).mean()

    ``kwargs`` are ``FusedLinearDPOLoss.forward``'s keyword arguments (``ref_chosen_logps``, ``ref_hidden``,
    ``seq_index``, ...) and its constructor's (``beta``, ``loss_type``, ...).

    Returns:
        A ``PreferenceLossOutput``.
    """
    inputs = {k: kwargs.pop(k) for k in _FORWARD_KEYWORDS & kwargs.keys()}
    return FusedLinearDPOLoss(**kwargs)(hidden, weight, labels, bias, **inputs)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seq_index: torch.Tensor | None = None,
    num_pairs: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    ld_alpha: float | None = None,
    average_log_prob: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str | None = None,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored sequence log-probs without grad, e.g. to precompute reference log-probs.

    Equals ``(logp * mask).sum(-1)`` per sequence (divided by the token count with ``average_log_prob``,
    LD-weighted with ``ld_alpha``), where ``logp = log_softmax(hidden @ weight.T + bias)[labels]``. Pass
    the same ``ld_alpha`` / ``average_log_prob`` as the loss that consumes them. Under autocast, the
    products run in its dtype (the inputs may come in any float dtype), as in the loss.

    Args:
        hidden: ``[2B, T, D]`` (padded) or ``[N, D]`` (packed) hidden states.
        weight: ``[V, D]`` lm_head weight.
        labels: ``[2B, T]`` or ``[N]``.
        bias: optional ``[V]``.
        seq_index: packed layout: ``[N]`` sequence of each token.
        num_pairs: packed layout: B.
        ignore_index: label marking tokens without loss.
        ld_alpha: LD-DPO weight of the tokens past the shared length.
        average_log_prob: per-token mean instead of the sum (a fully masked sequence is an error).
        temperature: divides the logits.
        softcap: final-logit soft-capping, or None.
        backend: ``"triton"``, ``"torch"`` or None.
        impl: ``"fused"``, ``"chunked"`` or None (see ``FusedLinearDPOLoss``).

    Returns:
        ``(chosen_logps [B], rejected_logps [B])`` in fp32.
    """
    head = head_options(temperature=temperature, softcap=softcap, filter_eps=None, backend=backend, impl=impl)
    check_ld_alpha(ld_alpha)
    tokens = pair_tokens(
        hidden,
        weight,
        bias,
        labels,
        seq_index,
        num_pairs,
        ignore_index=ignore_index,
        ld_alpha=ld_alpha,
        average=average_log_prob,
        length_reasons=length_reasons((), average_log_prob),
    )
    chosen, rejected = scored_logps(tokens.hidden2d, weight, bias, tokens, head).chunk(2)
    return chosen, rejected
