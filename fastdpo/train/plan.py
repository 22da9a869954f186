"""The pairs of a run and which of them form each optimizer step: tokenized splits, bins and epoch plans.

Every rank derives the same plan from ``(seed, epoch)`` alone, so a checkpoint's data position
``(epoch, step_in_epoch)`` names the same pairs after a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch

from fastdpo.data import load_preference_data, tokenize_preferences
from fastdpo.errors import UserError
from fastdpo.packing import PackedBatch, pack_pairs, pair_num_tokens, plan_bins
from fastdpo.train.config import TrainConfig

__all__ = ["Split", "epoch_plan", "load_splits", "split_bins", "tokenized_splits"]

logger = logging.getLogger("fastdpo")
_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class Split:
    """Tokenized pairs of one split and what the loop derives from them."""

    name: str
    data: Any  # datasets.Dataset with prompt_ids / chosen_ids / rejected_ids
    tokens: np.ndarray  # [n] packed token count of each pair
    digest: str  # hash of the token ids: the data's identity for the reference cache and resume
    ref_chosen: torch.Tensor | None = None  # [n] precomputed reference log-probs
    ref_rejected: torch.Tensor | None = None
    # Bins whose composition must not change (unpaired KTO data: a bin pairs its KL completions), or
    # None: the pairs are re-binned every epoch.
    bins: list[np.ndarray] | None = None

    def pairs(self, indices: np.ndarray) -> list[dict[str, list[int]]]:
        rows = self.data[indices.tolist()]
        return [
            dict(zip(_ID_COLUMNS, values, strict=True))
            for values in zip(*(rows[k] for k in _ID_COLUMNS), strict=True)
        ]

    def pack(self, indices: np.ndarray, *, shared_prompt: bool) -> PackedBatch:
        """The ``PackedBatch`` of the pairs ``indices`` (CPU tensors)."""
        return pack_pairs(self.pairs(indices), shared_prompt=shared_prompt)

    def fixed_bins(self, budget: int) -> list[np.ndarray]:
        """The split's bins in a fixed order (reference pass, evaluation): ``bins``, or a fresh plan."""
        return self.bins if self.bins is not None else split_bins(self.tokens, budget, None)


def load_splits(config: TrainConfig, tokenizer: Any, cache_dir: Path) -> tuple[Split, Split | None]:
    """The train split and the eval split (None without eval pairs), tokenized through ``cache_dir``."""
    train, held_out = tokenized_splits(
        config, tokenizer, cache_dir, load_preference_data, tokenize_preferences, "pairs", "preference pairs"
    )
    shared = config.shared_prompt
    return _split("train", train, shared), None if held_out is None else _split("eval", held_out, shared)


def tokenized_splits(
    config: TrainConfig,
    tokenizer: Any,
    cache_dir: Path,
    load: Callable[..., tuple[Any, Any]],
    tokenize: Callable[..., tuple[Any, Any]],
    noun: str,
    usable: str,
) -> tuple[Any, Any | None]:
    """The tokenized train rows and the eval rows (None without eval data) of ``config``'s sources.

    ``load`` / ``tokenize`` are ``fastdpo.data``'s (pairs) or ``fastdpo.data_unpaired``'s functions;
    ``eval_fraction`` holds out a seeded random share of the train rows. ``noun`` / ``usable`` name the
    rows in errors.
    """

    def tokenized(source: str, split: str) -> Any:
        raw, report = load(source, split=split, skip_invalid=config.skip_invalid)
        logger.info("%s [%s]: %s", source, split, report)
        if not report.rows_read:
            raise UserError(f"{source} [{split}]: no rows (the data is empty); expected {noun}")
        if not report.rows_kept:
            raise UserError(f"{source} [{split}]: all {report.rows_read} rows are invalid ({report})")
        _warn_duplicates(raw, source, split)
        data, report = tokenize(
            raw,
            tokenizer,
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            truncation_mode=config.truncation_mode,
            cache_dir=cache_dir,
        )
        logger.info("%s [%s] tokenized: %s", source, split, report)
        if len(data) == 0:
            raise UserError(f"{source} [{split}]: no usable {usable} after tokenization ({report})")
        if report.rows_truncated * 2 > report.rows_kept:
            logger.warning(
                "%s [%s]: %d of %d rows were truncated to max_length %d: most of the data is cut; a larger "
                "max_length (or max_prompt_length) keeps it",
                source,
                split,
                report.rows_truncated,
                report.rows_kept,
                config.max_length,
            )
        return data

    train, held_out = tokenized(config.data, config.split), None
    if config.eval_data or config.eval_split:
        held_out = tokenized(config.eval_data or config.data, config.eval_split or config.split)
    elif config.eval_fraction:
        order = np.random.default_rng(config.seed).permutation(len(train))
        num_eval = max(1, round(config.eval_fraction * len(train)))
        if num_eval >= len(train):
            raise UserError(
                f"eval_fraction: {config.eval_fraction} of {len(train)} {noun} leaves none to train on"
            )
        train, held_out = train.select(np.sort(order[num_eval:])), train.select(np.sort(order[:num_eval]))
    return train, held_out


def _warn_duplicates(raw: Any, source: str, split: str) -> None:
    """Warns about rows that occur more than once: they weigh more in the loss than the data suggests."""
    seen: set[str] = set()
    repeated = 0
    for row in raw.to_list() if hasattr(raw, "to_list") else raw:
        key = json.dumps(row, sort_keys=True, default=str)
        repeated += key in seen
        seen.add(key)
    if repeated:
        logger.warning(
            "%s [%s]: %d duplicate rows (identical to an earlier row); each copy counts in the loss",
            source,
            split,
            repeated,
        )


def _split(name: str, data: Any, shared_prompt: bool) -> Split:
    columns = data.with_format("arrow")
    lens = [pc.list_value_length(columns[k]).to_numpy() for k in _ID_COLUMNS]
    digest = hashlib.sha256()
    for k, n in zip(_ID_COLUMNS, lens, strict=True):
        digest.update(np.ascontiguousarray(n).tobytes())
        digest.update(np.ascontiguousarray(pc.list_flatten(columns[k]).to_numpy()).tobytes())
    return Split(name, data, pair_num_tokens(*lens, shared_prompt=shared_prompt), digest.hexdigest())


def split_bins(tokens: np.ndarray, budget: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Pair indices of each bin of at most ``budget`` tokens; ``rng`` shuffles ties and the bin order
    (None: a fixed plan)."""
    perm = rng.permutation(tokens.size) if rng is not None else np.arange(tokens.size)
    offsets, order = plan_bins(tokens[perm], budget)
    bins = [perm[order[a:b]] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    if rng is not None:
        bins = [bins[i] for i in rng.permutation(len(bins))]
    return bins


def epoch_plan(
    tokens: np.ndarray,
    config: TrainConfig,
    epoch: int,
    world_size: int,
    bins: list[np.ndarray] | None = None,
) -> list[list[np.ndarray]]:
    """The epoch's optimizer steps, each a list of bins (of all ranks), deterministic in (seed, epoch).

    Consecutive bins form a step of at most ``tokens_per_optimizer_step`` tokens, and of at least
    ``world_size`` bins so that no rank idles. With ``bins`` (a split's fixed bins) only their order is
    shuffled.
    """
    budget = config.tokens_per_optimizer_step or config.tokens_per_step
    rng = np.random.default_rng([config.seed, epoch])
    steps: list[list[np.ndarray]] = []
    current: list[np.ndarray] = []
    used = 0
    if bins is None:
        bins = split_bins(tokens, config.tokens_per_step, rng)
    else:
        bins = [bins[i] for i in rng.permutation(len(bins))]
    for b in bins:
        size = int(tokens[b].sum())
        if current and used + size > budget and len(current) >= world_size:
            steps.append(current)
            current, used = [], 0
        current.append(b)
        used += size
    steps.append(current)
    return steps
