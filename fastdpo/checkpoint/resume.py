"""The one resume policy: which checkpoint, of either kind, a run folder resumes from."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from fastdpo.checkpoint import local, sharded
from fastdpo.checkpoint.io import CheckpointError, read_meta
from fastdpo.checkpoint.local import latest_checkpoint
from fastdpo.checkpoint.sharded import latest_sharded
from fastdpo.checkpoint.state import read_component

__all__ = ["read_extra", "resume_point"]

_FINDERS = {"local": latest_checkpoint, "sharded": latest_sharded}


def resume_point(
    run_dir: str | os.PathLike, kind: Literal["local", "sharded"] | None = None
) -> tuple[Path, str] | None:
    """The newest valid checkpoint in ``run_dir`` as ``(folder, kind)``, or None if it holds none.

    ``kind`` ``"local"`` (``save_checkpoint``) or ``"sharded"`` (``save_sharded``) restricts the search;
    None considers both and takes the one with the higher step. Within a kind, the pointer's checkpoint
    comes first, then the others newest first; one that fails a check (missing file, size, sha256,
    garbled metadata or safetensors header, other format or version) is skipped with a warning naming it
    and the reason. Every rank calls it (sharded checkpoints are verified by the ranks together).
    Load the result with ``load_checkpoint`` or ``load_sharded``.

    Raises:
        CheckpointError (a ValueError): ``run_dir`` holds checkpoints (of ``kind``) but none is valid; the
            message names ``run_dir`` and every checkpoint with its reason.
        ValueError: unknown ``kind``.
    """
    if kind is not None and kind not in _FINDERS:
        raise ValueError(f"kind must be 'local', 'sharded' or None, got {kind!r}")
    found, errors = [], []
    for name in [kind] if kind else list(_FINDERS):
        try:
            path = _FINDERS[name](run_dir)
        except CheckpointError as err:
            errors.append(err)
            continue
        if path is not None:
            found.append((_step(path), path, name))
    if not found and errors:
        raise CheckpointError("; ".join(str(e) for e in errors))
    if not found:
        return None
    _, path, name = max(found, key=lambda item: item[0])
    return path, name


def read_extra(path: str | os.PathLike, kind: Literal["local", "sharded"]) -> dict[str, Any]:
    """The ``extra`` state of checkpoint ``path`` of ``kind`` (as ``resume_point`` found it), read without
    loading its weights or optimizer state, so that a run can judge a resume before it loads a model.

    Raises:
        CheckpointError: Its metadata or extra state does not read.
    """
    path = Path(path)
    if kind == "sharded":
        return dict(read_meta(path, sharded.LAYOUT)["extra"])
    meta = read_meta(path, local.LAYOUT)
    return read_component(path, "extra", meta["files"], "cpu") or {}


def _step(path: Path) -> int:
    """The step in a checkpoint folder's name (also of a moved-aside ``.trash-*`` one)."""
    return int(re.search(r"-(\d{8,})(?:-[0-9a-f]{8})?$", path.name).group(1))
