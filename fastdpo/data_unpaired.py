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

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from fastdpo.data import (
    _CACHE_VERSION,
    _MESSAGE_FEATURE,
    DataReport,
    _common_prefix,
    _cut,
    _render,
    _text_or_messages,
    _tokenizer_fingerprint,
    _with_eos,
    _write_cache,
)
from fastdpo.data_sources import InvalidRow, describe, source_rows
from fastdpo.errors import UserError

__all__ = ["UnpairedReport", "balance_warning", "kl_completions", "load_unpaired_data", "tokenize_unpaired"]

_EXPECTED = "a JSON object with 'prompt', 'completion' and 'label' (TRL's unpaired preference format)"
_TOKEN_FEATURES = datasets.Features(
    {
        "prompt_ids": datasets.List(datasets.Value("int32")),
        "completion_ids": datasets.List(datasets.Value("int32")),
        "label": datasets.Value("bool"),
        "status": datasets.Value("string"),
    }
)
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
    completion = _text_or_messages(row["completion"], "completion")
    prompt = row["prompt"]
    if isinstance(prompt, str) and isinstance(completion, list):
        prompt = [{"role": "user", "content": prompt}]
    prompt = _text_or_messages(prompt, "prompt")
    if type(prompt) is not type(completion):
        raise InvalidRow(
            "mixed_format", "'prompt' and 'completion' must both be strings or both message lists"
        )
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise InvalidRow("empty_prompt", "'prompt' is empty")
    if not completion or (isinstance(completion, str) and not completion.strip()):
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
    rows: list[dict[str, Any]] = []
    for location, raw in source_rows(source, split):
        report.rows_read += 1
        try:
            if isinstance(raw, InvalidRow):
                raise raw
            row = _normalize_row(raw)
            if rows and type(row["prompt"]) is not type(rows[0]["prompt"]):
                raise InvalidRow(
                    "mixed_format", "rows mix standard (string) and conversational (message) formats"
                )
        except InvalidRow as e:
            if not skip_invalid:
                raise UserError(f"{location}: {e}") from None
            report.rows_dropped[e.reason] = report.rows_dropped.get(e.reason, 0) + 1
            continue
        rows.append(row)
    report.rows_kept = len(rows)
    report.desirable = sum(row["label"] for row in rows)
    report.undesirable = len(rows) - report.desirable
    column = _MESSAGE_FEATURE if rows and isinstance(rows[0]["prompt"], list) else datasets.Value("string")
    features = datasets.Features({"prompt": column, "completion": column, "label": datasets.Value("bool")})
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features), report


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: PreTrainedTokenizerBase,
    conversational: bool,
    max_length: int,
    max_prompt_length: int | None,
    truncation_mode: str,
) -> dict[str, list]:
    if conversational:
        rendered = [
            _render(tokenizer, i, prompt, [completion], names=("completion",))
            for i, prompt, completion in zip(indices, batch["prompt"], batch["completion"], strict=True)
        ]
        texts = [list(column) for column in zip(*rendered, strict=True)]
    else:
        texts = [batch["prompt"], [p + c for p, c in zip(batch["prompt"], batch["completion"], strict=True)]]
    # Chat templates carry their own BOS; plain text gets the tokenizer's special tokens as at inference.
    ids = [tokenizer(t, add_special_tokens=not conversational)["input_ids"] for t in texts]
    out: dict[str, list] = {name: [] for name in _TOKEN_FEATURES}
    for prompt, prompt_completion, label in zip(*ids, batch["label"], strict=True):
        # Tokens can merge across the prompt/completion boundary; the prompt is what both share.
        n = _common_prefix(prompt, prompt_completion)
        prompt, completion = prompt[:n], prompt_completion[n:]
        if not conversational:
            completion = _with_eos(completion, tokenizer.eos_token_id)
        status = ""
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt, status = _cut(prompt, max_prompt_length, truncation_mode), "truncated"
        budget = max_length - len(prompt)
        if len(completion) > budget:
            completion, status = completion[: max(budget, 0)], "truncated"
        if budget <= 0:
            status = "prompt_fills_max_length"
        elif not completion:
            status = "empty_response"
        for name, value in zip(_TOKEN_FEATURES, (prompt, completion, label, status), strict=True):
            out[name].append(value)
    return out


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
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"dataset: expected a datasets.Dataset from load_unpaired_data, got {type(dataset).__name__}"
        )
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
    features = dataset.features
    if set(features) != {"prompt", "completion", "label"} or not (
        features["prompt"] == features["completion"]
        and features["prompt"] in (datasets.Value("string"), _MESSAGE_FEATURE)
    ):
        raise ValueError(
            "dataset: expected columns prompt/completion (both strings or both {role, content} message "
            f"lists) and label (use load_unpaired_data), got {features}"
        )
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(f"truncation_mode: expected 'keep_end' or 'keep_start', got {truncation_mode!r}")
    if max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length: expected None or an int >= 1, got {max_prompt_length!r}")
    conversational = features["prompt"] == _MESSAGE_FEATURE
    if conversational and not tokenizer.chat_template:
        raise UserError("tokenizer: conversational data needs a chat_template, but the tokenizer has none")
    if not conversational and tokenizer.eos_token_id is None:
        raise UserError("tokenizer: standard-format completions get EOS appended, but the tokenizer has none")

    options = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_mode": truncation_mode,
    }
    key = hashlib.sha256(
        json.dumps(
            {
                "version": _CACHE_VERSION,
                "kind": "unpaired",
                "data": dataset._fingerprint,
                "tokenizer": _tokenizer_fingerprint(tokenizer),
                **options,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    entry = Path(cache_dir, f"tokenized-unpaired-{key}") if cache_dir is not None else None
    if entry is not None and (entry / "report.json").exists():
        report = UnpairedReport(**json.loads((entry / "report.json").read_text()))
        report.from_cache = True
        return datasets.load_from_disk(os.fspath(entry / "data")), report

    tokenized = datasets.Dataset.from_dict({name: [] for name in _TOKEN_FEATURES}, features=_TOKEN_FEATURES)
    if len(dataset):
        tokenized = dataset.map(
            _tokenize_batch,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            features=_TOKEN_FEATURES,
            fn_kwargs={"tokenizer": tokenizer, "conversational": conversational, **options},
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=key,
            desc="Tokenizing unpaired feedback",
        )
    statuses = Counter(tokenized["status"])
    truncated = statuses.pop("truncated", 0)
    kept = truncated + statuses.pop("", 0)
    if statuses:
        tokenized = tokenized.filter(
            lambda status: status in ("", "truncated"), input_columns="status", keep_in_memory=True
        )
    tokenized = tokenized.remove_columns("status")
    desirable = sum(tokenized["label"])
    report = UnpairedReport(len(dataset), kept, dict(statuses), truncated, False, desirable, kept - desirable)
    if entry is not None:
        _write_cache(entry, tokenized, report)
    return tokenized, report


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
