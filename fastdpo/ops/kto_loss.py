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

from fastdpo.ops._grad_inside import grad_inside_op
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


@torch.library.custom_op("fastdpo::kto_loss_torch", mutates_args=())
def _torch_op(
    policy: torch.Tensor,
    ref: torch.Tensor | None,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    loss_type: str,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses, coefs, rewards)``, ``[S]`` each in policy's dtype."""
    config = KTOLossConfig(loss_type, beta, desirable_weight, undesirable_weight)
    num_seqs = policy.numel()
    ref_values = torch.zeros_like(policy) if ref is None else ref.to(policy.dtype)
    kl_used = _kl_value(kl, config, policy)
    with grad_inside_op():
        leaf = policy.detach().clone().requires_grad_(True)
        losses = _kto_losses(leaf, ref_values, desirable, kl_used, config)
        (coefs,) = torch.autograd.grad(losses.sum() / num_seqs, leaf)
    poison = _poison(policy, ref_values, kl_used)
    return losses.detach() + poison, coefs + poison, config.beta * (policy - ref_values)


@_torch_op.register_fake
def _(policy, ref, desirable, kl, *config):  # noqa: ANN001, ANN002, ANN202
    return torch.empty_like(policy), torch.empty_like(policy), torch.empty_like(policy)


def kto_loss_torch(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    config: KTOLossConfig,
) -> KTOSequenceLosses:
    """KTO losses as TRL writes them in PyTorch; the coefficients come from autograd on ``[S]`` values.

    Runs in the dtype of ``policy_logps`` (float64 works), so it doubles as the reference of the kernel.
    The op ``fastdpo::kto_loss_torch``.

    Args:
        policy_logps: ``[S]`` policy sequence log-probs.
        ref_logps: ``[S]`` reference log-probs, or ``None`` for zeros.
        desirable: ``[S]`` bool, True where the completion is desirable.
        kl: one-element KL estimate (detached; ignored by ``apo_zero_unpaired``).
        config: the loss hyper-parameters.

    Returns:
        A ``KTOSequenceLosses``; no tensor in it requires grad.
    """
    _check_inputs(policy_logps, ref_logps, desirable, kl)
    c = config
    losses, coefs, rewards = _torch_op(
        policy_logps.detach(), None if ref_logps is None else ref_logps.detach(), desirable, kl.detach(),
        c.loss_type, float(c.beta), float(c.desirable_weight), float(c.undesirable_weight),
    )  # fmt: skip
    return KTOSequenceLosses(losses=losses, coefs=coefs, rewards=rewards)


@torch.library.triton_op("fastdpo::kto_loss_triton", mutates_args=())
def _triton_op(
    policy: torch.Tensor,
    ref: torch.Tensor | None,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses, coefs, rewards)``, fp32 ``[S]`` each, one kernel launch; ``kl`` is read on the device."""
    import triton
    from torch.library import wrap_triton

    from fastdpo.kernels.kto_loss import _kto_loss_fwd_kernel

    num_seqs = policy.shape[0]
    device = policy.device
    policy = policy.float().contiguous()
    ref_values = policy if ref is None else ref.float().contiguous()
    labels = desirable.to(device=device, dtype=torch.int8).contiguous()
    losses = torch.empty(num_seqs, dtype=torch.float32, device=device)
    coefs = torch.empty(num_seqs, dtype=torch.float32, device=device)
    rewards = torch.empty(num_seqs, dtype=torch.float32, device=device)
    block = min(1024, triton.next_power_of_2(num_seqs))
    wrap_triton(_kto_loss_fwd_kernel)[(triton.cdiv(num_seqs, block),)](
        policy, ref_values, labels, kl.float().reshape(1).contiguous(), losses, coefs, rewards, num_seqs,
        1.0 / num_seqs, beta, desirable_weight, undesirable_weight, HAS_REFERENCE=ref is not None,
        BLOCK_SIZE=block, num_warps=4,
    )  # fmt: skip
    return losses, coefs, rewards


@_triton_op.register_fake
def _(policy, ref, desirable, kl, *config):  # noqa: ANN001, ANN002, ANN202
    seqs = policy.new_empty(policy.shape[0], dtype=torch.float32)
    return seqs, torch.empty_like(seqs), torch.empty_like(seqs)


def kto_loss_triton(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    config: KTOLossConfig,
) -> KTOSequenceLosses:
    """The KTO losses in one launch of ``_kto_loss_fwd_kernel`` (fp32).

    The op ``fastdpo::kto_loss_triton`` (a ``triton_op``: torch.compile traces into its launch).

    Args:
        policy_logps: ``[S]`` policy sequence log-probs.
        ref_logps: ``[S]`` reference log-probs, or ``None`` for zeros.
        desirable: ``[S]`` bool, True where the completion is desirable.
        kl: one-element KL estimate (detached; ignored by ``apo_zero_unpaired``); read on device, no sync.
        config: the loss hyper-parameters.

    Returns:
        A ``KTOSequenceLosses`` in fp32.
    """
    _check_inputs(policy_logps, ref_logps, desirable, kl)
    policy = policy_logps.detach()
    losses, coefs, rewards = _triton_op(
        policy, None if ref_logps is None else ref_logps.detach(), desirable,
        _kl_value(kl, config, policy.float()), float(config.beta), float(config.desirable_weight),
        float(config.undesirable_weight),
    )  # fmt: skip
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
