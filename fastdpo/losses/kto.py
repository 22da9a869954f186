"""The unpaired (KTO) fused loss: lm_head + log-softmax + gather + KTO loss, without a token graph.

Dimension letters: S scored sequences (one completion each), N tokens, M valid tokens, D hidden, V vocab.

``FusedLinearKTOLoss`` takes final hidden states, the lm_head weight and one desirable / undesirable label
per sequence. The shared Function (``fused.py``) computes the per-token log-probs; here they are reduced
to sequence log-probs and turned into TRL 1.16 ``KTOTrainer``'s losses (``fastdpo.ops.kto_loss``, one
kernel launch) and per-token loss coefficients. The KL term is a detached scalar: given by the caller, or
estimated in the same call from the mismatched (KL) completions, as TRL does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fastdpo.losses.fused import HeadOptions, LossParts, fused_head_loss, head_options, scored_logps
from fastdpo.losses.tokens import (
    Tokens,
    check_lengths,
    check_linear,
    check_tensor,
    flatten_layout,
    prepare_tokens,
    reduce_tokens,
)
from fastdpo.ops.kto_loss import KTO_LOSS_TYPES, KTOLossConfig, check_preference_labels, kto_loss
from fastdpo.ops.linear_logprobs import TokenStats
from fastdpo.packing import IGNORE_INDEX

__all__ = ["KTO_LOSS_TYPES", "KTOLossOutput", "FusedLinearKTOLoss"]


@dataclass
class KTOLossOutput:
    """Result of ``FusedLinearKTOLoss``; every tensor but ``loss`` is detached fp32.

    Attributes:
        loss: scalar training loss, the mean of ``losses`` (differentiable w.r.t. hidden, weight, bias).
        losses: ``[S]`` per-sequence loss, times its desirable / undesirable weight.
        logps: ``[S]`` scored policy log-probs (summed, or averaged with ``average_log_prob``).
        ref_logps: ``[S]`` reference log-probs used.
        rewards: ``[S]`` ``beta * (logps - ref_logps)``.
        kl: 0-dim KL term used (0 for ``apo_zero_unpaired`` or when none was given).
        metrics: 0-dim tensors for this batch, unsynced. Sums and counts that add up across batches and
            ranks: ``rewards/chosen_sum``, ``rewards/rejected_sum``, ``logps/chosen_sum``,
            ``logps/rejected_sum`` (NaN-skipping, as TRL's ``nansum``), ``count/chosen``, ``count/rejected``;
            and TRL 1.16's logged names, present as TRL logs them: ``kl``; ``rewards/chosen`` and
            ``logps/chosen`` when the batch has a desirable sequence; ``rewards/rejected`` and
            ``logps/rejected`` when it has an undesirable one; ``rewards/margins`` when it has both. With
            ``stats=True`` also ``entropy`` (mean over the scored tokens) and ``logits/chosen`` /
            ``logits/rejected`` (mean logit over the desirable / undesirable sequences' tokens, present
            when there are such tokens).
        token_stats: with ``stats=True``, the scored tokens' ``TokenStats`` (entropy, mean logit, label is
            argmax, ``log sum p^2``), ``[M]`` each, in the row-major order of the labels that are not
            ``ignore_index``; None otherwise.
    """

    loss: torch.Tensor
    losses: torch.Tensor
    logps: torch.Tensor
    ref_logps: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    token_stats: TokenStats | None = None


def _sequence_tokens(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    seq_index: torch.Tensor | None,
    num_seqs: int | None,
    *,
    ignore_index: int,
    average: bool,
) -> Tokens:
    """Validates a batch of single sequences in either layout; returns its valid tokens and their weights."""
    hidden2d, labels1d, seq1d, padded_rows = flatten_layout(
        hidden, labels, seq_index, rows_hint="[S, T]", count_name="num_seqs"
    )
    if padded_rows is not None:
        if padded_rows == 0:
            raise ValueError("padded layout needs at least one row (one sequence), got 0")
        if num_seqs is not None and num_seqs != padded_rows:
            raise ValueError(f"num_seqs={num_seqs} disagrees with the {padded_rows} padded rows")
        num_seqs = padded_rows
    elif not isinstance(num_seqs, int) or isinstance(num_seqs, bool) or num_seqs <= 0:
        raise ValueError(f"packed layout needs num_seqs, a positive int, got {num_seqs!r}")
    check_linear(hidden2d, weight, bias, "")
    tokens = prepare_tokens(
        hidden2d,
        labels1d,
        seq1d,
        padded_len=labels.shape[-1],
        num_seqs=num_seqs,
        vocab=weight.shape[0],
        ignore_index=ignore_index,
        seqs_name="S",
    )
    if average:
        check_lengths(tokens, ["average_log_prob=True"])
        tokens.token_weights = tokens.token_weights / tokens.lengths[tokens.seq_index]
    return tokens


def _check_seq_values(name: str, t: object, num_seqs: int, device: torch.device) -> torch.Tensor:
    check_tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != (num_seqs,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [S]=[{num_seqs}], one per sequence")
    return t.detach().float().to(device)


def _check_kl(kl: object, device: torch.device) -> torch.Tensor:
    """A caller's KL term: a Python number or one-element float tensor; returned as 0-dim fp32.

    A non-finite value is accepted and makes the loss non-finite, as any other non-finite input does: it is
    what TRL's own estimate gives when a KL completion's log-prob is non-finite (e.g. fp16 overflow).
    """
    if isinstance(kl, torch.Tensor):
        if kl.numel() != 1 or not kl.is_floating_point():
            raise ValueError(
                f"kl must be a scalar (a float or one-element float tensor), got a {kl.dtype} "
                f"tensor of shape {tuple(kl.shape)}"
            )
        return kl.detach().reshape(()).float().to(device)
    if isinstance(kl, (int, float)) and not isinstance(kl, bool):
        return torch.tensor(float(kl), dtype=torch.float32, device=device)
    raise ValueError(f"kl must be a scalar (a float or one-element float tensor), got {kl!r}")


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a 0-dim tensor over the ranks of an initialized default process group (TRL's gather)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / dist.get_world_size()


def _metrics(
    logps: torch.Tensor, rewards: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL's KTO metrics of one batch, plus the sums and counts they are built from.

    Eagerly a group without sequences has no mean (one host sync decides); under torch.compile the keys
    cannot depend on data, so every mean is present and NaN (0 / 0) for an empty group.
    """
    compiled = torch.compiler.is_compiling()
    num_chosen = desirable.sum() if compiled else int(desirable.sum().item())
    num_rejected = desirable.shape[0] - num_chosen
    zero = torch.zeros((), dtype=torch.float32, device=logps.device)
    metrics = {"kl": kl}
    for name, mask, count in (("chosen", desirable, num_chosen), ("rejected", ~desirable, num_rejected)):
        metrics[f"count/{name}"] = zero + count
        metrics[f"rewards/{name}_sum"] = torch.where(mask, rewards, 0.0).nansum()
        metrics[f"logps/{name}_sum"] = torch.where(mask, logps, 0.0).nansum()
        if compiled or count:
            metrics[f"rewards/{name}"] = metrics[f"rewards/{name}_sum"] / count
            metrics[f"logps/{name}"] = metrics[f"logps/{name}_sum"] / count
    if compiled or (num_chosen and num_rejected):
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def _stat_metrics(stats: TokenStats, tokens: Tokens, desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's KTO token metrics: entropy over every scored token; mean logit per label group with tokens
    (under torch.compile every group, NaN without tokens, as in :func:`_metrics`)."""
    compiled = torch.compiler.is_compiling()
    entropy = stats.entropy.sum() / max(stats.entropy.numel(), 1)
    metrics = {"entropy": entropy}
    token_desirable = desirable.index_select(0, tokens.seq_index)
    for name, mask in (("chosen", token_desirable), ("rejected", ~token_desirable)):
        if compiled:
            metrics[f"logits/{name}"] = torch.where(mask, stats.mean_logit, 0.0).sum() / mask.sum()
            continue
        count = int(mask.sum().item())
        if count:
            metrics[f"logits/{name}"] = stats.mean_logit[mask].sum() / count
    return metrics


class FusedLinearKTOLoss(nn.Module):
    """TRL's KTO losses fused with lm_head: ``kto(log_softmax(hidden @ weight.T + bias)[labels])``.

    In plain PyTorch (padded layout, no options)::

        logp = (hidden @ weight.T + bias).float().log_softmax(-1)
        logps = (logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * (labels != ignore_index)).sum(-1)
        z = beta * (logps - ref_logps - kl)
        losses = torch.where(preference_labels, desirable_weight * (1 - z.sigmoid()),
                             undesirable_weight * (1 - (-z).sigmoid()))
        loss = losses.mean()

    ``apo_zero_unpaired`` is the same with ``kl = 0``. As TRL, the weighted desirable and undesirable
    losses are averaged together over the batch (not per group). The ``[N, V]`` logits are never
    materialized and no per-token autograd graph is built; gradients reach ``hidden``, ``weight``, ``bias``.

    Layouts: padded ``hidden [S, T, D]`` / ``labels [S, T]`` (labels aligned with hidden, i.e. already
    shifted) or packed ``hidden [N, D]`` / ``labels [N]`` with ``seq_index [N]`` and ``num_seqs``; the KL
    completions likewise (``kl_seq_index``, same ``num_seqs``). Both layouts give identical numbers.

    The KL term is one of: ``kl``, a scalar the caller computed (used as given); the KL completions
    ``kl_hidden`` / ``kl_labels`` with ``kl_ref_logps`` or ``kl_ref_hidden``, scored here without grad into
    TRL's estimate ``mean(kl_logps - kl_ref_logps)``, averaged across ranks under an initialized
    ``torch.distributed`` and clamped at 0; or nothing, which means 0 (TRL's and Liger's value when no
    KL is computed, and what ``apo_zero_unpaired`` uses). A batch of only desirable or only undesirable
    sequences is valid. NaN or Inf in the used inputs propagates to the loss; as in TRL (a plain mean, not
    ``nanmean``), one non-finite KL log-prob makes the KL term non-finite, and with it the loss.

    Under ``torch.autocast``, hidden, weight, bias and the reference tensors may come in any float dtype
    (e.g. fp32 masters): the products run in the autocast dtype, chunk by chunk inside the head, sums run
    in fp32, and the gradients come back in the dtypes passed. Outside autocast, hidden, weight and bias
    must share a dtype.

    Args:
        beta: KTO beta.
        loss_type: ``"kto"`` or ``"apo_zero_unpaired"``.
        desirable_weight: weight of a desirable sequence's loss.
        undesirable_weight: weight of an undesirable sequence's loss.
        ignore_index: label marking tokens without loss.
        average_log_prob: score the per-token mean instead of the sum of log-probs (as Liger's
            ``average_log_prob``; TRL sums). A fully masked sequence is then a ``ValueError``.
        backend: ``"triton"``, ``"torch"`` or None (by device, or ``FASTDPO_BACKEND``).
        impl: ``"fused"``, ``"chunked"`` or None (``fastdpo.ops.linear_logprobs.resolve_impl``).
        stats: also compute, in the same pass over the vocabulary, each scored token's entropy, mean logit,
            whether its label is the argmax and ``log sum p^2``: returned in ``token_stats`` and as TRL's
            ``entropy`` / ``logits/*`` metrics.
        temperature: divides the logits.
        softcap: final-logit soft-capping (Gemma-2), or None.
        filter_eps: backward gradient filtering of the triton backend (see ``linear_logprobs``).
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        average_log_prob: bool = False,
        backend: str | None = None,
        *,
        impl: str | None = None,
        temperature: float = 1.0,
        softcap: float | None = None,
        filter_eps: float | str | None = "auto",
        stats: bool = False,
    ) -> None:
        super().__init__()
        self.config = KTOLossConfig(
            loss_type=loss_type,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
        )
        self.head: HeadOptions = head_options(
            temperature=temperature, softcap=softcap, filter_eps=filter_eps, backend=backend, impl=impl
        )
        self.stats = bool(stats)
        self.ignore_index = int(ignore_index)
        self.average_log_prob = bool(average_log_prob)

    def _token_options(self) -> dict[str, int | bool]:
        """``_sequence_tokens``'s keyword arguments from this loss's settings."""
        return {"ignore_index": self.ignore_index, "average": self.average_log_prob}

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        preference_labels: torch.Tensor,
        ref_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        kl: float | torch.Tensor | None = None,
        kl_hidden: torch.Tensor | None = None,
        kl_labels: torch.Tensor | None = None,
        kl_ref_logps: torch.Tensor | None = None,
        kl_ref_hidden: torch.Tensor | None = None,
        seq_index: torch.Tensor | None = None,
        num_seqs: int | None = None,
        kl_seq_index: torch.Tensor | None = None,
    ) -> KTOLossOutput:
        """Computes the loss, rewards, KL term and metrics of one batch.

        Args:
            hidden: ``[S, T, D]`` (padded) or ``[N, D]`` (packed) final hidden states.
            weight: ``[V, D]`` lm_head weight.
            labels: ``[S, T]`` or ``[N]`` next-token ids aligned with hidden, ``ignore_index`` where no loss.
            bias: optional ``[V]`` lm_head bias.
            preference_labels: ``[S]`` bool (or 0/1), True where the completion is desirable.
            ref_logps: ``[S]`` precomputed reference log-probs, scored like the policy's.
            ref_hidden: reference hidden states shaped like ``hidden``; scored without grad with
                ``ref_weight`` / ``ref_bias`` (default: the policy's).
            ref_weight: ``[V, D]`` reference lm_head weight (also scores ``kl_ref_hidden``).
            ref_bias: ``[V]`` reference lm_head bias.
            kl: the KL term as a scalar; excludes the KL completions.
            kl_hidden: policy hidden states of the mismatched completions, ``[S, T', D]`` or ``[N', D]``.
            kl_labels: their labels, ``[S, T']`` or ``[N']``.
            kl_ref_logps: ``[S]`` precomputed reference log-probs of the KL completions.
            kl_ref_hidden: reference hidden states of the KL completions, shaped like ``kl_hidden``.
            seq_index: packed layout: ``[N]`` sequence of each token (``-1`` at ignored tokens).
            num_seqs: packed layout: S.
            kl_seq_index: packed KL completions: ``[N']`` sequence of each token.

        Returns:
            A ``KTOLossOutput``.
        """
        # Under autocast the tensors stay uncast (e.g. fp32 hidden states and master weight): the head casts
        # each chunk to the autocast dtype and returns gradients in the dtypes passed here.
        tokens = _sequence_tokens(hidden, weight, bias, labels, seq_index, num_seqs, **self._token_options())
        s, device = tokens.num_seqs, hidden.device
        desirable = check_preference_labels(preference_labels, s, device)
        r_weight = weight if ref_weight is None else ref_weight
        r_bias = bias if ref_weight is None and ref_bias is None else ref_bias
        ref = self._reference(tokens, ref_logps, ref_hidden, r_weight, r_bias, hidden, "", weight.shape[0])
        kl_value = self._kl(
            kl,
            kl_hidden=kl_hidden,
            kl_labels=kl_labels,
            kl_ref_logps=kl_ref_logps,
            kl_ref_hidden=kl_ref_hidden,
            kl_seq_index=kl_seq_index,
            weight=weight,
            bias=bias,
            ref_weight=r_weight,
            ref_bias=r_bias,
            num_seqs=s,
            device=device,
        )

        config, backend = self.config, self.head.backend

        def sequence_loss(logp: torch.Tensor, token_stats: TokenStats | None) -> LossParts:
            seq_logps = reduce_tokens(logp, tokens)
            out = kto_loss(seq_logps, ref, desirable, kl_value, config, backend=backend)
            token_grad = out.coefs.index_select(0, tokens.seq_index) * tokens.token_weights
            return LossParts(out.losses.mean(), token_grad, (seq_logps, out.rewards, out.losses))

        loss, logps, rewards, losses, *token_stats = fused_head_loss(
            weight, bias, tokens, self.head, sequence_loss, stats=self.stats
        )
        kl_used = kl_value if config.uses_kl else torch.zeros_like(kl_value)
        metrics = _metrics(logps, rewards, desirable, kl_used)
        if self.stats:
            metrics.update(_stat_metrics(token_stats[0], tokens, desirable))
        return KTOLossOutput(
            loss=loss,
            losses=losses,
            logps=logps,
            ref_logps=ref,
            rewards=rewards,
            kl=kl_used,
            metrics=metrics,
            token_stats=token_stats[0] if self.stats else None,
        )

    def _reference(
        self,
        tokens: Tokens,
        ref_logps: torch.Tensor | None,
        ref_hidden: torch.Tensor | None,
        ref_weight: torch.Tensor,
        ref_bias: torch.Tensor | None,
        hidden: torch.Tensor,
        prefix: str,
        vocab: int,
    ) -> torch.Tensor:
        """``[S]`` reference log-probs: the given ones, or ``ref_hidden`` scored on the same tokens."""
        if (ref_logps is None) == (ref_hidden is None):
            raise ValueError(
                f"KTO needs a reference: pass exactly one of {prefix}ref_logps ([S] precomputed) or "
                f"{prefix}ref_hidden (hidden states shaped like {prefix}hidden)"
            )
        if ref_logps is not None:
            return _check_seq_values(f"{prefix}ref_logps", ref_logps, tokens.num_seqs, hidden.device)
        check_tensor(f"{prefix}ref_hidden", ref_hidden)
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"{prefix}ref_hidden shape {tuple(ref_hidden.shape)} must match {prefix}hidden's tokens "
                f"{tuple(hidden.shape[:-1])} (same batch, same labels)"
            )
        r_hidden2d = ref_hidden.reshape(-1, ref_hidden.shape[-1])
        check_linear(r_hidden2d, ref_weight, ref_bias, "ref_")
        if ref_weight.shape[0] != vocab:
            raise ValueError(f"ref_weight has V={ref_weight.shape[0]}, the policy's weight V={vocab}")
        return scored_logps(r_hidden2d, ref_weight, ref_bias, tokens, self.head)

    def _kl(
        self,
        kl: float | torch.Tensor | None,
        *,
        kl_hidden: torch.Tensor | None,
        kl_labels: torch.Tensor | None,
        kl_ref_logps: torch.Tensor | None,
        kl_ref_hidden: torch.Tensor | None,
        kl_seq_index: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ref_weight: torch.Tensor,
        ref_bias: torch.Tensor | None,
        num_seqs: int,
        device: torch.device,
    ) -> torch.Tensor:
        """The detached 0-dim KL term: the caller's, TRL's estimate from the KL completions, or 0."""
        completions = {
            "kl_hidden": kl_hidden,
            "kl_labels": kl_labels,
            "kl_ref_logps": kl_ref_logps,
            "kl_ref_hidden": kl_ref_hidden,
            "kl_seq_index": kl_seq_index,
        }
        given = [name for name, t in completions.items() if t is not None]
        if not self.config.uses_kl and (given or kl is not None):
            raise ValueError(
                f"loss_type='apo_zero_unpaired' has no KL term; drop {given or ['kl']} "
                "(or use loss_type='kto')"
            )
        if kl is not None:
            if given:
                raise ValueError(f"pass either kl or the KL completions {given}, not both")
            return _check_kl(kl, device)
        if not given:
            return torch.zeros((), dtype=torch.float32, device=device)
        if kl_hidden is None or kl_labels is None:
            raise ValueError(f"the KL estimate needs kl_hidden and kl_labels (got only {given})")
        if num_seqs < 2:
            raise ValueError(
                "a KL estimate from mismatched completions needs a batch of at least 2 sequences (TRL "
                "requires a per-device batch size > 1: with one sequence the KL term equals the implied "
                "reward); pass kl explicitly or batch more sequences"
            )
        kl_seqs = num_seqs if kl_seq_index is not None else None
        kl_tokens = _sequence_tokens(
            kl_hidden, weight, bias, kl_labels, kl_seq_index, kl_seqs, **self._token_options()
        )
        if kl_tokens.num_seqs != num_seqs:
            raise ValueError(
                f"kl_hidden holds {kl_tokens.num_seqs} sequences; expected one KL completion per sequence "
                f"(S={num_seqs})"
            )
        kl_logps = scored_logps(kl_tokens.hidden2d, weight, bias, kl_tokens, self.head)
        kl_ref = self._reference(
            kl_tokens, kl_ref_logps, kl_ref_hidden, ref_weight, ref_bias, kl_hidden, "kl_", weight.shape[0]
        )
        return _mean_over_ranks((kl_logps - kl_ref).mean()).clamp(min=0)

    def sequence_logps(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        seq_index: torch.Tensor | None = None,
        num_seqs: int | None = None,
    ) -> torch.Tensor:
        """``[S]`` sequence log-probs scored as this loss scores them, without grad (e.g. a reference).

        Equals ``(logp * (labels != ignore_index)).sum(-1)`` per sequence (divided by its token count with
        ``average_log_prob``), where ``logp = log_softmax(hidden @ weight.T + bias)[labels]``; the layouts
        are ``forward``'s. Under autocast, the products run in its dtype.

        Returns:
            ``[S]`` fp32 tensor.
        """
        tokens = _sequence_tokens(hidden, weight, bias, labels, seq_index, num_seqs, **self._token_options())
        return scored_logps(tokens.hidden2d, weight, bias, tokens, self.head)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"loss_type={c.loss_type!r}, beta={c.beta}, desirable_weight={c.desirable_weight}, "
            f"undesirable_weight={c.undesirable_weight}, backend={self.head.backend}"
        )
