"""Tokenizing normalized rows: chat templates, the prompt shared by every response, truncation, the cache.

``tokenize_preferences`` (pairs) and ``tokenize_rows`` (any responses: ``fastdpo.data_unpaired``'s too)
turn the rows ``fastdpo.data`` loads into token ids, truncate them and cache the result on disk
(``fastdpo.data_cache``). ``DataReport`` counts what happened to the rows on the way.
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
from fastdpo.errors import UserError

__all__ = ["MESSAGE_FEATURE", "DataReport", "tokenize_preferences", "tokenize_rows"]

# Bump when the tokenized layout or the truncation rules change, so old cache entries are never reused.
_CACHE_VERSION = 2  # 2: an entry records the sha256 of its files, checked on load
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
