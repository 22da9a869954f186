"""Fused linear preference losses: lm_head + log-softmax + gather + loss, without a token graph.

Rooms: ``tokens`` (layout flattening, validation, compaction, reductions), ``fused`` (head options, autocast
and the one autograd Function every family shares), ``dpo_spec`` (the DPO loss-type registry and spec
builder), ``dpo_pairs`` (pair token weights, the pair sequence loss with WPO, statistics metrics), ``dpo``
(``FusedLinearDPOLoss``, ``fused_linear_dpo_loss``, ``sequence_logps``) and ``kto``
(``FusedLinearKTOLoss``, the unpaired KTO loss).
"""

from fastdpo.losses.dpo import (
    LOSS_TYPES,
    FusedLinearDPOLoss,
    LossTypeInfo,
    PreferenceLossOutput,
    fused_linear_dpo_loss,
    sequence_logps,
)
from fastdpo.losses.kto import FusedLinearKTOLoss, KTOLossOutput

__all__ = [
    "LOSS_TYPES",
    "LossTypeInfo",
    "PreferenceLossOutput",
    "FusedLinearDPOLoss",
    "FusedLinearKTOLoss",
    "KTOLossOutput",
    "fused_linear_dpo_loss",
    "sequence_logps",
]
