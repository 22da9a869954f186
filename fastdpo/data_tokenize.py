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
from fastdpo.model_identity import TOKENIZER_FILES, files_identity

__all__ = ["MESSAGE_FEATURE", "DataReport", "char_budget", "tokenize_preferences", "tokenize_rows"]

# Bump when the tokenized layout or the truncation rules change, so old cache entries are never reused.
# 2: an entry records the sha256 of its files, checked on load; 3: the tokenizer's files' sha256 in the key,
# long strings cut before tokenizing (rows_cut)
_CACHE_VERSION = 3
MESSAGE_FEATURE = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
# Tokens of context kept past the last token truncation can keep, when a long string is cut (char_budget).
_MARGIN_TOKENS = 16


@dataclass
class DataReport:
    """What happened to the rows of one loading or tokenization pass.

    Attributes:
        rows_read: Rows seen in the input.
        rows_kept: Rows in the output.
        rows_dropped: Dropped rows per reason (``rows_read == rows_kept + num_dropped``).
        rows_truncated: Kept rows whose prompt or responses were cut.
        from_cache: Whether the result was read from the tokenization cache.
        rows_cut: Rows (kept or not) with a string cut to ``char_budget`` characters before tokenizing.
    """

    rows_read: int = 0
    rows_kept: int = 0
    rows_dropped: dict[str, int] = field(default_factory=dict)
    rows_truncated: int = 0
    from_cache: bool = False
    rows_cut: int = 0

    @property
    def num_dropped(self) -> int:
        """Total number of dropped rows."""
        return sum(self.rows_dropped.values())

    def __str__(self) -> str:
        dropped = f"{self.num_dropped} dropped"
        if self.rows_dropped:
            dropped += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.rows_dropped.items())) + ")"
        cached = " [from cache]" if self.from_cache else ""
        cut = f", {self.rows_cut} cut before tokenizing" if self.rows_cut else ""
        return (
            f"{self.rows_read} rows read, {self.rows_kept} kept, {dropped}, "
            f"{self.rows_truncated} truncated{cut}{cached}"
        )


def char_budget(tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """How many characters of one string can hold a token that truncation to ``max_length`` keeps.

    A row keeps at most ``max_length`` tokens of any one string, from its start (responses, a
    ``keep_start`` prompt) or its end (a ``keep_end`` prompt). No token covers more characters than the
    longest vocabulary entry decodes to, plus one (a leading-space marker that decoding drops), special
    tokens included since they match literally in text; call it L. So the kept tokens of a string lie in
    its first (or last) ``max_length * L`` characters, and a cut to ``(max_length + _MARGIN_TOKENS) * L``
    keeps them with at least ``_MARGIN_TOKENS`` tokens of context beyond the last kept one. That context is
    enough for the tokenizers LLMs use (byte-level BPE, SentencePiece, WordPiece): they decide a token from
    its pre-token (a word, a digit run) and its neighbours within it, not from text that many tokens
    away. Normalizers can break the bound (NFKC folding many code points into one, an unknown token over
    a whole word), so ``_cut_row`` checks every cut piece for ``max_length + _MARGIN_TOKENS`` tokens and
    tokenizes the row whole when one falls short.
    """
    ids = [[i] for i in range(len(tokenizer))]
    longest = max(map(len, tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False)), default=1)
    return (max_length + _MARGIN_TOKENS) * (longest + 1)


def _cut_text(text: str, budget: int, keep_end: bool) -> str:
    if len(text) <= budget:
        return text
    return text[len(text) - budget :] if keep_end else text[:budget]


def _cut_value(value: str | list[dict], budget: int, keep_end: bool, pieces: list[str]) -> str | list[dict]:
    """``value`` (a string or messages) with each text over ``budget`` characters cut; adds the cut texts
    to ``pieces``."""
    texts = [value] if isinstance(value, str) else [m["content"] for m in value]
    cut = [_cut_text(t, budget, keep_end) for t in texts]
    pieces += [c for c, t in zip(cut, texts, strict=True) if len(c) < len(t)]
    if isinstance(value, str):
        return cut[0]
    return [{**m, "content": c} for m, c in zip(value, cut, strict=True)]


def _cut_row(
    tokenizer: PreTrainedTokenizerBase,
    values: list[Any],
    budget: int | None,
    max_length: int,
    keep_end: bool,
) -> tuple[list[Any], bool]:
    """A row's ``[prompt, *responses]`` with every text cut to ``budget`` characters (the prompt at its
    start under ``keep_end``), and whether anything was cut; the row unchanged if a cut piece holds fewer
    than ``max_length + _MARGIN_TOKENS`` tokens, where ``char_budget``'s bound does not hold."""
    if budget is None:
        return values, False
    pieces: list[str] = []
    cut = [_cut_value(values[0], budget, keep_end, pieces)]
    cut += [_cut_value(v, budget, False, pieces) for v in values[1:]]
    if not pieces:
        return values, False
    counts = map(len, tokenizer(pieces, add_special_tokens=False)["input_ids"])
    if min(counts) < max_length + _MARGIN_TOKENS:
        return values, False
    return cut, True


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
    cut_chars: int | None,
) -> dict[str, list]:
    # Strings cut to cut_chars first (char_budget), so that one huge row cannot take memory in proportion.
    keep_end = truncation_mode == "keep_end"
    rows = [
        _cut_row(tokenizer, list(values), cut_chars, max_length, keep_end)
        for values in zip(batch["prompt"], *(batch[k] for k in responses), strict=True)
    ]
    columns = list(zip(*(values for values, _ in rows), strict=True))
    if conversational:
        rendered = [
            _render(tokenizer, i, prompt, list(rs), names=responses)
            for i, prompt, *rs in zip(indices, *columns, strict=True)
        ]
        texts = [list(column) for column in zip(*rendered, strict=True)]
    else:
        prompts = columns[0]
        texts = [list(prompts)] + [[p + r for p, r in zip(prompts, rs, strict=True)] for rs in columns[1:]]
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
    out["cut"] = [cut for _, cut in rows]
    return out


def _with_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def _tokenizer_fingerprint(
    tokenizer: PreTrainedTokenizerBase, cache_dir: str | os.PathLike | None
) -> dict[str, Any]:
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
        # And the files it was loaded from (a hub id: the commit of its cached snapshot), whatever in them
        # the fields above leave out.
        "files": files_identity(tokenizer.name_or_path, TOKENIZER_FILES, cache_dir)
        if tokenizer.name_or_path
        else None,
    }


def _cache_key(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    kind: str | None,
    options: dict[str, Any],
    cache_dir: str | os.PathLike | None,
) -> str:
    """The tokenization cache key of ``dataset``'s rows under ``tokenizer`` and ``options``."""
    key = {
        "version": _CACHE_VERSION,
        **({"kind": kind} if kind else {}),
        # datasets has no public accessor; the fingerprint derives from content or the saved files.
        "data": dataset._fingerprint,
        "tokenizer": _tokenizer_fingerprint(tokenizer, cache_dir),
        **options,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


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
    key = _cache_key(dataset, tokenizer, kind, options, cache_dir)
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
            "cut": datasets.Value("bool"),
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
                "cut_chars": char_budget(tokenizer, max_length),
                **options,
            },
            num_proc=num_proc,
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=key,
            desc=desc,
        )
    rows_cut = sum(tokenized["cut"])
    statuses = Counter(tokenized["status"])
    truncated = statuses.pop("truncated", 0)
    kept = truncated + statuses.pop("", 0)
    if statuses:
        tokenized = tokenized.filter(
            lambda status: status in ("", "truncated"), input_columns="status", keep_in_memory=True
        )
    tokenized = tokenized.remove_columns(["status", "cut"])
    extra_counts = counts(tokenized) if counts else {}
    report = report_cls(len(dataset), kept, dict(statuses), truncated, False, rows_cut, **extra_counts)
    if entry is not None:
        write_cache(entry, tokenized, report)
    return tokenized, report
