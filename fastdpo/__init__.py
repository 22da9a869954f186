"""fastdpo: fast, memory-lean DPO. Fused lm_head log-probs, fused preference losses, a packed trainer."""

from fastdpo._source_kernels import find_source_kernels
from fastdpo.losses import FusedLinearDPOLoss, PreferenceLossOutput, fused_linear_dpo_loss, sequence_logps
from fastdpo.losses.kto import FusedLinearKTOLoss, KTOLossOutput
from fastdpo.ops.linear_logprobs import linear_logprobs
from fastdpo.packing import PackedBatch

find_source_kernels()

__version__ = "0.1.0"

__all__ = [
    "FusedLinearDPOLoss",
    "FusedLinearKTOLoss",
    "KTOLossOutput",
    "PackedBatch",
    "PreferenceLossOutput",
    "fused_linear_dpo_loss",
    "linear_logprobs",
    "sequence_logps",
]
