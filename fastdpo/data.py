"""Preference data: loading TRL and ShareGPT formats and normalizing them to prompt/chosen/rejected.

``load_preference_data`` reads a file, a saved ``datasets`` directory or in-memory rows, validates every row
and normalizes it to ``prompt``/``chosen``/``rejected``, each a string (standard format) or a list of
``{role, content}`` messages (conversational format). ``tokenize_preferences`` (``fastdpo.data_tokenize``,
exported here too) turns that into token ids, truncates them and caches the result on disk. Reading the
files themselves is ``fastdpo.data_sources``'s job.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

from fastdpo.data_sources import InvalidRow, collect_rows, describe
from fastdpo.data_tokenize import MESSAGE_FEATURE, DataReport, tokenize_preferences

__all__ = ["DataReport", "load_preference_data", "tokenize_preferences"]

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_EXPECTED = (
    "a JSON object with 'prompt', 'chosen', 'rejected' (or only 'chosen'/'rejected' with an implicit prompt, "
    "or ShareGPT 'conversations' with 'chosen'/'rejected')"
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
