"""The one io layer of both checkpoint kinds: atomic writes, sha256-verified metadata, pointers, pruning.

A checkpoint kind is a ``Layout``: its folders are ``run_dir/{prefix}{step:08d}``, a pointer file names the
newest one, and a metadata file (written last) describes the folder: format, version, step, and every other
file with its size and sha256. The metadata carries a sha256 of its own canonical JSON too, so a flipped
byte anywhere in a checkpoint is caught.

Writes go to a temporary folder that is fsynced and renamed into place in one ``os.replace``; the pointer
is replaced atomically after that, and older checkpoints are pruned only then. A job killed at any point
leaves the previous checkpoint and pointer valid; leftover temp folders are removed by the next save.

The resume policy (``newest_valid``): the pointer's checkpoint first, then the others, newest first; one
that fails a check is skipped with a warning naming it and the reason. If checkpoints exist but none is
valid, ``CheckpointError`` names the run folder and every reason. Nothing here unpickles anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

__all__ = [
    "CheckpointError",
    "Layout",
    "check_keep_last",
    "check_step",
    "file_digest",
    "fsync",
    "load_tensors",
    "newest_valid",
    "prune",
    "read_json",
    "read_meta",
    "remove_stale",
    "replace_dir",
    "save_failed",
    "verify_files",
    "write_json",
    "write_meta",
    "write_pointer",
    "write_tensors",
]

_CHUNK = 1 << 23
# (st_dev, st_ino) -> (st_size, st_mtime_ns, sha256) of files this process has written or hashed, so that
# choosing a checkpoint and then loading it (or saving and then resuming) hashes each file once. A
# rewrite changes the mtime; a rename (temp folder into place) keeps the inode.
_digests: dict[tuple[int, int], tuple[int, int, str]] = {}


class CheckpointError(ValueError):
    """A checkpoint failed a check (missing file, size, sha256, garbled metadata), or none is valid."""


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint kind keeps its folders, pointer and metadata, and which format it writes."""

    prefix: str
    pointer: str
    meta: str
    format: str
    version: int

    def folder(self, step: int) -> str:
        return f"{self.prefix}{step:08d}"

    def step_of(self, name: str) -> int | None:
        """The step in a checkpoint folder name, or None for any other name."""
        match = re.fullmatch(rf"{re.escape(self.prefix)}(\d{{8,}})", name)
        return int(match.group(1)) if match else None


def check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def check_keep_last(keep_last: Any) -> None:
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)):
        raise TypeError(f"keep_last must be an int >= 1 or None, got {type(keep_last).__name__}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint), got {keep_last}")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as JSON (``inf`` / ``nan`` allowed) and fsyncs it."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Writes a safetensors file; a failed write (a full disk) is an ``OSError`` like any other write's."""
    try:
        safetensors.torch.save_file(tensors, path, metadata=metadata)
    except safetensors.SafetensorError as err:
        # The Rust writer reports I/O failures as SafetensorError("... Os { code: 28, ... }"), not OSError.
        code = re.search(r"code: (\d+)", str(err))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(path)) from err
    fsync(path)


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes (remembered per inode, size and mtime for this process)."""
    stat = path.stat()
    key, sig = (stat.st_dev, stat.st_ino), (stat.st_size, stat.st_mtime_ns)
    known = _digests.get(key)
    if known is not None and known[:2] == sig:
        return known[2]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    _digests[key] = (*sig, sha.hexdigest())
    return sha.hexdigest()


def _checksum(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_meta(directory: Path, layout: Layout, step: int, digests: Mapping[str, str], **fields: Any) -> None:
    """Writes the layout's metadata file into ``directory``: the files' sizes and sha256, then fsyncs it.

    Args:
        directory: The (temporary) checkpoint folder.
        layout: The checkpoint kind.
        step: The checkpoint's step.
        digests: Every file of the checkpoint but the metadata (relative to ``directory``) -> its sha256.
        **fields: More JSON-serializable entries of the metadata.
    """
    meta = {"format": layout.format, "version": layout.version, "step": step, **fields}
    meta["files"] = {
        name: {"size": (directory / name).stat().st_size, "sha256": digests[name]} for name in sorted(digests)
    }
    meta["checksum"] = _checksum(meta)
    write_json(directory / layout.meta, meta)
    fsync(directory)


def write_pointer(run_dir: Path, layout: Layout, name: str) -> None:
    """Points ``run_dir/<layout.pointer>`` at ``name`` with one atomic replace."""
    tmp = run_dir / f".tmp-{layout.pointer}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, run_dir / layout.pointer)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    fsync(run_dir)


def save_failed(err: OSError, target: Path, pointer: Path) -> OSError:
    """``err`` restated for a failed save: which checkpoint, and that the previous one still stands."""
    detail = err.strerror or str(err)
    if err.filename:
        detail += f": {err.filename}"
    message = (
        f"could not save checkpoint {target} ({detail}); {pointer} still names the previous checkpoint, "
        "which a resume uses"
    )
    return OSError(err.errno, message) if err.errno is not None else OSError(message)


def replace_dir(src: Path, dst: Path, *, trash_prefix: str) -> None:
    """Moves ``src`` to ``dst``; an existing ``dst`` is first moved aside, then deleted."""
    trash = None
    if dst.exists():
        trash = dst.parent / f"{trash_prefix}-{secrets.token_hex(4)}"
        os.replace(dst, trash)
    os.replace(src, dst)
    fsync(dst.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _stale_re(layout: Layout) -> re.Pattern:
    prefix, pointer = re.escape(layout.prefix), re.escape(layout.pointer)
    return re.compile(rf"^\.(tmp-{prefix}\d{{8,}}|trash-{prefix}\d{{8,}}|tmp-{pointer})-[0-9a-f]{{8}}$")


def remove_stale(run_dir: Path, layout: Layout, complete: Callable[[Path], Any]) -> None:
    """Deletes leftovers of killed saves, sparing a moved-aside folder that a resume would still use.

    ``complete`` is the kind's cheap check (metadata and sizes, see ``newest_valid``).
    """
    found = newest_valid(run_dir, layout, complete, warn=False)
    keep = None if found is None else found[0]
    stale = _stale_re(layout)
    for entry in run_dir.iterdir():
        if stale.match(entry.name) and entry != keep:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def prune(
    run_dir: Path,
    layout: Layout,
    step: int,
    keep_last: int,
    complete: Callable[[Path], Any],
    *,
    protect: str | os.PathLike | None = None,
) -> None:
    """Deletes complete checkpoints older than the ``keep_last`` newest with a step <= ``step``, except
    ``protect`` (the trainer's last good checkpoint during a bad streak).

    Checkpoints with a higher step (from a timeline abandoned by resuming an earlier checkpoint) are not
    touched. Each victim is renamed to a stale name first, so a kill mid-delete never leaves a
    half-deleted folder that looks like a checkpoint.
    """
    older = [path for s, path in _folders(run_dir, layout) if s <= step and _passes(complete, path)]
    kept = None if protect is None else Path(protect).resolve()
    for path in older[: max(len(older) - keep_last, 0)]:
        if path.resolve() == kept:
            continue
        trash = run_dir / f".trash-{path.name}-{secrets.token_hex(4)}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Reading and verifying
# --------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """Parses a JSON file; ``CheckpointError`` naming the file if it is unreadable or garbled."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(
            f"{path.name} is unreadable or not valid JSON ({type(err).__name__}: {err})"
        ) from None


def load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Reads a safetensors file; ``CheckpointError`` naming the file if it is garbled."""
    try:
        return safetensors.torch.load_file(path, device=device)
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise CheckpointError(f"{path.name} is not a readable safetensors file ({err})") from None


def read_meta(directory: Path, layout: Layout) -> dict[str, Any]:
    """The folder's metadata after the cheap checks: it parses, its checksum, format, version and step.

    Raises:
        CheckpointError: naming the first failed check.
    """
    if not (directory / layout.meta).is_file():
        raise CheckpointError(f"no {layout.meta} (an unfinished save?)")
    meta = read_json(directory / layout.meta)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{layout.meta} holds {type(meta).__name__}, not an object")
    if meta.get("format") != layout.format or meta.get("version") != layout.version:
        raise CheckpointError(
            f"{layout.meta} holds format {meta.get('format')!r} version {meta.get('version')!r}; expected "
            f"{layout.format!r} version {layout.version}"
        )
    if meta.get("checksum") != _checksum(meta):
        raise CheckpointError(f"{layout.meta} does not match its checksum (corrupted)")
    files = meta.get("files")
    if not (
        isinstance(meta.get("step"), int)
        and isinstance(files, dict)
        and all(isinstance(e, dict) and isinstance(e.get("size"), int) for e in files.values())
    ):
        raise CheckpointError(f"{layout.meta} lacks a step or a well-formed file list")
    outside = [name for name in files if Path(name).is_absolute() or ".." in Path(name).parts]
    if outside:
        raise CheckpointError(f"{layout.meta} lists files outside the checkpoint folder: {outside}")
    return meta


def verify_files(directory: Path, files: Mapping[str, Mapping[str, Any]], *, deep: bool = True) -> None:
    """Checks every listed file exists with its recorded size and, if ``deep``, its recorded sha256.

    Raises:
        CheckpointError: naming the first file that fails and how.
    """
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{name} has {path.stat().st_size} bytes, {entry['size']} were written")
    if not deep:
        return
    for name, entry in files.items():
        try:
            digest = file_digest(directory / name)
        except OSError as err:
            raise CheckpointError(f"{name} is unreadable ({err})") from None
        if digest != entry.get("sha256"):
            raise CheckpointError(f"{name} does not match its recorded sha256 (corrupted)")


def _passes(check: Callable[[Path], Any], path: Path) -> bool:
    try:
        check(path)
    except CheckpointError:
        return False
    return True


def _folders(run_dir: Path, layout: Layout) -> list[tuple[int, Path]]:
    """``(step, path)`` of every folder named like a checkpoint of ``layout``, oldest first."""
    found = []
    for entry in run_dir.iterdir():
        step = layout.step_of(entry.name)
        if step is not None and entry.is_dir():
            found.append((step, entry))
    return sorted(found)


def _candidates(run_dir: Path, layout: Layout) -> list[Path]:
    """Checkpoint folders in the order they are tried: the pointer's, then the rest newest first.

    A kill while re-saving the pointer's step leaves the old folder moved aside, still intact: it comes
    right after the pointer's own folder. Folders with a higher step than the pointer's belong to a
    timeline abandoned by resuming from an earlier checkpoint; they come last.
    """
    folders = _folders(run_dir, layout)
    pointer = run_dir / layout.pointer
    target = pointer.read_text(encoding="utf-8", errors="replace").strip() if pointer.is_file() else ""
    step = layout.step_of(target)
    if step is None:
        return [path for _, path in reversed(folders)]
    moved = sorted(p for p in run_dir.glob(f".trash-{target}-*") if _stale_re(layout).match(p.name))
    lower = [path for s, path in reversed(folders) if s < step]
    higher = [path for s, path in reversed(folders) if s > step]
    return [run_dir / target, *moved, *lower, *higher]


def newest_valid(
    run_dir: Path, layout: Layout, check: Callable[[Path], Any], *, warn: bool = True
) -> tuple[Path, Any] | None:
    """The first checkpoint ``check`` accepts, in ``_candidates`` order, with what ``check`` returned.

    Args:
        run_dir: The run folder.
        layout: The checkpoint kind.
        check: Returns something (e.g. the metadata) for a valid checkpoint folder, raises
            ``CheckpointError`` with the reason otherwise.
        warn: Warn about every skipped checkpoint, and raise if checkpoints exist but none is valid;
            False (for bookkeeping during a save) returns None instead.

    Raises:
        CheckpointError: ``warn`` and checkpoints exist, none valid; names ``run_dir`` and each reason.
    """
    if not run_dir.is_dir():
        return None
    reasons = []
    for path in _candidates(run_dir, layout):
        if not path.exists():  # the pointer names a folder that is gone: not a checkpoint to report
            continue
        try:
            return path, check(path)
        except CheckpointError as err:
            reasons.append(f"{path.name}: {err}")
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=3)
    if warn and reasons:
        raise CheckpointError(
            f"no valid {layout.format} in {run_dir}: every checkpoint failed a check; " + "; ".join(reasons)
        )
    return None
