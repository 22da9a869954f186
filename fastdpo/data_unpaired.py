"""Unpaired (KTO) feedback: TRL's ``prompt``/``completion``/``label`` rows, tokenization, balance check.

``load_unpaired_data`` reads the same sources as ``fastdpo.data.load_preference_data`` (JSON Lines, JSON,
Parquet, ``save_to_disk`` folders, datasets, lists of rows) and validates every row: ``prompt`` and
``completion`` both strings (standard format) or lists of ``{role, content}`` messages (conversational
format; a string prompt next to message completions becomes one user message, as for pairs), and
``label`` a bool or 0/1 (True: the completion is desirable). ``tokenize_unpaired`` renders, tokenizes,
truncates and caches them exactly as ``tokenize_preferences`` does a pair with one response.
``kl_completions`` builds the mismatched completions of TRL's KL estimate.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from fastdpo.data import is_blank, rows_dataset, text_or_messages
from fastdpo.data_sources import InvalidRow, collect_rows, describe
from fastdpo.data_tokenize import DataReport, tokenize_rows

__all__ = ["UnpairedReport", "balance_warning", "kl_completions", "load_unpaired_data", "tokenize_unpaired"]

_EXPECTED = "a JSON object with 'prompt', 'completion' and 'label' (TRL's unpaired preference format)"
# The KTO paper's (eq. 8) range for desirable_weight * n_desirable / (undesirable_weight * n_undesirable).
_BALANCE_RANGE = (1.0, 4 / 3)


@dataclass
class UnpairedReport(DataReport):
    """A ``DataReport`` that also counts the kept rows' labels.

    Attributes:
        desirable: Kept rows labeled desirable (True).
        undesirable: Kept rows labeled undesirable (False).
    """

    desirable: int = 0
    undesirable: int = 0

    def __str__(self) -> str:
        return f"{super().__str__()}; {self.desirable} desirable, {self.undesirable} undesirable"


def _label(value: Any) -> bool:
    # bool is an int subclass; 0/1 ints (Parquet, pandas) are accepted, anything else is ambiguous.
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidRow("invalid_label", f"'label': expected a bool or 0/1, got {describe(value)}")


def _normalize_row(row: Any) -> dict[str, Any]:
    """Validates one raw row and returns it as prompt/completion/label, or raises ``InvalidRow``."""
    if not isinstance(row, dict):
        raise InvalidRow("not_an_object", f"expected {_EXPECTED}, got {describe(row)}")
    for name in ("prompt", "completion", "label"):
        if row.get(name) is None:
            raise InvalidRow(
                "missing_column", f"missing '{name}'; expected {_EXPECTED}, got keys {sorted(row)}"
            )
    label = _label(row["label"])
    completion = text_or_messages(row["completion"], "completion")
    prompt = row["prompt"]
    if isinstance(prompt, str) and isinstance(completion, list):
        prompt = [{"role": "user", "content": prompt}]
    prompt = text_or_messages(prompt, "prompt")
    if type(prompt) is not type(completion):
        raise InvalidRow(
            "mixed_format", "'prompt' and 'completion' must both be strings or both message lists"
        )
    if is_blank(prompt):
        raise InvalidRow("empty_prompt", "'prompt' is empty")
    if is_blank(completion):
        raise InvalidRow("empty_response", "'completion' is empty")
    return {"prompt": prompt, "completion": completion, "label": label}


def load_unpaired_data(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict | list[dict],
    *,
    split: str = "train",
    skip_invalid: bool = False,
) -> tuple[datasets.Dataset, UnpairedReport]:
    """Loads TRL's unpaired preference rows (``prompt``/``completion``/``label``) and validates them.

    Args:
        source: A ``.jsonl``, ``.json`` or ``.parquet`` file, a ``save_to_disk`` directory, a
            ``datasets.Dataset``/``DatasetDict`` or a list of row dicts.
        split: Split to read from a ``DatasetDict`` or a saved dataset dict.
        skip_invalid: Drop invalid rows and count them in the report instead of raising.

    Returns:
        The dataset (``prompt``, ``completion``: strings or message lists; ``label``: bool) and a report
        with the desirable / undesirable counts.

    Raises:
        UserError: (a ``ValueError``) A row is invalid, e.g. a ``label`` that is not a bool or 0/1 (the
            message names the file and line or row), and ``skip_invalid`` is false.
        FileNotFoundError: Nothing exists at ``source``.
    """
    report = UnpairedReport()
    rows = collect_rows(source, split, skip_invalid, _normalize_row, report)
    report.desirable = sum(row["label"] for row in rows)
    report.undesirable = len(rows) - report.desirable
    return rows_dataset(rows, ("completion",), label=datasets.Value("bool")), report


def _label_counts(tokenized: datasets.Dataset) -> dict[str, int]:
    desirable = sum(tokenized["label"])
    return {"desirable": desirable, "undesirable": len(tokenized) - desirable}


def tokenize_unpaired(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[datasets.Dataset, UnpairedReport]:
    """Tokenizes unpaired rows into prompt/completion ids and labels, truncates and caches them.

    The rules are ``fastdpo.data.tokenize_preferences``'s for a pair with one response: chat-template
    rendering (the completion is prompt+completion minus the prompt), EOS appended to standard-format
    completions, the prompt cut to ``max_prompt_length`` (``truncation_mode`` keeps its end or start), the
    completion to ``max_length - len(prompt)``; rows whose prompt fills ``max_length`` are dropped.

    Args:
        dataset: Output of ``load_unpaired_data``.
        tokenizer: A Hugging Face tokenizer; conversations need its chat template, text its EOS token.
        max_length: Token limit of prompt + completion.
        max_prompt_length: Token limit of the prompt, or None for no separate limit.
        truncation_mode: ``"keep_end"`` or ``"keep_start"``.
        cache_dir: Directory of the tokenization cache, or None to tokenize without caching.

    Returns:
        A dataset with int32 list columns ``prompt_ids``, ``completion_ids`` and bool ``label``, and a
        report with the kept rows' desirable / undesirable counts.

    Raises:
        ValueError: Bad options, columns or tokenizer, or a chat template that does not render the prompt
            as a prefix of prompt+completion.
    """
    return tokenize_rows(
        dataset,
        tokenizer,
        responses=("completion",),
        loader="load_unpaired_data",
        columns="columns prompt/completion (both strings or both {role, content} message lists) and label",
        desc="Tokenizing unpaired feedback",
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        cache_dir=cache_dir,
        extra=datasets.Features({"label": datasets.Value("bool")}),
        kind="unpaired",
        report_cls=UnpairedReport,
        counts=_label_counts,
    )


def balance_warning(
    desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str:
    """A warning with suggested weights when the weighted classes are out of the KTO paper's balance, else "".

    The paper (eq. 8) keeps ``desirable_weight * desirable / (undesirable_weight * undesirable)`` within
    1:1 to 4:3; TRL's ``KTOTrainer`` gives the same advice.
    """
    if not desirable or not undesirable:
        if not desirable and not undesirable:
            return ""
        missing = "desirable" if not desirable else "undesirable"
        direction = "down" if not desirable else "up"
        return (
            f"the data has no {missing} examples ({desirable} desirable, {undesirable} undesirable): "
            f"KTO then only pushes {direction} the rewards it sees; add {missing} examples if you have them"
        )
    low, high = _BALANCE_RANGE
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if low <= ratio <= high:
        return ""
    d_low, d_high = (undesirable_weight * undesirable / desirable * b for b in _BALANCE_RANGE)
    u_low, u_high = (desirable_weight * desirable / undesirable / b for b in reversed(_BALANCE_RANGE))
    return (
        f"{desirable} desirable and {undesirable} undesirable examples with desirable_weight "
        f"{desirable_weight} and undesirable_weight {undesirable_weight} give a weighted ratio of "
        f"{ratio:.2f}, outside the KTO paper's 1 to 4/3; set EITHER desirable_weight in "
        f"[{d_low:.2f}, {d_high:.2f}] OR undesirable_weight in [{u_low:.2f}, {u_high:.2f}] (not both)"
    )


def kl_completions(completions: Sequence[Sequence[int]]) -> list[Sequence[int]]:
    """The mismatched completions of TRL's KL estimate within one batch: prompt ``i`` gets completion ``i-1``.

    Equals TRL 1.16 ``KTOTrainer``'s ``[completion_ids[-1]] + completion_ids[:-1]`` (the batch's
    completions rotated by one). A batch of one has no mismatched partner.

    Raises:
        ValueError: Fewer than 2 completions.
    """
    if len(completions) < 2:
        raise ValueError(
            f"the KL estimate pairs each prompt with another example's completion, but the batch holds "
            f"{len(completions)} example(s); batch at least 2"
        )
    return [completions[-1], *completions[:-1]]
