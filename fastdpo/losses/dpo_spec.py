"""The DPO family's configuration: the loss-type registry, the spec builder and argument validation.

Everything here runs before any tensor math: it turns ``FusedLinearDPOLoss``'s arguments into one frozen
``LossSpec`` and checks a call's reference arguments against it, raising ``ValueError`` / ``TypeError``
that name the bad argument and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fastdpo.errors import finite_float
from fastdpo.losses.fused import HeadOptions
from fastdpo.losses.tokens import check_tensor
from fastdpo.ops.preference_loss import PreferenceLossConfig

__all__ = ["LOSS_TYPES", "LossTypeInfo"]


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


@dataclass(frozen=True)
class LossSpec:
    """The validated configuration of one fused loss."""

    pair: PreferenceLossConfig
    loss_types: tuple[str, ...]
    nll_weight: float
    sft_weight: float
    use_weighting: bool
    stats: bool
    average_log_prob: bool
    reference_free: bool
    needs_reference: bool
    length_reasons: list[str]
    ld_alpha: float | None
    ignore_index: int
    head: HeadOptions

    # The head's options, readable where the spec used to hold them.
    @property
    def temperature(self) -> float:
        return self.head.temperature

    @property
    def softcap(self) -> float | None:
        return self.head.softcap

    @property
    def backend(self) -> str | None:
        return self.head.backend


def build_spec(
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
    head: HeadOptions,
    use_weighting: bool = False,
    stats: bool = False,
) -> LossSpec:
    options = {
        "beta": beta,
        "label_smoothing": label_smoothing,
        "f_alpha_divergence_coef": f_alpha_divergence_coef,
        "discopop_tau": discopop_tau,
        "simpo_gamma": simpo_gamma,
    }
    for name, value in (("rpo_alpha", rpo_alpha), ("ld_alpha", ld_alpha)):
        if value is not None:
            options[name] = value
    for name, value in options.items():
        finite_float(name, value)
    loss_types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not loss_types:
        raise ValueError(f"loss_type is empty; expected one or more of {list(LOSS_TYPES)}")
    unknown = [t for t in loss_types if t not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"unknown loss_type {unknown}; expected any of {list(LOSS_TYPES)}")
    weights = (1.0,) * len(loss_types)
    if loss_weights is not None:
        weights = tuple(finite_float(f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights))
    if len(weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types {list(loss_types)}; "
            "expected one weight per loss type"
        )
    if rpo_alpha is not None and not rpo_alpha >= 0:
        raise ValueError(f"rpo_alpha must be None or >= 0, got {rpo_alpha}")
    check_ld_alpha(ld_alpha)

    averaging = [t for t in loss_types if LOSS_TYPES[t].averages_logps]
    if averaging:
        with_reference = [t for t in loss_types if LOSS_TYPES[t].needs_reference]
        if with_reference:
            raise ValueError(
                f"loss types {averaging} score reference-free, length-averaged log-probs and cannot be "
                f"combined with reference-based types {with_reference}; combine them only with each other "
                "and 'sft'"
            )
    if use_weighting:
        unweighted = [t for t in loss_types if t in ("aot", "aot_unpaired") or LOSS_TYPES[t].averages_logps]
        if unweighted:
            raise ValueError(
                f"use_weighting (WPO) weighs pairs of TRL's DPO loss types; it does not apply to "
                f"{unweighted} (TRL 1.16 refuses aot and aot_unpaired with it)"
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
    # WPO weighs only the sft part (TRL multiplies every loss type's per-pair loss by the pair's weight).
    sft_weight = sum(w for t, w in zip(loss_types, weights, strict=True) if t == "sft")
    nll_weight = sum(w for t, w in zip(loss_types, weights, strict=True) if t in ("sft", "orpo"))
    nll_weight += rpo_alpha or 0.0
    average = bool(average_log_prob) or bool(averaging)
    return LossSpec(
        pair=pair,
        loss_types=loss_types,
        nll_weight=float(nll_weight),
        sft_weight=float(sft_weight),
        use_weighting=bool(use_weighting),
        stats=bool(stats),
        average_log_prob=average,
        reference_free=bool(reference_free),
        needs_reference=any(LOSS_TYPES[t].needs_reference for t in loss_types),
        length_reasons=length_reasons(loss_types, average),
        ld_alpha=None if ld_alpha is None else float(ld_alpha),
        ignore_index=int(ignore_index),
        head=head,
    )


def check_ld_alpha(ld_alpha: float | None) -> None:
    if ld_alpha is not None and not 0.0 <= finite_float("ld_alpha", ld_alpha) <= 1.0:
        raise ValueError(f"ld_alpha must be None or in [0, 1], got {ld_alpha}")


def length_reasons(loss_types: Sequence[str], average: bool) -> list[str]:
    """What divides by a response's length: its loss types, or ``average_log_prob``."""
    reasons = [t for t in loss_types if LOSS_TYPES[t].needs_lengths]
    return reasons or (["average_log_prob=True"] if average else [])


def check_ref_logps(name: str, t: torch.Tensor, num_pairs: int) -> torch.Tensor:
    check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != (num_pairs,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [B]=[{num_pairs}], one value per pair")
    return t.detach().float()


def check_reference_args(
    spec: LossSpec,
    *,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    ref_hidden: torch.Tensor | None,
    ref_weight: torch.Tensor | None,
    ref_bias: torch.Tensor | None,
) -> None:
    """Checks that a call passes one consistent kind of reference, and one exactly when the spec needs it."""
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
