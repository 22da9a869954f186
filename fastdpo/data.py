"""Preference data: loading TRL and ShareGPT formats, chat templates, cached tokenization, truncation.

``load_preference_data`` reads a file, a saved ``datasets`` directory or in-memory rows, validates every row
and normalizes it to ``prompt``/``chosen``/``rejected``, each a string (standard format) or a list of
``{role, content}`` messages (conversational format). ``tokenize_preferences`` turns that into token ids,
truncates them and caches the result on disk. Reading the files themselves is ``fastdpo.data_sources``'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import jinja2
from transformers import PreTrainedTokenizerBase

from fastdpo.data_cache import read_cache, write_cache
from fastdpo.data_sources import InvalidRow, collect_rows, describe
from fastdpo.errors import UserError

__all__ = ["DataReport", "load_preference_data", "tokenize_preferences"]

# Bump when the tokenized layout or the truncation rules change, so old cache entries are never reused.
_CACHE_VERSION = 2  # 2: an entry records the sha256 of its files, checked on load
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_EXPECTED = (
    "a JSON object with 'prompt', 'chosen', 'rejected' (or only 'chosen'/'rejected' with an implicit prompt, "
    "or ShareGPT 'conversations' with 'chosen'/'rejected')"
)
MESSAGE_FEATURE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})


@dataclass
class DataReport:
    """What happened to the rows of one loading or tokenization pass.

    Attributes:
        rows_read: Rows seen in the input.
        rows_kept: Rows in the output.
        rows_dropped: Dropped rows per reason (``rows_read == rows_kept + num_dropped``).
        rows_truncated: Kept rows whose prompt or responses were cut.
        from_cache: Whether the result was read from the tokenization cache.
    """

    rows_read: int = 0
    rows_kept: int = 0
    rows_dropped: dict[str, int] = field(default_factory=dict)
    rows_truncated: int = 0
    from_cache: bool = False

    @property
    def num_dropped(self) -> int:
        """Total number of dropped rows."""
        return sum(self.rows_dropped.values())

    def __str__(self) -> str:
        dropped = f"{self.num_dropped} dropped"
        if self.rows_dropped:
            dropped += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.rows_dropped.items())) + ")"
        cached = " [from cache]" if self.from_cache else ""
        return (
            f"{self.rows_read} rows read, {self.rows_kept} kept, {dropped}, "
            f"{self.rows_truncated} truncated{cached}"
        )


def _messages(value: Any, name: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    messages = []
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and isinstance(message.get(role_key), str)
            and isinstance(message.get(content_key), str)
        ):
            raise InvalidRow(
                "invalid_type",
                f"'{name}' message {i}: expected an object with string '{role_key}' and '{content_key}', "
                f"got {describe(message)}",
            )
        messages.append({"role": message[role_key], "content": message[content_key]})
    return messages


def text_or_messages(value: Any, name: str) -> str | list[dict]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, name)
    raise InvalidRow(
        "invalid_type",
        f"'{name}': expected a string or a list of {{role, content}} messages, got {describe(value)}",
    )


def is_blank(value: str | list[dict]) -> bool:
    """Whether a prompt or response is empty: no messages, or only white space."""
    return not value or (isinstance(value, str) and not value.strip())


def _sharegpt_turn(value: Any, name: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return _sharegpt_messages([value], name)
    raise InvalidRow(
        "invalid_type", f"'{name}': expected a {{from, value}} object or a string, got {describe(value)}"
    )


def _sharegpt_messages(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise InvalidRow(
            "invalid_type", f"'{name}': expected a list of {{from, value}} turns, got {describe(value)}"
        )
    messages = _messages(value, name, role_key="from", content_key="value")
    for i, message in enumerate(messages):
        if message["role"] not in _SHAREGPT_ROLES:
            raise InvalidRow(
                "invalid_type",
                f"'{name}' turn {i}: expected 'from' in {sorted(_SHAREGPT_ROLES)}, got {message['role']!r}",
            )
        message["role"] = _SHAREGPT_ROLES[message["role"]]
    return messages


def _split_implicit(chosen: str | list[dict], rejected: str | list[dict]) -> tuple[Any, Any, Any]:
    """Splits the prompt off two responses that both start with it; returns (prompt, chosen, rejected)."""
    end = 0
    while end < min(len(chosen), len(rejected)) and chosen[end] == rejected[end]:
        end += 1
    if isinstance(chosen, str):
        # Cut back to a whitespace boundary so a word shared by both responses is not split into the prompt,
        # leaving the whitespace on the response side as tokenizers attach it to the following word.
        while end > 0 and not (
            end < len(chosen) and end < len(rejected) and chosen[end].isspace() and rejected[end].isspace()
        ):
            end -= 1
    if end == 0:
        raise InvalidRow(
            "no_common_prompt", "implicit prompt: 'chosen' and 'rejected' share no leading prompt"
        )
    return chosen[:end], chosen[end:], rejected[end:]


def _normalize_row(row: Any) -> dict[str, Any]:
    """Validates one raw row and returns it as prompt/chosen/rejected, or raises ``InvalidRow``."""
    if not isinstance(row, dict):
        raise InvalidRow("not_an_object", f"expected {_EXPECTED}, got {describe(row)}")
    sharegpt = row.get("conversations") is not None
    for name in ("chosen", "rejected"):
        if row.get(name) is None:
            raise InvalidRow(
                "missing_column", f"missing '{name}'; expected {_EXPECTED}, got keys {sorted(row)}"
            )
    convert = _sharegpt_turn if sharegpt else text_or_messages
    chosen, rejected = convert(row["chosen"], "chosen"), convert(row["rejected"], "rejected")
    if type(chosen) is not type(rejected):
        raise InvalidRow("mixed_format", "'chosen' and 'rejected' must both be strings or both message lists")
    if chosen == rejected:
        raise InvalidRow("identical_responses", "'chosen' and 'rejected' are identical")
    prompt = row.get("prompt")
    if sharegpt:
        prompt = _sharegpt_messages(row["conversations"], "conversations")
    # As in TRL, a string prompt next to full conversations duplicates the conversations' first turn.
    elif prompt is None or (
        isinstance(prompt, str) and isinstance(chosen, list) and chosen[:1] == rejected[:1]
    ):
        prompt, chosen, rejected = _split_implicit(chosen, rejected)
    elif isinstance(prompt, str) and isinstance(chosen, list):
        prompt = [{"role": "user", "content": prompt}]
    else:
        prompt = text_or_messages(prompt, "prompt")
    if type(prompt) is not type(chosen):
        raise InvalidRow(
            "mixed_format", "'prompt', 'chosen' and 'rejected' must all be strings or all message lists"
        )
    if is_blank(prompt):
        raise InvalidRow("empty_prompt", "'prompt' is empty")
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if is_blank(response):
            raise InvalidRow("empty_response", f"'{name}' response is empty")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def load_preference_data(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict | list[dict],
    *,
    split: str = "train",
    skip_invalid: bool = False,
) -> tuple[datasets.Dataset, DataReport]:
    """Loads preference pairs in any supported format and normalizes them to prompt/chosen/rejected.

    Supported rows: standard (``prompt``/``chosen``/``rejected`` strings), conversational (lists of
    ``{role, content}`` messages), implicit prompt (only ``chosen``/``rejected``; the prompt is their common
    leading messages, or their common leading text cut back to a whitespace boundary) and ShareGPT
    (``conversations`` of ``{from, value}`` turns plus ``chosen``/``rejected`` turns or strings).

    Args:
        source: A ``.jsonl``, ``.json`` or ``.parquet`` file, a ``save_to_disk`` directory, a
            ``datasets.Dataset``/``DatasetDict`` or a list of row dicts.
        split: Split to read from a ``DatasetDict`` or a saved dataset dict.
        skip_invalid: Drop invalid rows and count them in the report instead of raising.

    Returns:
        The normalized dataset, where each column holds strings or message lists for every row, and a report.

    Raises:
        UserError: (a ``ValueError``) A row is invalid or a line holds bytes that are not UTF-8 (the message
            names the file and line or row) and ``skip_invalid`` is false, or the source cannot be read.
        FileNotFoundError: Nothing exists at ``source``.
    """
    report = DataReport()
    rows = collect_rows(source, split, skip_invalid, _normalize_row, report)
    return rows_dataset(rows, ("chosen", "rejected")), report


def rows_dataset(rows: list[dict[str, Any]], responses: tuple[str, ...], **extra: Any) -> datasets.Dataset:
    """A dataset of ``rows``' prompt and ``responses`` (all text or all messages) and ``extra`` columns."""
    column = MESSAGE_FEATURE if rows and isinstance(rows[0]["prompt"], list) else datasets.Value("string")
    features = datasets.Features({**{name: column for name in ("prompt", *responses)}, **extra})
    columns = {name: [row[name] for row in rows] for name in features}
    return datasets.Dataset.from_dict(columns, features=features)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _cut(ids: list[int], length: int, mode: str) -> list[int]:
    return ids[:length] if mode == "keep_start" else ids[len(ids) - length :]


def _render(
    tokenizer: PreTrainedTokenizerBase,
    index: int,
    prompt: list,
    responses: list[list],
    names: tuple[str, ...] = ("chosen", "rejected"),
) -> list[str]:
    """Renders a conversation as [prompt text, prompt+response texts...], checking the prompt is a prefix;
    ``names`` name the responses in errors."""
    try:
        texts = [tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)]
        texts += [tokenizer.apply_chat_template(prompt + r, tokenize=False) for r in responses]
    except jinja2.TemplateError as e:
        raise UserError(f"row {index}: the chat template failed to render: {e}") from None
    for name, text in zip(names, texts[1:], strict=True):
        if not text.startswith(texts[0]):
            raise UserError(
                f"row {index}: the chat template does not render the prompt (add_generation_prompt=True) "
                f"as a prefix of prompt+{name}: the prompt ends {texts[0][-60:]!r} but prompt+{name} has "
                f"{text[: len(texts[0])][-60:]!r} there; use a template whose generation prompt opens the "
                "assistant turn exactly as rendered assistant messages do"
            )
    return texts


def _tokenize_batch(
    batch: dict[str, list],
    indices: list[int],
    *,
    tokenizer: PreTrainedTokenizerBase,
    conversational: bool,
    responses: tuple[str, ...],
    features: datasets.Features,
    max_length: int,
    max_prompt_length: int | None,
    truncation_mode: str,
) -> dict[str, list]:
    if conversational:
        rendered = [
            _render(tokenizer, i, prompt, list(rs), names=responses)
            for i, prompt, *rs in zip(indices, batch["prompt"], *(batch[k] for k in responses), strict=True)
        ]
        texts = [list(column) for column in zip(*rendered, strict=True)]
    else:
        texts = [batch["prompt"]] + [
            [p + r for p, r in zip(batch["prompt"], batch[k], strict=True)] for k in responses
        ]
    # Chat templates carry their own BOS; plain text gets the tokenizer's special tokens as at inference.
    ids = [tokenizer(t, add_special_tokens=not conversational)["input_ids"] for t in texts]
    # Columns other than the ids and the status (an unpaired row's label) pass through unchanged.
    out: dict[str, list] = {name: batch[name] if name in batch else [] for name in features}
    for prompt, *full in zip(*ids, strict=True):
        # Tokens can merge across the prompt/response boundary; the prompt is what all sequences share.
        n = min(_common_prefix(prompt, f) for f in full)
        prompt, rs = prompt[:n], [f[n:] for f in full]
        if not conversational:
            rs = [_with_eos(r, tokenizer.eos_token_id) for r in rs]
        status = ""
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt, status = _cut(prompt, max_prompt_length, truncation_mode), "truncated"
        budget = max_length - len(prompt)
        if max(map(len, rs)) > budget:
            rs, status = [r[: max(budget, 0)] for r in rs], "truncated"
        if budget <= 0:
            status = "prompt_fills_max_length"
        elif not all(rs):
            status = "empty_response"
        elif len(rs) > 1 and all(r == rs[0] for r in rs[1:]):
            status = "identical_after_tokenization"
        for name, value in zip(("prompt", *responses), (prompt, *rs), strict=True):
            out[f"{name}_ids"].append(value)
        out["status"].append(status)
    return out


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def _tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()

    special = {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {
        "name_or_path": tokenizer.name_or_path,
        "vocab_size": len(tokenizer),
        "chat_template": digest(tokenizer.chat_template),
        "special_tokens": digest([special, tokenizer.special_tokens_map]),
        # Two local tokenizers can share the fields above; the full vocabulary and rules tell them apart.
        "model": digest(backend.to_str() if backend is not None else tokenizer.get_vocab()),
    }


def tokenize_preferences(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_end",
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Tokenizes normalized preference pairs into prompt/chosen/rejected ids, truncates and caches them.

    Conversations are rendered with the tokenizer's chat template: the prompt with
    ``add_generation_prompt=True``, each response as the rendering of prompt+response minus the prompt's.
    Standard-format responses get the EOS token appended unless they already end with it. Truncation: the
    prompt is cut to ``max_prompt_length`` (``keep_end`` keeps its end, ``keep_start`` its start); then if
    prompt+longest response exceeds ``max_length``, responses keep their first ``max_length - len(prompt)``
    tokens. Rows whose prompt alone fills ``max_length``, or whose responses end up empty or identical, are
    dropped and counted.

    Args:
        dataset: Output of ``load_preference_data``.
        tokenizer: A Hugging Face tokenizer; conversations need its chat template, text needs its EOS token.
        max_length: Token limit of prompt + each response.
        max_prompt_length: Token limit of the prompt, or None for no separate limit.
        truncation_mode: ``"keep_end"`` or ``"keep_start"``: which end of the prompt survives truncation.
        cache_dir: Directory of the tokenization cache, or None to tokenize without caching.
        num_proc: Worker processes for tokenization, or None to tokenize in this process.

    Returns:
        A dataset with int32 list columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, and a report.

    Raises:
        ValueError: Bad options, columns, tokenizer, or a chat template that does not render the prompt as a
            prefix of prompt+response.
    """
    return tokenize_rows(
        dataset,
        tokenizer,
        responses=("chosen", "rejected"),
        loader="load_preference_data",
        columns="columns prompt/chosen/rejected, all strings or all {role, content} message lists",
        desc="Tokenizing preference pairs",
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        cache_dir=cache_dir,
        num_proc=num_proc,
    )


def tokenize_rows(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    responses: tuple[str, ...],
    loader: str,
    columns: str,
    desc: str,
    max_length: int,
    max_prompt_length: int | None,
    truncation_mode: str,
    cache_dir: str | os.PathLike | None,
    num_proc: int | None = None,
    extra: datasets.Features | None = None,
    kind: str | None = None,
    report_cls: type[DataReport] = DataReport,
    counts: Callable[[datasets.Dataset], dict[str, int]] | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """``tokenize_preferences`` for a prompt with any ``responses`` columns (``fastdpo.data_unpaired``'s too).

    ``loader`` and ``columns`` describe the expected dataset in errors; ``extra`` columns pass through;
    ``kind`` keeps cache entries of different row kinds apart; the report is a ``report_cls`` built with the
    ``counts`` of the kept rows as extra fields.
    """
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"dataset: expected a datasets.Dataset from {loader}, got {type(dataset).__name__}")
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer: expected a transformers tokenizer, got {type(tokenizer).__name__}")
    extra = extra or datasets.Features()
    features = dataset.features
    if set(features) != {"prompt", *responses, *extra} or not (
        all(features[name] == features["prompt"] for name in responses)
        and features["prompt"] in (datasets.Value("string"), MESSAGE_FEATURE)
    ):
        raise ValueError(f"dataset: expected {columns} (use {loader}), got {features}")
    if truncation_mode not in ("keep_end", "keep_start"):
        raise ValueError(f"truncation_mode: expected 'keep_end' or 'keep_start', got {truncation_mode!r}")
    if max_length < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length: expected None or an int >= 1, got {max_prompt_length!r}")
    conversational = features["prompt"] == MESSAGE_FEATURE
    if conversational and not tokenizer.chat_template:
        raise UserError("tokenizer: conversational data needs a chat_template, but the tokenizer has none")
    if not conversational and tokenizer.eos_token_id is None:
        raise UserError(
            "tokenizer: standard-format responses get EOS appended, but the tokenizer has no eos_token"
        )

    options = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation_mode": truncation_mode,
    }
    key = hashlib.sha256(
        json.dumps(
            {
                "version": _CACHE_VERSION,
                **({"kind": kind} if kind else {}),
                # datasets has no public accessor; the fingerprint derives from content or the saved files.
                "data": dataset._fingerprint,
                "tokenizer": _tokenizer_fingerprint(tokenizer),
                **options,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    name = f"tokenized-{kind}-{key}" if kind else f"tokenized-{key}"
    entry = Path(cache_dir, name) if cache_dir is not None else None
    cached = read_cache(entry, report_cls) if entry is not None else None
    if cached is not None:
        return cached

    token_features = datasets.Features(
        {
            **{f"{name}_ids": datasets.List(datasets.Value("int32")) for name in ("prompt", *responses)},
            **extra,
            "status": datasets.Value("string"),
        }
    )
    # map() on an empty dataset would drop the declared features.
    tokenized = datasets.Dataset.from_dict({name: [] for name in token_features}, features=token_features)
    if len(dataset):
        tokenized = dataset.map(
            _tokenize_batch,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            features=token_features,
            fn_kwargs={
                "tokenizer": tokenizer,
                "conversational": conversational,
                "responses": responses,
                "features": token_features,
                **options,
            },
            num_proc=num_proc,
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=key,
            desc=desc,
        )
    statuses = Counter(tokenized["status"])
    truncated = statuses.pop("truncated", 0)
    kept = truncated + statuses.pop("", 0)
    if statuses:
        tokenized = tokenized.filter(
            lambda status: status in ("", "truncated"), input_columns="status", keep_in_memory=True
        )
    tokenized = tokenized.remove_columns("status")
    extra_counts = counts(tokenized) if counts else {}
    report = report_cls(len(dataset), kept, dict(statuses), truncated, False, **extra_counts)
    if entry is not None:
        write_cache(entry, tokenized, report)
    return tokenized, report
