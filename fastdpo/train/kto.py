"""Unpaired (KTO) training in the packed trainer: ``loss_type`` ``kto`` or ``apo_zero_unpaired``.

The data are TRL's unpaired rows (``fastdpo.data_unpaired``). Each example is packed as one sequence,
prompt + completion; under ``kto`` it also brings its KL sequence, its own prompt with the completion of
the example before it in the same packed micro-batch (TRL 1.16 ``KTOTrainer``'s rotation by one within a
batch, cut to ``max_length``). That is a pair's layout, completion as "chosen" and KL completion as
"rejected", so ``pack_pairs`` packs it (with ``shared_prompt``, the prompt once) and a bin holds exactly
as many KL tokens as completion tokens: the planner's budget holds before the rotation is known.

Because a KL completion comes from the bin, the bins of a split are fixed (the same composition every
epoch, in a shuffled order): that is what lets the reference log-probs of the KL sequences be
precomputed and cached like the others. A bin of a single example has no mismatched partner; the plan
moves an example into it when one fits, and otherwise asks for a larger ``tokens_per_step``.
``apo_zero_unpaired`` has no KL term: its examples are packed alone and re-binned every epoch, as pairs.

``PackedKTOLoss`` splits a packed bin into the completions and the KL sequences for
``FusedLinearKTOLoss`` (whose KL estimate is all-reduced over ranks), and ``UnpairedForward`` reduces
its metrics to TRL's KTO names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from fastdpo.data_unpaired import balance_warning, kl_completions, load_unpaired_data, tokenize_unpaired
from fastdpo.distributed import gather_metrics
from fastdpo.errors import UserError
from fastdpo.losses import FusedLinearKTOLoss, KTOLossOutput
from fastdpo.packing import IGNORE_INDEX, PackedBatch, pack_pairs, pack_sequences, pair_num_tokens
from fastdpo.train.config import TrainConfig
from fastdpo.train.forward import PackedForward
from fastdpo.train.plan import Split, split_bins, tokenized_splits

__all__ = [
    "KTO_METRIC_NAMES",
    "PackedKTOLoss",
    "UnpairedForward",
    "UnpairedSplit",
    "build_kto_loss",
    "load_unpaired_splits",
]

logger = logging.getLogger("fastdpo")
_ID_COLUMNS = ("prompt_ids", "completion_ids")
# Sums over the examples of a step; UnpairedForward.global_means turns them into KTO_METRIC_NAMES.
_SUM_NAMES = (
    "loss",
    "kl",
    "rewards/chosen_sum",
    "rewards/rejected_sum",
    "logps/chosen_sum",
    "logps/rejected_sum",
    "count/chosen",
    "count/rejected",
)
# TRL 1.16 KTOTrainer's logged names; a group (chosen: desirable, rejected: undesirable) absent from a
# step is left out of that step's metrics, as TRL leaves it out of a batch's.
KTO_METRIC_NAMES = (
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class UnpairedSplit(Split):
    """Tokenized unpaired examples (``prompt_ids``, ``completion_ids``, ``label``) of one split.

    ``ref_chosen`` holds the completions' reference log-probs and ``ref_rejected`` the KL sequences'.
    """

    max_length: int = 0
    uses_kl: bool = True

    def examples(self, indices: np.ndarray) -> list[dict[str, Any]]:
        """The examples ``indices`` in order; under ``kto`` each with its KL completion (``kl_ids``)."""
        rows = self.data[indices.tolist()]
        examples = [
            {"prompt_ids": p, "completion_ids": c, "label": bool(y)}
            for p, c, y in zip(rows["prompt_ids"], rows["completion_ids"], rows["label"], strict=True)
        ]
        if self.uses_kl:
            shifted = kl_completions([e["completion_ids"] for e in examples])
            for example, completion in zip(examples, shifted, strict=True):
                # TRL cuts prompt + KL completion to max_length, keeping the start.
                example["kl_ids"] = completion[: self.max_length - len(example["prompt_ids"])]
        return examples

    def pack(self, indices: np.ndarray, *, shared_prompt: bool) -> PackedBatch:
        examples = self.examples(indices)
        if self.uses_kl:
            pairs = [
                {
                    "prompt_ids": e["prompt_ids"],
                    "chosen_ids": e["completion_ids"],
                    "rejected_ids": e["kl_ids"],
                }
                for e in examples
            ]
            batch = pack_pairs(pairs, shared_prompt=shared_prompt)
        else:
            batch = pack_sequences(examples)
        batch.preference_labels = torch.tensor([e["label"] for e in examples], dtype=torch.bool)
        return batch


def load_unpaired_splits(
    config: TrainConfig, tokenizer: Any, cache_dir: Path
) -> tuple[UnpairedSplit, UnpairedSplit | None]:
    """The train and eval splits of unpaired data (``load_splits``'s sources and options), with their
    fixed bins under ``kto``; logs the label counts and warns when they are out of balance."""
    train, held_out = tokenized_splits(
        config, tokenizer, cache_dir, load_unpaired_data, tokenize_unpaired, "examples", "examples"
    )
    if config.loss_type == "kto" and len(train) < 2:
        # The KL term scores each completion under another example's prompt; one example has no other.
        raise UserError(
            f"{config.data} [{config.split}]: {len(train)} usable example, but loss_type kto needs at least "
            "2 (its KL term pairs each completion with another example's prompt)"
        )
    labels = np.asarray(train["label"], dtype=bool)
    warning = balance_warning(
        int(labels.sum()), int((~labels).sum()), config.desirable_weight, config.undesirable_weight
    )
    if warning:
        logger.warning("%s [%s]: %s", config.data, config.split, warning)
    eval_split = None if held_out is None else _split("eval", held_out, config)
    return _split("train", train, config), eval_split


def _split(name: str, data: Any, config: TrainConfig) -> UnpairedSplit:
    uses_kl = config.loss_type == "kto"
    columns = data.with_format("arrow")
    prompt, completion = (pc.list_value_length(columns[k]).to_numpy() for k in _ID_COLUMNS)
    # Under kto an example costs its KL sequence too; a bin's KL completions are its own completions
    # rotated, so counting each example's completion twice counts the bin's tokens exactly (truncation
    # of a KL completion only lowers it).
    if uses_kl:
        tokens = pair_num_tokens(prompt, completion, completion, shared_prompt=config.shared_prompt)
    else:
        tokens = (prompt + completion).astype(np.int64)
    digest = hashlib.sha256(json.dumps({"uses_kl": uses_kl, "max_length": config.max_length}).encode())
    for k, lengths in zip(_ID_COLUMNS, (prompt, completion), strict=True):
        digest.update(np.ascontiguousarray(lengths).tobytes())
        digest.update(np.ascontiguousarray(pc.list_flatten(columns[k]).to_numpy()).tobytes())
    digest.update(np.asarray(columns["label"].to_numpy(zero_copy_only=False), dtype=np.uint8).tobytes())
    split = UnpairedSplit(
        name, data, tokens, digest.hexdigest(), max_length=config.max_length, uses_kl=uses_kl
    )
    if uses_kl:
        split.bins = _bins_with_partners(tokens, config.tokens_per_step, name)
    return split


def _bins_with_partners(tokens: np.ndarray, budget: int, name: str) -> list[np.ndarray]:
    """The fixed bins of a ``kto`` split, each of at least 2 examples.

    A bin the planner left with one example takes an example from a bin of 3 or more, if one fits.

    Raises:
        ValueError: A single-example bin that no example can join (naming the budget to raise).
    """
    if tokens.size == 1:
        raise ValueError(
            f"{name} split: loss_type 'kto' estimates its KL term from mismatched completions, but the "
            "split holds a single example; add examples (or use loss_type 'apo_zero_unpaired', which has no "
            "KL term)"
        )
    bins = [list(b) for b in split_bins(tokens, budget, None)]
    for lone in [b for b in bins if len(b) == 1]:
        size = int(tokens[lone[0]])
        room = budget - size
        donors = [(int(tokens[i]), k, i) for k, b in enumerate(bins) if len(b) >= 3 for i in b]
        fits = [d for d in donors if d[0] <= room]
        if not fits:
            raise ValueError(
                f"{name} split: loss_type 'kto' estimates its KL term from mismatched completions within "
                f"each packed micro-batch, but example {lone[0]} ({size} tokens with its KL sequence) fills "
                f"a micro-batch of tokens_per_step={budget} alone and so has no mismatched partner; raise "
                f"tokens_per_step to at least {size + int(tokens.min())} so that every micro-batch holds 2 "
                "examples (or use loss_type 'apo_zero_unpaired', which has no KL term)"
            )
        _, k, i = min(fits)
        bins[k].remove(i)
        lone.append(i)
    return [np.asarray(b, dtype=np.int64) for b in bins]


def build_kto_loss(config: TrainConfig, *, temperature: float, softcap: float | None) -> PackedKTOLoss:
    """The run's ``PackedKTOLoss``; ``reference="none"`` scores against a zero reference."""
    kto = FusedLinearKTOLoss(
        beta=config.beta,
        loss_type=config.loss_type,
        desirable_weight=config.desirable_weight,
        undesirable_weight=config.undesirable_weight,
        backend=config.backend,
        temperature=temperature,
        softcap=softcap,
    )
    return PackedKTOLoss(kto)


class PackedKTOLoss(nn.Module):
    """``FusedLinearKTOLoss`` on a packed unpaired bin, called like ``FusedLinearDPOLoss`` by
    ``PackedForward``: sequences ``0..B-1`` are the completions, ``B..2B-1`` (``kto`` only) the KL
    sequences. The DPO reference names map over: ``ref_chosen_logps`` to the completions',
    ``ref_rejected_logps`` to the KL sequences'; ``ref_hidden`` scores both. No reference scores against 0.
    """

    def __init__(self, kto: FusedLinearKTOLoss) -> None:
        super().__init__()
        self.kto = kto
        self.uses_kl = kto.config.uses_kl

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        seq_index: torch.Tensor,
        num_pairs: int,
        preference_labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        ref_hidden: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
    ) -> KTOLossOutput:
        """The KTO loss of one packed bin of ``num_pairs`` examples (``PackedBatch`` fields)."""
        b = num_pairs
        main = (seq_index >= 0) & (seq_index < b)
        kwargs: dict[str, Any] = {"seq_index": torch.where(main, seq_index, -1), "num_seqs": b}
        if ref_hidden is not None:
            kwargs.update(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
        else:
            zeros = torch.zeros(b, device=hidden.device)
            kwargs["ref_logps"] = zeros if ref_chosen_logps is None else ref_chosen_logps
        if self.uses_kl:
            kl = seq_index >= b
            kwargs.update(
                kl_hidden=hidden,
                kl_labels=labels.masked_fill(~kl, IGNORE_INDEX),
                kl_seq_index=torch.where(kl, seq_index - b, -1),
            )
            if ref_hidden is not None:
                kwargs["kl_ref_hidden"] = ref_hidden
            else:
                kwargs["kl_ref_logps"] = zeros if ref_rejected_logps is None else ref_rejected_logps
        main_labels = labels.masked_fill(~main, IGNORE_INDEX)
        return self.kto(hidden, weight, main_labels, bias, preference_labels=preference_labels, **kwargs)

    def sequence_logps(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        seq_index: torch.Tensor,
        num_pairs: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(completions [B], KL sequences [B])`` log-probs, scored as the loss scores them (zeros for
        the KL sequences without a KL term)."""
        num_seqs = 2 * num_pairs if self.uses_kl else num_pairs
        logps = self.kto.sequence_logps(hidden, weight, labels, bias, seq_index=seq_index, num_seqs=num_seqs)
        if self.uses_kl:
            return logps[:num_pairs], logps[num_pairs:]
        return logps, torch.zeros_like(logps)


class UnpairedForward(PackedForward):
    """``PackedForward`` for unpaired bins: the bin's labels reach the loss, references are scored as
    the KTO loss scores them, and metrics come out under TRL's KTO names (``KTO_METRIC_NAMES``)."""

    name = "kto"
    metric_names = _SUM_NAMES
    shown = ("loss", "kl", "rewards/margins")

    def loss(self, batch: PackedBatch, ref: dict[str, Any]) -> KTOLossOutput:
        return super().loss(batch, {**ref, "preference_labels": batch.preference_labels})

    def sequence_logps(self, model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self._score(self.loss_fn.sequence_logps, model, batch)

    @staticmethod
    def pair_sums(out: KTOLossOutput, num_pairs: int) -> torch.Tensor:
        """Sums over the batch's examples of each of ``_SUM_NAMES``."""
        m = out.metrics
        return torch.stack(
            [
                out.loss.detach().float() * num_pairs,
                out.kl.float() * num_pairs,
                *(m[name].float() for name in _SUM_NAMES[2:]),
            ]
        )

    def global_means(self, sums: torch.Tensor, pairs: int) -> dict[str, float]:
        """TRL's KTO metrics over the examples of all ranks: loss and kl averaged per example, rewards
        and log-probs per group (desirable: chosen, undesirable: rejected)."""
        local = (sums / pairs).tolist() if pairs else [0.0] * len(_SUM_NAMES)
        means = gather_metrics(dict(zip(_SUM_NAMES, local, strict=True)), pairs)
        metrics = {"loss": means["loss"], "kl": means["kl"]}
        for group in ("chosen", "rejected"):
            count = means[f"count/{group}"]
            if count > 0:
                metrics[f"rewards/{group}"] = means[f"rewards/{group}_sum"] / count
                metrics[f"logps/{group}"] = means[f"logps/{group}_sum"] / count
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return metrics
