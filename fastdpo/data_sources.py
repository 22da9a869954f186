"""Reading preference rows from files and datasets: JSON Lines, JSON, Parquet, ``save_to_disk`` folders.

``source_rows`` yields each raw row with its location (file and line, or row number) so that
``fastdpo.data`` can name it in an error; a line that cannot be read at all (undecodable bytes, invalid
JSON) comes as an ``InvalidRow``, which ``skip_invalid`` counts and skips like any other invalid row.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from fastdpo.errors import UserError

__all__ = ["InvalidRow", "check_data_path", "collect_rows", "describe", "source_rows"]


class InvalidRow(Exception):
    """A row matching no supported format; ``reason`` is its key in ``DataReport.rows_dropped``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def describe(value: Any) -> str:
    """Equals ``"<type> <repr>"`` with the repr cut to 60 characters, for error messages."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _not_utf8(data: bytes, error: UnicodeDecodeError) -> str:
    """Describes the first undecodable byte of ``data``; its column counts bytes from its line's start."""
    column = error.start - data.rfind(b"\n", 0, error.start)
    return f"not UTF-8 text (byte 0x{data[error.start]:02x} at column {column})"


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[str, Any]]:
    """Yields (location, row) per non-blank line; an unreadable line yields an ``InvalidRow`` as its row."""
    # Lines are decoded one by one, so undecodable bytes cost only their own line under skip_invalid.
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            location = f"{name} line {lineno}"
            try:
                # An editor's byte order mark may open the file; it is not part of the first row.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield location, InvalidRow("invalid_utf8", _not_utf8(raw, e))
                continue
            if not line.strip():
                continue
            try:
                yield location, json.loads(line)
            except json.JSONDecodeError as e:
                yield location, InvalidRow("invalid_json", f"invalid JSON ({e.msg} at column {e.colno})")


def _pick_split(data: datasets.Dataset | datasets.DatasetDict, split: str, name: str) -> datasets.Dataset:
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise UserError(f"{name}: split {split!r} not found; expected one of {sorted(data)}")
        return data[split]
    return data


def source_rows(source: Any, split: str) -> Iterable[tuple[str, Any]]:
    """Returns (location, raw row) pairs for any supported source."""
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return [(f"row {i}", row) for i, row in enumerate(_pick_split(source, split, "dataset").to_list())]
    if isinstance(source, list):
        return [(f"row {i}", row) for i, row in enumerate(source)]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "source: expected a path, a datasets.Dataset/DatasetDict or a list of dicts, "
            f"got {type(source).__name__}"
        )
    check_data_path(source)
    path, name = Path(source), os.fspath(source)
    if path.is_dir():
        rows = _pick_split(datasets.load_from_disk(name), split, name).to_list()
        return [(f"{name} row {i}", row) for i, row in enumerate(rows)]
    if path.suffix.lower() == ".jsonl":
        return _jsonl_rows(path, name)
    if path.suffix.lower() == ".parquet":
        return [(f"{name} row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    raw, bad = path.read_bytes(), ""
    raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        # Decoded with replacements only to tell JSON Lines (skippable line by line) from one JSON value.
        text, lineno = raw.decode("utf-8", errors="replace"), raw.count(b"\n", 0, e.start) + 1
        bad = f"{name} line {lineno}: {_not_utf8(raw, e)}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines saved as .json
            return _jsonl_rows(path, name)
        raise UserError(bad or f"{name} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    if bad or not isinstance(data, list):
        raise UserError(
            bad or f"{name}: expected a JSON array of row objects or JSON Lines, got {describe(data)}"
        )
    return [(f"{name} row {i}", row) for i, row in enumerate(data)]


def check_data_path(source: str | os.PathLike) -> None:
    """Raises unless ``source`` is an existing ``.jsonl``/``.json``/``.parquet`` file or saved dataset folder.

    Raises:
        FileNotFoundError: Nothing exists at ``source``.
        UserError: A folder not written by ``save_to_disk``, or another file type.
    """
    path, name = Path(source), os.fspath(source)
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such file or directory")
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise UserError(f"{name}: expected a directory written by datasets' save_to_disk")
    elif path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
        raise UserError(
            f"{name}: unsupported file type {path.suffix.lower()!r}; expected .jsonl, .json, .parquet or a "
            "saved dataset"
        )


def collect_rows(
    source: Any, split: str, skip_invalid: bool, normalize: Callable[[Any], dict[str, Any]], report: Any
) -> list[dict[str, Any]]:
    """Reads ``source``'s rows through ``normalize`` into one format (all text or all messages).

    ``report`` (a ``fastdpo.data.DataReport``) gets ``rows_read``, ``rows_kept`` and, with ``skip_invalid``,
    the dropped rows per reason; without it an invalid row raises a ``UserError`` naming its location.
    """
    rows: list[dict[str, Any]] = []
    for location, raw in source_rows(source, split):
        report.rows_read += 1
        try:
            if isinstance(raw, InvalidRow):
                raise raw
            row = normalize(raw)
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
    return rows
