"""Fused linear preference losses: lm_head + log-softmax + gather + DPO-family loss, without a token graph.

Dimension letters: B pairs, N tokens, M valid tokens, D hidden, V vocab.

``FusedLinearDPOLoss`` (and its functional twin ``fused_linear_dpo_loss``) takes final hidden states and the
lm_head weight, never materializes ``[N, V]`` logits and builds no per-token autograd graph: one
``torch.autograd.Function`` computes the per-token log-probs (``logprobs_forward``), reduces them to
sequence log-probs, evaluates the pair losses (``fastdpo.ops.preference_loss``, one kernel launch) and in
its backward scales the per-sequence loss coefficients into per-token gradients for ``logprobs_backward``.

Loss types carry TRL 1.16's ``DPOTrainer`` names and formulas; ``simpo`` follows TRL's CPO trainer
(``loss_type="simpo"``) and ``orpo`` TRL's ORPO trainer. Sequence numbering follows ``fastdpo.packing``:
chosen of pair ``j`` is ``j``, rejected is ``B + j``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastdpo.ops.linear_logprobs import filter_threshold, logprobs_backward, logprobs_forward, resolve_backend
from fastdpo.ops.preference_loss import PreferenceLossConfig, preference_loss
from fastdpo.packing import IGNORE_INDEX

__all__ = [
    "LOSS_TYPES",
    "LossTypeInfo",
    "PreferenceLossOutput",
    "FusedLinearDPOLoss",
    "fused_linear_dpo_loss",
    "sequence_logps",
]


@dataclass(frozen=True)
class LossTypeInfo:
    """What a loss type needs from its inputs.

    Attributes:
        needs_reference: uses reference log-probs (give them, or set ``reference_free=True``).
        needs_lengths: divides by response lengths, so a fully masked response is an error.
        averages_logps: scores length-averaged log-probs without a reference (SimPO, ORPO).
        fused: evaluated in the Triton kernel; otherwise by the torch path (batch sorts) or per token.
    """

    needs_reference: bool
    needs_lengths: bool = False
    averages_logps: bool = False
    fused: bool = True


# TRL 1.16 DPOTrainer's loss types, in its order, then SimPO and ORPO.
LOSS_TYPES: Mapping[str, LossTypeInfo] = {
    "sigmoid": LossTypeInfo(needs_reference=True),
    "hinge": LossTypeInfo(needs_reference=True),
    "ipo": LossTypeInfo(needs_reference=True, needs_lengths=True),
    "exo_pair": LossTypeInfo(needs_reference=True),
    "nca_pair": LossTypeInfo(needs_reference=True),
    "robust": LossTypeInfo(needs_reference=True),
    "bco_pair": LossTypeInfo(needs_reference=True),
    "sppo_hard": LossTypeInfo(needs_reference=True),
    "aot": LossTypeInfo(needs_reference=True, fused=False),
    "aot_unpaired": LossTypeInfo(needs_reference=True, fused=False),
    "apo_zero": LossTypeInfo(needs_reference=True),
    "apo_down": LossTypeInfo(needs_reference=True),
    "discopop": LossTypeInfo(needs_reference=True),
    "sft": LossTypeInfo(needs_reference=False, fused=False),
    "sigmoid_norm": LossTypeInfo(needs_reference=True, needs_lengths=True),
    "simpo": LossTypeInfo(needs_reference=False, needs_lengths=True, averages_logps=True),
    "orpo": LossTypeInfo(needs_reference=False, needs_lengths=True, averages_logps=True),
}

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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
            with an NLL term; ``log_odds_ratio`` and ``log_odds_chosen`` for ORPO). Batch means, unsynced.
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


@dataclass(frozen=True)
class _LossSpec:
    """The validated configuration of one fused loss."""

    pair: PreferenceLossConfig
    loss_types: tuple[str, ...]
    nll_weight: float
    average_log_prob: bool
    reference_free: bool
    needs_reference: bool
    needs_lengths: bool
    ld_alpha: float | None
    ignore_index: int
    temperature: float
    softcap: float | None
    filter_eps: float | str | None
    backend: str | None


def _build_spec(
    *,
    beta: float,
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None,
    label_smoothing: float,
    rpo_alpha: float | None,
    ld_alpha: float | None,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
    discopop_tau: float,
    simpo_gamma: float,
    average_log_prob: bool,
    reference_free: bool,
    ignore_index: int,
    temperature: float,
    softcap: float | None,
    filter_eps: float | str | None,
    backend: str | None,
) -> _LossSpec:
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not loss_types:
        raise ValueError(f"loss_type is empty; expected one or more of {list(LOSS_TYPES)}")
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown}; expected any of {list(LOSS_TYPES)}")
    weights = (1.0,) * len(loss_types) if loss_weights is None else tuple(float(w) for w in loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types {list(loss_types)}; "
            "expected one weight per loss type"
        )
    if rpo_alpha is not None and not rpo_alpha >= 0:
        raise ValueError(f"rpo_alpha must be None or >= 0, got {rpo_alpha}")
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be None or in [0, 1], got {ld_alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    filter_threshold(filter_eps, torch.float32)

    averaging = [t for t in loss_types if LOSS_TYPES[t].averages_logps]
    if averaging:
        with_reference = [t for t in loss_types if LOSS_TYPES[t].needs_reference]
        if with_reference:
            raise ValueError(
                f"loss types {averaging} score reference-free, length-averaged log-probs and cannot be "
                f"combined with reference-based types {with_reference}; combine them only with each other "
                "and 'sft'"
            )
    pair_types = tuple(t for t in loss_types if t != "sft")
    pair_weights = tuple(w for t, w in zip(loss_types, weights, strict=True) if t != "sft")
    pair = PreferenceLossConfig(
        loss_types=pair_types,
        loss_weights=pair_weights,
        beta=float(beta),
        label_smoothing=float(label_smoothing),
        discopop_tau=float(discopop_tau),
        simpo_gamma=float(simpo_gamma),
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=float(f_alpha_divergence_coef),
    )
    # sft is TRL's token-mean NLL over chosen tokens; ORPO's loss contains the same NLL; rpo_alpha adds more.
    nll_weight = sum(w for t, w in zip(loss_types, weights, strict=True) if t in ("sft", "orpo"))
    nll_weight += rpo_alpha or 0.0
    average = bool(average_log_prob) or bool(averaging)
    return _LossSpec(
        pair=pair,
        loss_types=loss_types,
        nll_weight=float(nll_weight),
        average_log_prob=average,
        reference_free=bool(reference_free),
        needs_reference=any(LOSS_TYPES[t].needs_reference for t in loss_types),
        needs_lengths=average or any(LOSS_TYPES[t].needs_lengths for t in loss_types),
        ld_alpha=None if ld_alpha is None else float(ld_alpha),
        ignore_index=int(ignore_index),
        temperature=float(temperature),
        softcap=None if softcap is None else float(softcap),
        filter_eps=filter_eps,
        backend=backend,
    )


@dataclass
class _Tokens:
    """Valid tokens of a batch in either layout, and how they reduce to sequences."""

    hidden2d: torch.Tensor  # [N, D]
    rows: torch.Tensor  # [M] row of each valid token in hidden2d
    targets: torch.Tensor  # [M]
    seq_index: torch.Tensor  # [M] sequence of each valid token, 0..2B-1
    token_weights: torch.Tensor  # [M] fp32 weight of each token in its scored sequence log-prob
    lengths: torch.Tensor  # [2B] fp32 valid tokens per sequence
    num_pairs: int
    chosen_tokens: int


def _check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _flatten_layout(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    seq_index: torch.Tensor | None,
    num_pairs: int | None,
    *,
    name: str = "hidden",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Returns ``(hidden [N, D], labels [N], seq_index [N] or None for padded rows, B)``."""
    _check_tensor(name, hidden)
    _check_tensor("labels", labels)
    if not _is_integer(labels):
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if seq_index is None:
        if hidden.dim() != 3 or labels.dim() != 2:
            raise ValueError(
                f"padded layout expects {name} [2B, T, D] and labels [2B, T], got {name} "
                f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}; pass seq_index and num_pairs for "
                "the packed layout"
            )
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal {name}'s [2B, T] = {tuple(hidden.shape[:2])}"
            )
        rows = hidden.shape[0]
        if rows == 0 or rows % 2:
            raise ValueError(
                f"padded layout needs an even, non-zero number of rows (B chosen then B rejected), got {rows}"
            )
        if num_pairs is not None and num_pairs != rows // 2:
            raise ValueError(
                f"num_pairs={num_pairs} disagrees with the {rows} padded rows (expected {rows // 2})"
            )
        return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), None, rows // 2
    _check_tensor("seq_index", seq_index)
    if not _is_integer(seq_index):
        raise TypeError(f"seq_index must be an integer tensor, got {seq_index.dtype}")
    if hidden.dim() != 2 or labels.dim() != 1 or seq_index.dim() != 1:
        raise ValueError(
            f"packed layout expects {name} [N, D], labels [N] and seq_index [N], got {tuple(hidden.shape)}, "
            f"{tuple(labels.shape)} and {tuple(seq_index.shape)}"
        )
    if not labels.shape[0] == seq_index.shape[0] == hidden.shape[0]:
        raise ValueError(
            f"packed layout needs one label and one seq_index per token: {name} has N={hidden.shape[0]}, "
            f"labels {labels.shape[0]}, seq_index {seq_index.shape[0]}"
        )
    if not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs <= 0:
        raise ValueError(f"packed layout needs num_pairs, a positive int, got {num_pairs!r}")
    return hidden, labels, seq_index, num_pairs


def _check_linear(hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    _check_tensor(f"{name}weight", weight)
    if hidden2d.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}hidden must be float32, bfloat16 or float16, got {hidden2d.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden2d.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"{name}weight must be [V, D] with D={hidden2d.shape[1]} as {name}hidden, "
            f"got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden2d.dtype:
        raise TypeError(
            f"{name}weight dtype {weight.dtype} differs from {name}hidden dtype {hidden2d.dtype}; run under "
            "torch.autocast (both are cast to its dtype) or cast one of them"
        )
    if bias is not None:
        _check_tensor(f"{name}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}bias must be [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden2d.dtype:
            raise TypeError(f"{name}bias dtype {bias.dtype} differs from {name}hidden dtype {hidden2d.dtype}")
    devices = {hidden2d.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) > 1:
        raise ValueError(
            f"{name}hidden, weight and bias must share one device, got {sorted(map(str, devices))}"
        )


def _prepare_tokens(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    seq_index: torch.Tensor | None,
    num_pairs: int | None,
    spec: _LossSpec,
) -> _Tokens:
    """Validates the batch, compacts its valid tokens and computes the per-token reduction weights."""
    hidden2d, labels1d, seq1d, num_pairs = _flatten_layout(hidden, labels, seq_index, num_pairs)
    _check_linear(hidden2d, weight, bias, "")
    if labels1d.device != hidden2d.device or (seq1d is not None and seq1d.device != hidden2d.device):
        raise ValueError(f"labels and seq_index must be on hidden's device {hidden2d.device}")
    num_seqs = 2 * num_pairs
    rows = (labels1d != spec.ignore_index).nonzero()[:, 0]
    targets = labels1d.index_select(0, rows).long()
    if seq1d is None:
        seqs = rows // labels.shape[1]
    else:
        seqs = seq1d.index_select(0, rows).long()
    bad_seq = ((seqs < 0) | (seqs >= num_seqs)).any()
    bad_target = ((targets < 0) | (targets >= weight.shape[0])).any()
    lengths = torch.bincount(seqs.clamp(0, num_seqs - 1), minlength=num_seqs)
    # One host sync for every data-dependent check.
    bad_seq, bad_target, chosen_tokens, empty = torch.stack(
        [bad_seq.long(), bad_target.long(), lengths[:num_pairs].sum(), (lengths == 0).sum()]
    ).tolist()
    if bad_seq:
        raise ValueError(
            f"seq_index must lie in [0, 2B={num_seqs}) at every token whose label is not ignore_index="
            f"{spec.ignore_index} (-1 only at ignored tokens)"
        )
    if bad_target:
        raise ValueError(
            f"labels must be ignore_index={spec.ignore_index} or token ids in [0, V={weight.shape[0]})"
        )
    if empty and spec.needs_lengths:
        missing = (lengths == 0).nonzero()[:, 0].tolist()
        reason = [t for t in spec.loss_types if LOSS_TYPES[t].needs_lengths] or ["average_log_prob=True"]
        raise ValueError(
            f"sequences {missing[:8]} have no valid label (fully masked response), but {reason} divide by "
            "the response length; drop these pairs or raise the truncation length"
        )
    if spec.nll_weight and chosen_tokens == 0:
        raise ValueError(
            "the NLL term (sft / orpo / rpo_alpha) needs chosen tokens, but every chosen label is masked"
        )

    weights = torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device)
    if spec.ld_alpha is not None:
        # LD-DPO: the first min(len_chosen, len_rejected) response tokens count fully, the rest by ld_alpha.
        order = torch.sort(seqs, stable=True).indices
        starts = torch.cumsum(lengths, 0) - lengths
        rank = torch.empty_like(seqs)
        rank[order] = torch.arange(seqs.shape[0], device=seqs.device) - starts[seqs[order]]
        shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)
        weights = torch.where(rank < shared[seqs], 1.0, spec.ld_alpha).float()
    if spec.average_log_prob:
        weights = weights / lengths[seqs].float()
    return _Tokens(
        hidden2d=hidden2d,
        rows=rows,
        targets=targets,
        seq_index=seqs,
        token_weights=weights,
        lengths=lengths.float(),
        num_pairs=num_pairs,
        chosen_tokens=int(chosen_tokens),
    )


def _reduce(logp: torch.Tensor, tokens: _Tokens, weighted: bool = True) -> torch.Tensor:
    out = torch.zeros(2 * tokens.num_pairs, dtype=torch.float32, device=logp.device)
    return out.index_add_(0, tokens.seq_index, logp * tokens.token_weights if weighted else logp)


def _scored_logps(
    hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tokens: _Tokens, spec: _LossSpec
) -> torch.Tensor:
    """``[2B]`` scored sequence log-probs, without autograd."""
    backend = resolve_backend(hidden2d.device, spec.backend)
    with torch.no_grad():
        logp, _ = logprobs_forward(
            _gather_rows(hidden2d, tokens),
            weight,
            bias,
            tokens.targets,
            temperature=spec.temperature,
            softcap=spec.softcap,
            backend=backend,
        )
    return _reduce(logp, tokens)


def _gather_rows(hidden2d: torch.Tensor, tokens: _Tokens) -> torch.Tensor:
    """The valid tokens' hidden states; no copy when every token is valid."""
    if tokens.rows.shape[0] == hidden2d.shape[0]:
        return hidden2d
    return hidden2d.index_select(0, tokens.rows)


class _FusedLinearPreferenceLossFunction(torch.autograd.Function):
    """Loss forward on compacted tokens; the backward scales per-sequence coefficients into token grads."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, tokens, ref_logps, spec, backend):
        h = _gather_rows(hidden2d, tokens)
        logp, lse = logprobs_forward(
            h,
            weight,
            bias,
            tokens.targets,
            temperature=spec.temperature,
            softcap=spec.softcap,
            backend=backend,
        )
        num_pairs = tokens.num_pairs
        seq_logps = _reduce(logp, tokens)
        pair = preference_loss(seq_logps, ref_logps, tokens.lengths, spec.pair, backend=backend)
        loss = pair.losses.mean()
        # Every token of a chosen response carries -nll_weight / (chosen tokens) in the NLL term.
        nll_scale = spec.nll_weight / tokens.chosen_tokens if spec.nll_weight else 0.0
        if spec.nll_weight:
            raw = _reduce(logp, tokens, weighted=False)
            nll = -raw[:num_pairs].sum() / tokens.chosen_tokens
            loss = loss + spec.nll_weight * nll
        else:
            nll = torch.zeros((), dtype=torch.float32, device=logp.device)
        log_odds = pair.log_odds if pair.log_odds is not None else torch.zeros(0, device=logp.device)
        ctx.save_for_backward(hidden2d, weight, bias, lse, pair.coefs)
        ctx.tokens = tokens
        ctx.opts = (spec, backend, nll_scale)
        ctx.mark_non_differentiable(seq_logps, pair.rewards, pair.losses, nll, log_odds)
        return loss, seq_logps, pair.rewards, pair.losses, nll, log_odds

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused_grads):
        hidden2d, weight, bias, lse, coefs = ctx.saved_tensors
        tokens = ctx.tokens
        spec, backend, nll_scale = ctx.opts
        grad_loss = grad_loss.float()
        grad_tok = (coefs * grad_loss).index_select(0, tokens.seq_index) * tokens.token_weights
        if nll_scale:
            grad_tok = grad_tok - torch.where(tokens.seq_index < tokens.num_pairs, nll_scale * grad_loss, 0.0)
        eps = filter_threshold(spec.filter_eps, hidden2d.dtype) if backend == "triton" else 0.0
        dh, dw, db = logprobs_backward(
            grad_tok,
            _gather_rows(hidden2d, tokens),
            weight,
            bias,
            tokens.targets,
            lse,
            temperature=spec.temperature,
            softcap=spec.softcap,
            filter_eps=eps,
            backend=backend,
            needs_input_grad=(ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]),
        )
        dhidden = dh
        if dh is not None and tokens.rows.shape[0] != hidden2d.shape[0]:
            dhidden = torch.zeros_like(hidden2d).index_copy_(0, tokens.rows, dh)
        return dhidden, dw, db, None, None, None, None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None or not t.is_floating_point() else t.to(dtype)


def _check_ref_logps(name: str, t: torch.Tensor, num_pairs: int) -> torch.Tensor:
    _check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != (num_pairs,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B]=[{num_pairs}], one value per pair")
    return t.detach().float()


def _run(
    spec: _LossSpec,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
    seq_index: torch.Tensor | None,
    num_pairs: int | None,
) -> PreferenceLossOutput:
    _check_tensor("hidden", hidden)
    # Under autocast the hidden states arrive in its dtype while lm_head's weight stays fp32: both (and the
    # reference tensors) are cast to the autocast dtype, as autocast's own linear would; the cast's backward
    # returns fp32 gradients to the master weight.
    amp_dtype = _autocast_dtype(hidden.device)
    hidden, weight, bias = _cast(hidden, amp_dtype), _cast(weight, amp_dtype), _cast(bias, amp_dtype)
    tokens = _prepare_tokens(hidden, weight, bias, labels, seq_index, num_pairs, spec)
    b = tokens.num_pairs

    has_ref_logps = ref_chosen_logps is not None or ref_rejected_logps is not None
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight / ref_bias are only used with ref_hidden; pass ref_hidden too")
    if has_ref_logps and ref_hidden is not None:
        raise ValueError("pass either reference log-probs or ref_hidden, not both")
    has_ref = has_ref_logps or ref_hidden is not None
    averaging = [t for t in spec.loss_types if LOSS_TYPES[t].averages_logps]
    if has_ref and averaging:
        raise ValueError(f"loss types {averaging} are reference-free; do not pass a reference")
    if has_ref and spec.reference_free:
        raise ValueError("reference_free=True, yet a reference was passed; drop one of them")
    if spec.needs_reference and not spec.reference_free and not has_ref:
        needing = [t for t in spec.loss_types if LOSS_TYPES[t].needs_reference]
        raise ValueError(
            f"loss types {needing} need a reference: pass ref_chosen_logps and ref_rejected_logps, or "
            "ref_hidden (with ref_weight / ref_bias, defaulting to the policy's), or set reference_free=True"
        )

    ref_logps = None
    if has_ref_logps:
        ref_logps = torch.cat(
            [
                _check_ref_logps("ref_chosen_logps", ref_chosen_logps, b),
                _check_ref_logps("ref_rejected_logps", ref_rejected_logps, b),
            ]
        ).to(hidden.device)
    elif ref_hidden is not None:
        ref_hidden = _cast(_check_tensor("ref_hidden", ref_hidden), amp_dtype)
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"ref_hidden shape {tuple(ref_hidden.shape)} must match hidden's tokens "
                f"{tuple(hidden.shape[:-1])} (same batch, same labels)"
            )
        r_weight = weight if ref_weight is None else _cast(ref_weight, amp_dtype)
        r_bias = bias if ref_weight is None and ref_bias is None else _cast(ref_bias, amp_dtype)
        r_hidden2d = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        _check_linear(r_hidden2d, r_weight, r_bias, "ref_")
        if r_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"ref_weight has V={r_weight.shape[0]}, the policy's weight V={weight.shape[0]}")
        ref_logps = _scored_logps(r_hidden2d.detach(), r_weight.detach(), _detach(r_bias), tokens, spec)

    backend = resolve_backend(hidden.device, spec.backend)
    with torch.autocast(hidden.device.type, enabled=False) if amp_dtype else contextlib.nullcontext():
        loss, seq_logps, rewards, losses, nll, log_odds = _FusedLinearPreferenceLossFunction.apply(
            tokens.hidden2d, weight, bias, tokens, ref_logps, spec, backend
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
    )


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def fused_linear_dpo_loss(
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
    **options: Any,
) -> PreferenceLossOutput:
    """Functional ``FusedLinearDPOLoss``: equals TRL's DPO loss on ``log_softmax(hidden @ weight.T + bias)``.

    In plain PyTorch (padded layout, ``sigmoid``, no options)::

        logp = (hidden @ weight.T + bias).float().log_softmax(-1)
        logp = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != ignore_index)
        chosen, rejected = logp.sum(-1).chunk(2)
        logits = (chosen - ref_chosen_logps) - (rejected - ref_rejected_logps)
        loss = -F.logsigmoid(beta * logits).mean()

    ``options`` are ``FusedLinearDPOLoss``'s constructor arguments (``beta``, ``loss_type``, ...); the rest
    are its ``forward``'s.

    Returns:
        A ``PreferenceLossOutput``.
    """
    return FusedLinearDPOLoss(**options)(
        hidden,
        weight,
        labels,
        bias,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        ref_hidden=ref_hidden,
        ref_weight=ref_weight,
        ref_bias=ref_bias,
        seq_index=seq_index,
        num_pairs=num_pairs,
    )


class FusedLinearDPOLoss(nn.Module):
    """TRL's DPO-family losses fused with lm_head: ``loss(log_softmax(hidden @ weight.T + bias)[labels])``.

    Takes final hidden states instead of logits: the ``[N, V]`` logits are never materialized and no
    per-token autograd graph is built; gradients reach ``hidden``, ``weight`` and ``bias``.

    Layouts: padded ``hidden [2B, T, D]`` / ``labels [2B, T]`` (rows ``0..B-1`` chosen, ``B..2B-1`` rejected;
    labels aligned with hidden, i.e. already shifted) or packed ``hidden [N, D]`` / ``labels [N]`` with
    ``seq_index [N]`` and ``num_pairs`` (as in ``fastdpo.packing.PackedBatch``). Both give identical numbers.

    Under ``torch.autocast``, hidden, weight, bias and the reference tensors are cast to the autocast dtype
    (like autocast's linear). Outside autocast, hidden and weight must share a dtype. NaN or Inf in the used
    inputs propagates to the loss. A fully masked response has log-prob 0 (TRL), except for the loss types
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
        loss_weights: one weight per loss type (default all 1.0).
        label_smoothing: robust (in [0, 0.5)), exo_pair (in (0, 1)), aot and simpo smoothing.
        rpo_alpha: adds ``rpo_alpha * NLL``, the token mean of ``-logp`` over all chosen tokens (RPO).
        ld_alpha: LD-DPO: response tokens past ``min(len_chosen, len_rejected)`` count with this weight.
        f_divergence_type: ``reverse_kl``, ``forward_kl``, ``js_divergence`` or ``alpha_divergence`` (TRL's
            f-DPO; only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft).
        f_alpha_divergence_coef: alpha of ``alpha_divergence``.
        discopop_tau: DiscoPOP temperature.
        simpo_gamma: SimPO target reward margin.
        average_log_prob: score the per-token mean instead of the sum of log-probs.
        reference_free: use zero reference log-probs.
        ignore_index: label marking tokens without loss.
        temperature: divides the logits.
        softcap: final-logit soft-capping (Gemma-2), or None.
        filter_eps: backward gradient filtering of the triton backend (see ``linear_logprobs``).
        backend: ``"triton"``, ``"torch"`` or None (by device, or ``FASTDPO_BACKEND``).
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
        temperature: float = 1.0,
        softcap: float | None = None,
        filter_eps: float | str | None = "auto",
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = _build_spec(
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
            temperature=temperature,
            softcap=softcap,
            filter_eps=filter_eps,
            backend=backend,
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
            seq_index: packed layout: ``[N]`` sequence of each token (``-1`` at ignored tokens).
            num_pairs: packed layout: B.

        Returns:
            A ``PreferenceLossOutput``.
        """
        return _run(
            self.spec,
            hidden,
            weight,
            labels,
            bias,
            ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps,
            ref_hidden=ref_hidden,
            ref_weight=ref_weight,
            ref_bias=ref_bias,
            seq_index=seq_index,
            num_pairs=num_pairs,
        )

    def extra_repr(self) -> str:
        p = self.spec.pair
        return f"loss_type={list(self.spec.loss_types)}, beta={p.beta}, backend={self.spec.backend}"


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scored sequence log-probs without grad, e.g. to precompute reference log-probs.

    Equals ``(logp * mask).sum(-1)`` per sequence (divided by the token count with ``average_log_prob``,
    LD-weighted with ``ld_alpha``), where ``logp = log_softmax(hidden @ weight.T + bias)[labels]``. Pass
    the same ``ld_alpha`` / ``average_log_prob`` as the loss that consumes them. Under autocast, the inputs
    are cast to its dtype.

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

    Returns:
        ``(chosen_logps [B], rejected_logps [B])`` in fp32.
    """
    spec = _build_spec(
        beta=0.1,
        loss_type="sft",
        loss_weights=(0.0,),
        label_smoothing=0.0,
        rpo_alpha=None,
        ld_alpha=ld_alpha,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        discopop_tau=0.05,
        simpo_gamma=0.5,
        average_log_prob=average_log_prob,
        reference_free=False,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        filter_eps=None,
        backend=backend,
    )
    _check_tensor("hidden", hidden)
    amp_dtype = _autocast_dtype(hidden.device)
    hidden, weight, bias = _cast(hidden, amp_dtype), _cast(weight, amp_dtype), _cast(bias, amp_dtype)
    tokens = _prepare_tokens(hidden, weight, bias, labels, seq_index, num_pairs, spec)
    logps = _scored_logps(tokens.hidden2d.detach(), weight.detach(), _detach(bias), tokens, spec)
    chosen, rejected = logps.chunk(2)
    return chosen, rejected
