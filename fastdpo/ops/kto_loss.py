"""Per-sequence KTO losses on sequence log-probs: one Triton launch, or the readable torch reference.

Input is per sequence (``S`` entries, in batch order): the policy and reference log-probs, whether each
completion is desirable, and the KL estimate (a detached scalar). Output is the weighted per-sequence
loss, the rewards and the coefficients ``d mean_s(loss_s) / d policy_logps[s]`` that the fused linear
loss scales into per-token gradients. The formulas are TRL 1.16 ``KTOTrainer``'s (``kto`` and
``apo_zero_unpaired``); TRL concatenates the weighted desirable and undesirable losses and averages them
over the whole batch, which is the mean over the ``S`` sequences here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdpo.ops.linear_logprobs import resolve_backend

__all__ = [
    "KTO_LOSS_TYPES",
    "KTOLossConfig",
    "KTOSequenceLosses",
    "check_preference_labels",
    "kto_loss",
    "kto_loss_torch",
    "kto_loss_triton",
]

KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")


@dataclass(frozen=True)
class KTOLossConfig:
    """Hyper-parameters of the KTO losses, with TRL's ``KTOConfig`` names and defaults.

    Attributes:
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"`` (which ignores the KL term).
        beta: KTO beta.
        desirable_weight: weight of a desirable sequence's loss.
        undesirable_weight: weight of an undesirable sequence's loss.
    """

    loss_type: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(
                f"unknown KTO loss_type {self.loss_type!r}; expected one of {list(KTO_LOSS_TYPES)}"
            )
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.desirable_weight < 0 or self.undesirable_weight < 0:
            raise ValueError(
                f"desirable_weight and undesirable_weight must be >= 0, got {self.desirable_weight} and "
                f"{self.undesirable_weight}"
            )

    @property
    def uses_kl(self) -> bool:
        """Whether the loss subtracts the KL estimate (``kto``) or not (``apo_zero_unpaired``)."""
        return self.loss_type == "kto"


@dataclass
class KTOSequenceLosses:
    """Result of ``kto_loss``.

    Attributes:
        losses: ``[S]`` per-sequence loss, already multiplied by its desirable / undesirable weight.
        coefs: ``[S]`` ``d losses.mean() / d policy_logps``.
        rewards: ``[S]`` ``beta * (policy_logps - ref_logps)``.
    """

    losses: torch.Tensor
    coefs: torch.Tensor
    rewards: torch.Tensor


def check_preference_labels(preference_labels: object, num_seqs: int, device: torch.device) -> torch.Tensor:
    """Validates KTO's per-sequence labels (bool, or 0/1 numbers) and returns them as a bool ``[S]`` tensor.

    Args:
        preference_labels: ``[S]`` tensor, True (1) where the completion is desirable.
        num_seqs: S, the number of scored sequences.
        device: where the result goes.

    Returns:
        ``[S]`` bool tensor on ``device``.
    """
    if not isinstance(preference_labels, torch.Tensor):
        raise TypeError(
            f"preference_labels must be a torch.Tensor of bools (True = desirable), "
            f"got {type(preference_labels).__name__}"
        )
    if preference_labels.dim() != 1 or preference_labels.shape[0] != num_seqs:
        raise ValueError(
            f"preference_labels has shape {tuple(preference_labels.shape)}; expected [S]=[{num_seqs}], "
            "one label per sequence"
        )
    if preference_labels.dtype == torch.bool:
        return preference_labels.to(device)
    if preference_labels.is_complex():
        raise ValueError(f"preference_labels must be bool or 0/1, got dtype {preference_labels.dtype}")
    values = preference_labels.detach()
    bad = ~((values == 0) | (values == 1))
    if bool(bad.any()):
        first = values[bad][0].item()
        raise ValueError(
            f"preference_labels entries must be bool or 0/1 (True = desirable), got {first!r} at "
            f"index {bad.nonzero()[0, 0].item()}"
        )
    return (values == 1).to(device)


def _check_inputs(
    policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, desirable: torch.Tensor, kl: torch.Tensor
) -> int:
    for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps), ("kl", kl)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if policy_logps.dim() != 1 or policy_logps.numel() == 0:
        raise ValueError(f"policy_logps must be 1-D [S] with S > 0, got shape {tuple(policy_logps.shape)}")
    if ref_logps is not None and ref_logps.shape != policy_logps.shape:
        raise ValueError(
            f"ref_logps has shape {tuple(ref_logps.shape)}; expected {tuple(policy_logps.shape)}"
        )
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        raise TypeError("desirable must be a bool tensor; convert labels with check_preference_labels")
    if desirable.shape != policy_logps.shape:
        raise ValueError(
            f"desirable has shape {tuple(desirable.shape)}; expected {tuple(policy_logps.shape)}"
        )
    if kl.numel() != 1:
        raise ValueError(f"kl must hold one value, got shape {tuple(kl.shape)}")
    return policy_logps.numel()


def _kto_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    config: KTOLossConfig,
) -> torch.Tensor:
    """TRL's formulas on differentiable ``[S]`` log-probs, in batch order; returns the weighted losses."""
    beta = config.beta
    logratios = policy_logps - ref_logps
    if config.loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (logratios - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - logratios))
    else:
        chosen_losses = 1 - F.sigmoid(beta * logratios)
        rejected_losses = F.sigmoid(beta * logratios)
    return torch.where(
        desirable, config.desirable_weight * chosen_losses, config.undesirable_weight * rejected_losses
    )


def _poison(policy_logps: torch.Tensor, ref_logps: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """``[S]`` zeros, NaN where an input is NaN/Inf: sigmoid saturates to finite values on Inf."""
    return (policy_logps - policy_logps + ref_logps - ref_logps + (kl - kl)).detach()


def _kl_value(kl: torch.Tensor, config: KTOLossConfig, like: torch.Tensor) -> torch.Tensor:
    """The KL term the loss uses: ``kl`` for ``kto``, 0 for ``apo_zero_unpaired`` (TRL's zeros)."""
    value = kl.detach().reshape(()).to(like.device, like.dtype)
    return value if config.uses_kl else torch.zeros_like(value)


def kto_loss_torch(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    config: KTOLossConfig,
) -> KTOSequenceLosses:
    """KTO losses as TRL writes them in PyTorch; the coefficients come from autograd on ``[S]`` values.

    Runs in the dtype of ``policy_logps`` (float64 works), so it doubles as the reference of the kernel.

    Args:
        policy_logps: ``[S]`` policy sequence log-probs.
        ref_logps: ``[S]`` reference log-probs, or ``None`` for zeros.
        desirable: ``[S]`` bool, True where the completion is desirable.
        kl: one-element KL estimate (detached; ignored by ``apo_zero_unpaired``).
        config: the loss hyper-parameters.

    Returns:
        A ``KTOSequenceLosses``; no tensor in it requires grad.
    """
    num_seqs = _check_inputs(policy_logps, ref_logps, desirable, kl)
    leaf = policy_logps.detach().clone().requires_grad_(True)
    ref = torch.zeros_like(leaf) if ref_logps is None else ref_logps.detach().to(leaf.dtype)
    kl_used = _kl_value(kl, config, leaf)
    with torch.enable_grad():
        losses = _kto_losses(leaf, ref, desirable, kl_used, config)
        (coefs,) = torch.autograd.grad(losses.sum() / num_seqs, leaf)
    poison = _poison(leaf.detach(), ref, kl_used)
    return KTOSequenceLosses(
        losses=losses.detach() + poison,
        coefs=coefs + poison,
        rewards=config.beta * (leaf.detach() - ref),
    )


def kto_loss_triton(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    config: KTOLossConfig,
) -> KTOSequenceLosses:
    """The KTO losses in one launch of ``_kto_loss_fwd_kernel`` (fp32).

    Args:
        policy_logps: ``[S]`` policy sequence log-probs.
        ref_logps: ``[S]`` reference log-probs, or ``None`` for zeros.
        desirable: ``[S]`` bool, True where the completion is desirable.
        kl: one-element KL estimate (detached; ignored by ``apo_zero_unpaired``); read on device, no sync.
        config: the loss hyper-parameters.

    Returns:
        A ``KTOSequenceLosses`` in fp32.
    """
    import triton

    from fastdpo.kernels.kto_loss import _kto_loss_fwd_kernel

    num_seqs = _check_inputs(policy_logps, ref_logps, desirable, kl)
    device = policy_logps.device
    policy = policy_logps.detach().float().contiguous()
    ref = policy if ref_logps is None else ref_logps.detach().float().contiguous()
    labels = desirable.to(device=device, dtype=torch.int8).contiguous()
    kl_used = _kl_value(kl, config, policy).reshape(1).contiguous()
    losses = torch.empty(num_seqs, dtype=torch.float32, device=device)
    coefs = torch.empty(num_seqs, dtype=torch.float32, device=device)
    rewards = torch.empty(num_seqs, dtype=torch.float32, device=device)
    block = min(1024, triton.next_power_of_2(num_seqs))
    _kto_loss_fwd_kernel[(triton.cdiv(num_seqs, block),)](
        policy,
        ref,
        labels,
        kl_used,
        losses,
        coefs,
        rewards,
        num_seqs,
        1.0 / num_seqs,
        float(config.beta),
        float(config.desirable_weight),
        float(config.undesirable_weight),
        HAS_REFERENCE=ref_logps is not None,
        BLOCK_SIZE=block,
        num_warps=4,
    )
    return KTOSequenceLosses(losses=losses, coefs=coefs, rewards=rewards)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    config: KTOLossConfig,
    *,
    backend: str | None = None,
) -> KTOSequenceLosses:
    """Per-sequence KTO losses, rewards and ``d mean(loss) / d policy_logps``, dispatched by backend.

    Equals ``kto_loss_torch``: with ``r = policy_logps - ref_logps``, ``losses[s]`` is
    ``desirable_weight * (1 - sigmoid(beta * (r[s] - kl)))`` for a desirable sequence and
    ``undesirable_weight * (1 - sigmoid(beta * (kl - r[s])))`` otherwise (``kl = 0`` for
    ``apo_zero_unpaired``).

    Args:
        policy_logps: ``[S]`` policy sequence log-probs.
        ref_logps: ``[S]`` reference log-probs, or ``None`` for zeros.
        desirable: ``[S]`` bool, True where the completion is desirable.
        kl: one-element KL estimate (detached).
        config: the loss hyper-parameters.
        backend: ``"triton"``, ``"torch"`` or ``None`` (``resolve_backend`` picks by device).

    Returns:
        A ``KTOSequenceLosses``.
    """
    # On meta (fastdpo plan) the torch twin stands in: the kernel's outputs are per sequence, O(S).
    if policy_logps.is_meta or resolve_backend(policy_logps.device, backend) == "torch":
        return kto_loss_torch(policy_logps, ref_logps, desirable, kl, config)
    return kto_loss_triton(policy_logps, ref_logps, desirable, kl, config)
