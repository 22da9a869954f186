"""Plain-PyTorch references that materialize the full logits; tests run them in float64."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100

__all__ = ["linear_logprobs_reference", "token_stats_reference"]


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``log_softmax(cap(hidden @ weight.T + bias) / temperature)[targets]``, 0 at ignored targets.

    Computed in the inputs' dtype with the full ``[..., V]`` logits: pass float64 tensors for a reference,
    low-precision ones for "plain PyTorch" in that dtype (the log-softmax then runs in fp32, as TRL does).
    """
    logp = _logits(hidden, weight, bias, temperature, softcap).log_softmax(-1)
    valid = targets != ignore_index
    picked = logp.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def _logits(hidden, weight, bias, temperature, softcap):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def token_stats_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> dict[str, torch.Tensor]:
    """``entropy``, ``mean_logit``, ``is_argmax``, ``log_sum_p2`` of ``z = cap(hidden @ weight.T + b) / T``.

    From the full logits, as ``fastdpo.ops.linear_logprobs.TokenStats`` defines them; 0 (False) at
    ignored targets. Dtypes as in :func:`linear_logprobs_reference`.
    """
    z = _logits(hidden, weight, bias, temperature, softcap)
    logp = z.log_softmax(-1)
    p = logp.exp()
    valid = targets != ignore_index
    stats = {
        "entropy": -(p * logp).sum(-1),
        "mean_logit": z.mean(-1),
        "is_argmax": z.argmax(-1) == targets,
        "log_sum_p2": torch.logsumexp(2 * logp, dim=-1),
    }
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in stats.items()}
