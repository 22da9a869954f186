"""Per-pair preference losses on sequence log-probs: one Triton launch, or the readable torch reference.

Input is per sequence (``2B`` entries, chosen of pair ``j`` at ``j``, rejected at ``B + j``): the policy
log-probs, the reference log-probs and the response lengths. Output is the per-pair loss, the rewards and
the coefficients ``d mean_j(loss_j) / d policy_logps[s]`` that the fused linear loss scales into per-token
gradients, so no autograd graph over sequences is needed.

Every loss type is elementwise per pair and runs in the kernel except ``aot`` and ``aot_unpaired``, which
sort log-ratios across the batch and always take the torch path. ``sft`` is a token-level NLL, not a pair
loss: ``fastdpo.losses`` adds it per token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdpo.ops._grad_inside import grad_inside_op
from fastdpo.ops.linear_logprobs import resolve_backend

__all__ = [
    "KERNEL_LOSS_BITS",
    "PAIR_LOSS_TYPES",
    "F_DIVERGENCE_TYPES",
    "F_DIVERGENCE_LOSS_TYPES",
    "PreferenceLossConfig",
    "PairLossOutput",
    "preference_loss",
    "preference_loss_torch",
    "preference_loss_triton",
]

# Bit k of the kernel's LOSS_TYPES enables the loss type; the order matches kernels/preference_loss.py.
KERNEL_LOSS_BITS: Mapping[str, int] = {
    "sigmoid": 0,
    "hinge": 1,
    "ipo": 2,
    "exo_pair": 3,
    "nca_pair": 4,
    "robust": 5,
    "bco_pair": 6,
    "sppo_hard": 7,
    "apo_zero": 8,
    "apo_down": 9,
    "discopop": 10,
    "sigmoid_norm": 11,
    "simpo": 12,
    "orpo": 13,
}
_SORTED_LOSS_TYPES = ("aot", "aot_unpaired")
PAIR_LOSS_TYPES: tuple[str, ...] = tuple(KERNEL_LOSS_BITS) + _SORTED_LOSS_TYPES
F_DIVERGENCE_TYPES: Mapping[str, int] = {
    "reverse_kl": 0,
    "forward_kl": 1,
    "js_divergence": 2,
    "alpha_divergence": 3,
}
# As TRL: the f-DPO reparameterization only cancels log Z(x) in the chosen-rejected score difference.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
# TRL clamps (alpha - 1) * logratio here before exp, so the score stays finite in fp32.
_ALPHA_CLAMP = 80.0


@dataclass(frozen=True)
class PreferenceLossConfig:
    """Hyper-parameters of the pair losses, with TRL's names and defaults.

    Attributes:
        loss_types: pair loss types (``PAIR_LOSS_TYPES``), combined as ``sum_k loss_weights[k] * loss_k``.
        loss_weights: one weight per loss type.
        beta: DPO beta (IPO's tau, SimPO's and ORPO's beta).
        label_smoothing: robust / exo_pair / aot / simpo label smoothing.
        discopop_tau: DiscoPOP temperature.
        simpo_gamma: SimPO target reward margin.
        f_divergence_type: one of ``F_DIVERGENCE_TYPES``; applied to the log-ratios of the score-based types.
        f_alpha_divergence_coef: alpha of ``alpha_divergence``.
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] = (1.0,)
    beta: float = 0.1
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5

    def __post_init__(self) -> None:
        unknown = [t for t in self.loss_types if t not in PAIR_LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown pair loss type(s) {unknown}; expected any of {list(PAIR_LOSS_TYPES)}")
        if len(set(self.loss_types)) != len(self.loss_types):
            raise ValueError(f"loss_types has duplicates: {list(self.loss_types)}; list each type once")
        if len(self.loss_weights) != len(self.loss_types):
            raise ValueError(
                f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss_types)} loss types; "
                "expected one weight per loss type"
            )
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"unknown f_divergence_type {self.f_divergence_type!r}; "
                f"expected one of {list(F_DIVERGENCE_TYPES)}"
            )
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if "robust" in self.loss_types and not self.label_smoothing < 0.5:
            raise ValueError(
                f"label_smoothing must be in [0, 0.5) for the 'robust' loss (a label-flip probability), "
                f"got {self.label_smoothing}"
            )
        if "exo_pair" in self.loss_types and self.label_smoothing == 0.0:
            raise ValueError(
                "label_smoothing must be in (0, 1) for the 'exo_pair' loss; the EXO paper uses 1e-3"
            )
        if self.f_divergence_type != "reverse_kl":
            unsupported = [t for t in self.loss_types if t not in F_DIVERGENCE_LOSS_TYPES]
            if unsupported:
                raise ValueError(
                    f"f_divergence_type={self.f_divergence_type!r} is only defined for loss types "
                    f"{sorted(F_DIVERGENCE_LOSS_TYPES)}; got {unsupported}. "
                    "Use 'reverse_kl' with these losses"
                )
        if not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")

    @property
    def effective_f_divergence(self) -> str:
        """The f-divergence actually applied: alpha-divergence with alpha == 1 is reverse KL, as in TRL."""
        if self.f_divergence_type == "alpha_divergence" and abs(self.f_alpha_divergence_coef - 1.0) < 1e-6:
            return "reverse_kl"
        return self.f_divergence_type

    def restricted_to(self, loss_types: tuple[str, ...]) -> PreferenceLossConfig:
        """The same config keeping only ``loss_types`` (and their weights)."""
        keep = [i for i, t in enumerate(self.loss_types) if t in loss_types]
        return PreferenceLossConfig(
            loss_types=tuple(self.loss_types[i] for i in keep),
            loss_weights=tuple(self.loss_weights[i] for i in keep),
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            discopop_tau=self.discopop_tau,
            simpo_gamma=self.simpo_gamma,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef,
        )


@dataclass
class PairLossOutput:
    """Result of ``preference_loss``.

    Attributes:
        losses: ``[B]`` per-pair loss, already weighted and summed over the loss types.
        coefs: ``[2B]`` ``d losses.mean() / d policy_logps``.
        rewards: ``[2B]`` ``beta * (policy_logps - ref_logps)``.
        log_odds: ``[B]`` ORPO's log odds ratio when ``orpo`` is among the loss types, else ``None``.
    """

    losses: torch.Tensor
    coefs: torch.Tensor
    rewards: torch.Tensor
    log_odds: torch.Tensor | None


def _check_inputs(policy_logps: torch.Tensor, ref_logps: torch.Tensor | None, lengths: torch.Tensor) -> int:
    for name, t in (("policy_logps", policy_logps), ("ref_logps", ref_logps), ("lengths", lengths)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if policy_logps.ndim != 1 or policy_logps.numel() % 2 or policy_logps.numel() == 0:
        raise ValueError(
            f"policy_logps must be 1-D with an even, non-zero length 2B (chosen then rejected), "
            f"got shape {tuple(policy_logps.shape)}"
        )
    for name, t in (("ref_logps", ref_logps), ("lengths", lengths)):
        if t is not None and t.shape != policy_logps.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected {tuple(policy_logps.shape)} like policy_logps"
            )
    return policy_logps.numel() // 2


def _f_divergence_scores(logratios: torch.Tensor, config: PreferenceLossConfig) -> torch.Tensor:
    kind = config.effective_f_divergence
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        alpha = config.f_alpha_divergence_coef
        t = torch.clamp((alpha - 1.0) * logratios, max=_ALPHA_CLAMP)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    return logratios


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _pair_losses(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    lengths: torch.Tensor,
    config: PreferenceLossConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """TRL's formulas on differentiable sequence log-probs; returns (losses [B], rewards [2B], log_odds)."""
    beta, eps = config.beta, config.label_smoothing
    ref = torch.zeros_like(policy_logps) if ref_logps is None else ref_logps.to(policy_logps.dtype)
    chosen_logps, rejected_logps = policy_logps.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    chosen_len, rejected_len = lengths.to(policy_logps.dtype).clamp(min=1.0).chunk(2)
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    chosen_scores = _f_divergence_scores(chosen_logratios, config)
    rejected_scores = _f_divergence_scores(rejected_logratios, config)
    delta = chosen_scores - rejected_scores
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios

    losses = torch.zeros_like(chosen_logps)
    log_odds = None
    for loss_type, weight in zip(config.loss_types, config.loss_weights, strict=True):
        if loss_type == "sigmoid":
            loss = -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":
            loss = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            ipo_delta = chosen_scores / chosen_len - rejected_scores / rejected_len
            loss = (ipo_delta - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            z = beta * delta
            log_pw, log_pl = math.log1p(-eps), math.log(eps)
            qw, ql = torch.sigmoid(z), torch.sigmoid(-z)
            loss = qw * (F.logsigmoid(z) - log_pw) + ql * (F.logsigmoid(-z) - log_pl)
        elif loss_type == "nca_pair":
            loss = (
                -F.logsigmoid(chosen_rewards)
                - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards)
            )
        elif loss_type == "robust":
            clean = -(1 - eps) * F.logsigmoid(beta * delta)
            flipped = -eps * F.logsigmoid(-beta * delta)
            loss = (clean - flipped) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            loss = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
        elif loss_type == "sppo_hard":
            loss = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type == "apo_zero":
            loss = 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
        elif loss_type == "apo_down":
            margin = beta * (chosen_logratios - rejected_logratios)
            loss = torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(margin)
        elif loss_type == "discopop":
            logits = beta * delta
            modulation = torch.sigmoid(logits / config.discopop_tau)
            loss = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        elif loss_type == "sigmoid_norm":
            loss = -F.logsigmoid(beta * (chosen_scores / chosen_len - rejected_scores / rejected_len))
        elif loss_type == "simpo":
            logits = beta * (chosen_logps - rejected_logps) - config.simpo_gamma
            loss = -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps
        elif loss_type == "orpo":
            log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
            loss = -beta * F.logsigmoid(log_odds)
        else:
            if loss_type == "aot":
                sorted_pol, _ = torch.sort(chosen_logps - rejected_logps)
                sorted_ref, _ = torch.sort(ref_chosen - ref_rejected)
                d = sorted_pol - sorted_ref
            else:
                sorted_chosen, _ = torch.sort(chosen_logratios)
                sorted_rejected, _ = torch.sort(rejected_logratios)
                d = sorted_chosen - sorted_rejected
            loss = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
        losses = losses + weight * loss
    rewards = torch.cat([chosen_rewards, rejected_rewards])
    return losses + _poison(policy_logps, ref), rewards, log_odds


def _poison(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``[B]`` zeros, NaN for a pair with NaN/Inf inputs: some losses saturate to finite values on Inf."""
    bad = (policy_logps - policy_logps + ref_logps - ref_logps).detach()
    chosen, rejected = bad.chunk(2)
    return chosen + rejected


@torch.library.custom_op("fastdpo::preference_loss_torch", mutates_args=())
def _torch_op(
    policy: torch.Tensor,
    ref: torch.Tensor | None,
    lengths: torch.Tensor,
    loss_types: str,
    loss_weights: list[float],
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    simpo_gamma: float,
    f_divergence_type: str,
    f_alpha_divergence_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses [B], coefs [2B], rewards [2B], log_odds [B] or [0])`` in policy's dtype.

    ``loss_types`` are comma-separated, possibly none (a schema has no list of strings).
    """
    config = PreferenceLossConfig(
        tuple(t for t in loss_types.split(",") if t), tuple(loss_weights), beta, label_smoothing,
        discopop_tau, simpo_gamma, f_divergence_type, f_alpha_divergence_coef,
    )  # fmt: skip
    num_pairs = policy.numel() // 2
    with grad_inside_op():
        leaf = policy.detach().clone().requires_grad_(True)
        losses, rewards, log_odds = _pair_losses(leaf, ref, lengths, config)
        if losses.requires_grad:
            (coefs,) = torch.autograd.grad(losses.sum() / num_pairs, leaf)
        else:
            coefs = torch.zeros_like(leaf)
    ref_values = torch.zeros_like(policy) if ref is None else ref.to(policy.dtype)
    coefs = coefs + _poison(policy, ref_values).repeat(2)
    log_odds = policy.new_empty(0) if log_odds is None else log_odds.detach()
    return losses.detach(), coefs, rewards.detach(), log_odds


@_torch_op.register_fake
def _(policy, ref, lengths, loss_types, loss_weights, *config):  # noqa: ANN001, ANN002, ANN202
    num_pairs = policy.shape[0] // 2
    log_odds = policy.new_empty(num_pairs if "orpo" in loss_types.split(",") else 0)
    return policy.new_empty(num_pairs), torch.empty_like(policy), torch.empty_like(policy), log_odds


def preference_loss_torch(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    lengths: torch.Tensor,
    config: PreferenceLossConfig,
) -> PairLossOutput:
    """Pair losses as TRL writes them in PyTorch; the coefficients come from autograd on ``[2B]`` values.

    Runs in the dtype of ``policy_logps`` (float64 works), so it doubles as the reference of the kernel.
    The op ``fastdpo::preference_loss_torch``.

    Args:
        policy_logps: ``[2B]`` policy sequence log-probs (chosen then rejected).
        ref_logps: ``[2B]`` reference log-probs, or ``None`` for reference-free (zeros).
        lengths: ``[2B]`` response token counts (ipo and sigmoid_norm divide by them).
        config: the loss hyper-parameters.

    Returns:
        A ``PairLossOutput``; no tensor in it requires grad.
    """
    _check_inputs(policy_logps, ref_logps, lengths)
    c = config
    losses, coefs, rewards, log_odds = _torch_op(
        policy_logps.detach(), None if ref_logps is None else ref_logps.detach(), lengths.detach(),
        ",".join(c.loss_types), [float(w) for w in c.loss_weights], float(c.beta), float(c.label_smoothing),
        float(c.discopop_tau), float(c.simpo_gamma), c.f_divergence_type, float(c.f_alpha_divergence_coef),
    )  # fmt: skip
    has_orpo = "orpo" in config.loss_types
    return PairLossOutput(losses, coefs, rewards, log_odds if has_orpo else None)


@torch.library.triton_op("fastdpo::preference_loss_triton", mutates_args=())
def _triton_op(
    policy: torch.Tensor,
    ref: torch.Tensor | None,
    lengths: torch.Tensor,
    loss_mask: int,
    weights: list[float],
    beta: float,
    label_smoothing: float,
    discopop_tau: float,
    simpo_gamma: float,
    f_alpha_divergence_coef: float,
    f_divergence: int,
    has_orpo: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(losses [B], coefs [2B], rewards [2B], log_odds [B] or [1])`` in fp32, one kernel launch."""
    import triton
    from torch.library import wrap_triton

    from fastdpo.kernels.preference_loss import _preference_loss_fwd_kernel

    num_pairs = policy.shape[0] // 2
    device = policy.device
    policy = policy.float().contiguous()
    ref_values = policy if ref is None else ref.float().contiguous()
    # One weight per kernel loss bit: a host-to-device copy of 14 floats, no device sync.
    weight_values = torch.tensor(weights, dtype=torch.float32, device=device)
    losses = torch.empty(num_pairs, dtype=torch.float32, device=device)
    coefs = torch.empty(2 * num_pairs, dtype=torch.float32, device=device)
    rewards = torch.empty(2 * num_pairs, dtype=torch.float32, device=device)
    log_odds = torch.empty(num_pairs if has_orpo else 1, dtype=torch.float32, device=device)
    block = min(1024, triton.next_power_of_2(num_pairs))
    wrap_triton(_preference_loss_fwd_kernel)[(triton.cdiv(num_pairs, block),)](
        policy, ref_values, lengths.float().contiguous(), weight_values, losses, coefs, rewards, log_odds,
        num_pairs, 1.0 / num_pairs, beta, label_smoothing, discopop_tau, simpo_gamma, f_alpha_divergence_coef,
        LOSS_TYPES=loss_mask, F_DIVERGENCE=f_divergence, HAS_REFERENCE=ref is not None, BLOCK_SIZE=block,
        num_warps=4,
    )  # fmt: skip
    return losses, coefs, rewards, log_odds


@_triton_op.register_fake
def _(policy, ref, lengths, loss_mask, weights, *config):  # noqa: ANN001, ANN002, ANN202
    num_pairs, has_orpo = policy.shape[0] // 2, config[-1]
    pairs = policy.new_empty(num_pairs, dtype=torch.float32)
    seqs = policy.new_empty(2 * num_pairs, dtype=torch.float32)
    log_odds = policy.new_empty(num_pairs if has_orpo else 1, dtype=torch.float32)
    return pairs, seqs, torch.empty_like(seqs), log_odds


def preference_loss_triton(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    lengths: torch.Tensor,
    config: PreferenceLossConfig,
) -> PairLossOutput:
    """The elementwise pair losses of ``config`` in one launch of ``_preference_loss_fwd_kernel`` (fp32).

    The op ``fastdpo::preference_loss_triton`` (a ``triton_op``: torch.compile traces into its launch).

    Args:
        policy_logps: ``[2B]`` policy sequence log-probs (chosen then rejected).
        ref_logps: ``[2B]`` reference log-probs, or ``None`` for reference-free.
        lengths: ``[2B]`` response token counts.
        config: the loss hyper-parameters; every loss type must be in ``KERNEL_LOSS_BITS``.

    Returns:
        A ``PairLossOutput`` in fp32.
    """
    _check_inputs(policy_logps, ref_logps, lengths)
    not_fused = [t for t in config.loss_types if t not in KERNEL_LOSS_BITS]
    if not_fused:
        raise ValueError(f"loss types {not_fused} have no kernel; expected only {list(KERNEL_LOSS_BITS)}")
    mask = 0
    weights = [0.0] * len(KERNEL_LOSS_BITS)
    for loss_type, weight in zip(config.loss_types, config.loss_weights, strict=True):
        mask |= 1 << KERNEL_LOSS_BITS[loss_type]
        weights[KERNEL_LOSS_BITS[loss_type]] = float(weight)
    has_orpo = "orpo" in config.loss_types
    losses, coefs, rewards, log_odds = _triton_op(
        policy_logps.detach(), None if ref_logps is None else ref_logps.detach(), lengths.detach(), mask,
        weights, float(config.beta), float(config.label_smoothing), float(config.discopop_tau),
        float(config.simpo_gamma), float(config.f_alpha_divergence_coef),
        F_DIVERGENCE_TYPES[config.effective_f_divergence], has_orpo,
    )  # fmt: skip
    return PairLossOutput(losses, coefs, rewards, log_odds if has_orpo else None)


def preference_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    lengths: torch.Tensor,
    config: PreferenceLossConfig,
    *,
    backend: str | None = None,
) -> PairLossOutput:
    """Per-pair preference losses, rewards and ``d mean(loss) / d policy_logps``, dispatched by backend.

    Equals ``preference_loss_torch``. With the triton backend the elementwise loss types run in one kernel
    launch and ``aot`` / ``aot_unpaired`` (batch sorts) are added from the torch path.

    Args:
        policy_logps: ``[2B]`` policy sequence log-probs (chosen then rejected).
        ref_logps: ``[2B]`` reference log-probs, or ``None`` for reference-free (zeros).
        lengths: ``[2B]`` response token counts.
        config: the loss hyper-parameters.
        backend: ``"triton"``, ``"torch"`` or ``None`` (``resolve_backend`` picks by device).

    Returns:
        A ``PairLossOutput``.
    """
    _check_inputs(policy_logps, ref_logps, lengths)
    # On meta (fastdpo plan) the torch twin stands in: the kernel's outputs are per sequence, O(S).
    if policy_logps.is_meta or resolve_backend(policy_logps.device, backend) == "torch":
        return preference_loss_torch(policy_logps, ref_logps, lengths, config)
    fused = tuple(t for t in config.loss_types if t in KERNEL_LOSS_BITS)
    out = preference_loss_triton(policy_logps, ref_logps, lengths, config.restricted_to(fused))
    sorted_types = tuple(t for t in config.loss_types if t not in KERNEL_LOSS_BITS)
    if sorted_types:
        sorted_config = config.restricted_to(sorted_types)
        extra = preference_loss_torch(policy_logps.float(), ref_logps, lengths, sorted_config)
        out.losses = out.losses + extra.losses
        out.coefs = out.coefs + extra.coefs
    return out
