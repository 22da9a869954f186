"""The DPO family's tensor side: pair token preparation, the pair sequence loss (with WPO), statistics.

Dimension letters: B pairs, M valid tokens. Sequence ``j`` is the chosen response of pair ``j`` and
``B + j`` its rejected one (``fastdpo.packing``'s numbering).
"""

from __future__ import annotations

import torch

from fastdpo.losses.dpo_spec import LossSpec
from fastdpo.losses.fused import LossParts, SequenceLoss
from fastdpo.losses.tokens import (
    Tokens,
    check_lengths,
    check_linear,
    flatten_layout,
    prepare_tokens,
    reduce_tokens,
)
from fastdpo.ops.linear_logprobs import TokenStats
from fastdpo.ops.preference_loss import preference_loss


def pair_tokens(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    seq_index: torch.Tensor | None,
    num_pairs: int | None,
    *,
    ignore_index: int,
    ld_alpha: float | None,
    average: bool,
    length_reasons: list[str],
) -> Tokens:
    """Validates a pair batch in either layout and returns its valid tokens with their LD / mean weights."""
    hidden2d, labels1d, seq1d, padded_rows = flatten_layout(
        hidden, labels, seq_index, rows_hint="[2B, T]", count_name="num_pairs"
    )
    if padded_rows is not None:
        if padded_rows == 0 or padded_rows % 2:
            raise ValueError(
                "padded layout needs an even, non-zero number of rows (B chosen then B rejected), got "
                f"{padded_rows}"
            )
        if num_pairs is not None and num_pairs != padded_rows // 2:
            raise ValueError(
                f"num_pairs={num_pairs} disagrees with the {padded_rows} padded rows (expected "
                f"{padded_rows // 2})"
            )
        num_pairs = padded_rows // 2
    elif not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs <= 0:
        raise ValueError(f"packed layout needs num_pairs, a positive int, got {num_pairs!r}")
    check_linear(hidden2d, weight, bias, "")
    tokens = prepare_tokens(
        hidden2d,
        labels1d,
        seq1d,
        padded_len=labels.shape[-1],
        num_seqs=2 * num_pairs,
        vocab=weight.shape[0],
        ignore_index=ignore_index,
        seqs_name="2B",
        count_name="num_pairs",
    )
    check_lengths(tokens, length_reasons)
    seqs, lengths = tokens.seq_index, tokens.lengths
    if ld_alpha is not None:
        # LD-DPO: the first min(len_chosen, len_rejected) response tokens count fully, the rest by ld_alpha.
        order = torch.sort(seqs, stable=True).indices
        starts = torch.cumsum(lengths, 0).long() - lengths.long()
        rank = torch.empty_like(seqs)
        rank[order] = torch.arange(seqs.shape[0], device=seqs.device) - starts[seqs[order]]
        shared = torch.minimum(lengths[:num_pairs], lengths[num_pairs:]).repeat(2)
        tokens.token_weights = torch.where(rank < shared[seqs], 1.0, ld_alpha).float()
    if average:
        tokens.token_weights = tokens.token_weights / lengths[seqs]
    return tokens


def pair_loss(spec: LossSpec, tokens: Tokens, ref_logps: torch.Tensor | None) -> SequenceLoss:
    """The DPO-family sequence loss of ``tokens``: pair losses, rewards and the NLL term."""
    num_pairs = tokens.num_seqs // 2
    no_chosen = "the NLL term (sft / orpo / rpo_alpha) needs chosen tokens, but every chosen label is masked"
    if tokens.counts is None:  # torch.compile: a device count, asserted on the device
        chosen_tokens = tokens.lengths[:num_pairs].sum()
        if spec.nll_weight:
            torch._assert_async(chosen_tokens > 0, no_chosen)
    else:
        chosen_tokens = sum(tokens.counts[:num_pairs])
        if spec.nll_weight and chosen_tokens == 0:
            raise ValueError(no_chosen)
    backend = spec.head.backend

    def sequence_loss(logp: torch.Tensor, stats: TokenStats | None) -> LossParts:
        seq_logps = reduce_tokens(logp, tokens)
        pair = preference_loss(seq_logps, ref_logps, tokens.lengths, spec.pair, backend=backend)
        losses, coefs, nll_weight = pair.losses, pair.coefs, spec.nll_weight
        if spec.use_weighting:
            # WPO (TRL 1.16): each pair's loss times w_chosen * w_rejected, w = exp(token mean of
            # logp - log sum p^2) over the response, without gradient; TRL's sft term gets the mean weight.
            aligned = reduce_tokens(logp - stats.log_sum_p2, tokens, weighted=False)
            weights = torch.exp(aligned / tokens.lengths.clamp(min=1.0))
            pair_weights = weights[:num_pairs] * weights[num_pairs:]
            losses, coefs = losses * pair_weights, coefs * pair_weights.repeat(2)
            nll_weight = nll_weight - spec.sft_weight + spec.sft_weight * pair_weights.mean()
        loss = losses.mean()
        token_grad = coefs.index_select(0, tokens.seq_index) * tokens.token_weights
        nll = torch.zeros((), dtype=torch.float32, device=logp.device)
        if spec.nll_weight:
            # Every token of a chosen response carries -nll_weight / (chosen tokens) in the NLL term.
            raw = reduce_tokens(logp, tokens, weighted=False)
            nll = -raw[:num_pairs].sum() / chosen_tokens
            loss = loss + nll_weight * nll
            chosen = tokens.seq_index < num_pairs
            token_grad = token_grad - torch.where(chosen, nll_weight / chosen_tokens, 0.0)
        log_odds = pair.log_odds if pair.log_odds is not None else torch.zeros(0, device=logp.device)
        return LossParts(loss, token_grad, (seq_logps, pair.rewards, losses, nll, log_odds))

    return sequence_loss


def stat_metrics(
    stats: TokenStats, tokens: Tokens
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """TRL's token-statistics metrics of one batch, and per pair; a mean without tokens is 0.

    Batch (0-dim): ``entropy`` over every scored token, ``logits/chosen`` / ``logits/rejected`` the mean
    logit over the chosen / rejected tokens, ``mean_token_accuracy`` over the chosen tokens (as TRL). Per
    pair (``[B]``, which sum over any batching): ``entropy`` over the pair's tokens, ``mean_token_accuracy``
    over its chosen tokens.
    """
    b = tokens.num_seqs // 2
    count = tokens.lengths
    entropy = reduce_tokens(stats.entropy, tokens, weighted=False)
    logit = reduce_tokens(stats.mean_logit, tokens, weighted=False)
    top1 = reduce_tokens(stats.is_argmax.float(), tokens, weighted=False)

    def ratio(total: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return total / n.clamp(min=1.0)

    metrics = {
        "entropy": ratio(entropy.sum(), count.sum()),
        "logits/chosen": ratio(logit[:b].sum(), count[:b].sum()),
        "logits/rejected": ratio(logit[b:].sum(), count[b:].sum()),
        "mean_token_accuracy": ratio(top1[:b].sum(), count[:b].sum()),
    }
    per_pair = {
        "entropy": ratio(entropy[:b] + entropy[b:], count[:b] + count[b:]),
        "mean_token_accuracy": ratio(top1[:b], count[:b]),
    }
    return metrics, per_pair
