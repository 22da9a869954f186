"""The tokenization cache: one folder per (data, tokenizer, options) key, written atomically, holding the
tokenized rows (``save_to_disk``), their ``DataReport`` and the sha256 of its files, checked on load."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets

__all__ = ["read_cache", "write_cache"]

logger = logging.getLogger("fastdpo")
_DIGEST_FILE = "sha256.txt"


def read_cache(entry: Path, report_cls: type) -> tuple[datasets.Dataset, Any] | None:
    """The rows and report of a cache entry, or None when it is missing or damaged (then removed)."""
    if not (entry / "report.json").exists() or not _verified(entry):
        return None
    report = report_cls(**json.loads((entry / "report.json").read_text()))
    report.from_cache = True
    return datasets.load_from_disk(os.fspath(entry / "data")), report


def _entry_sha256(entry: Path) -> str:
    """The sha256 of a cache entry's files (names and bytes), its digest file aside."""
    sha = hashlib.sha256()
    for path in sorted(p for p in entry.rglob("*") if p.is_file() and p.name != _DIGEST_FILE):
        sha.update(path.relative_to(entry).as_posix().encode() + b"\0")
        sha.update(path.read_bytes())
    return sha.hexdigest()


def _verified(entry: Path) -> bool:
    """Whether a cache entry's files match their recorded sha256; a damaged entry is removed with a warning,
    to be tokenized again, instead of feeding training whatever its bytes now say."""
    digest = entry / _DIGEST_FILE
    if digest.is_file() and digest.read_text().strip() == _entry_sha256(entry):
        return True
    logger.warning(
        "tokenization cache %s: its files do not match their recorded sha256; recomputing it", entry
    )
    trash = entry.with_name(f".{entry.name}-{uuid.uuid4().hex}")
    try:
        entry.rename(trash)  # out of the way first, so that no reader meets a half-deleted entry
    except OSError:
        return False  # another process moved it already
    shutil.rmtree(trash, ignore_errors=True)
    return False


def write_cache(entry: Path, tokenized: datasets.Dataset, report: Any) -> None:
    """Writes a cache entry to a temporary directory and renames it, so readers never see a partial one."""
    tmp = entry.with_name(f".{entry.name}-{uuid.uuid4().hex}")
    tokenized.save_to_disk(os.fspath(tmp / "data"))
    (tmp / "report.json").write_text(json.dumps(asdict(report)))
    (tmp / _DIGEST_FILE).write_text(_entry_sha256(tmp))
    try:
        tmp.rename(entry)
    except OSError:  # another process wrote the same entry first; its content is identical
        shutil.rmtree(tmp, ignore_errors=True)
