"""fastdpo: fast, memory-lean DPO. Fused lm_head log-probs, fused preference losses, a packed trainer."""

from fastdpo.ops.linear_logprobs import linear_logprobs

__version__ = "0.1.0"

__all__ = ["linear_logprobs"]
