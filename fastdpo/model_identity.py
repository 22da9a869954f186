"""What identifies a model's or tokenizer's files: the sha256 and size of each, or a hub id's revision.

A path names a folder, not its contents: weights replaced in place (same architecture, same size, the
mtime even put back by ``cp -p``) would pass a check of names, sizes and mtimes. So each file's sha256 is
part of the identity. Hashing gigabytes on every run would cost more than the check is worth, so a hash
is cached in ``cache_dir/file-sha256.json`` under the file's resolved path, size, mtime, ctime and inode:
the kernel sets the ctime of every write or rename and no user call can set it back, so a file written
in place never matches its old entry. A hub id is identified by the commit of its snapshot in the local
Hugging Face cache (whose files the commit pins), or ``None`` while it is not cached yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["MODEL_FILES", "TOKENIZER_FILES", "files_identity", "model_identity"]

# The files that decide what a model computes (weights, architecture, generation defaults) and what a
# tokenizer emits (vocabulary, rules, special tokens, chat template).
MODEL_FILES = ("*.safetensors", "config.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
)
_HASH_CACHE = "file-sha256.json"
_HUB_PROBES = {MODEL_FILES: "config.json", TOKENIZER_FILES: "tokenizer_config.json"}


def model_identity(name: str, cache_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The identity of the model ``name`` (a folder or a hub id): its weight and config files' contents.

    Args:
        name: A ``save_pretrained`` folder or a hub id.
        cache_dir: Where the hashes are cached, or None to hash without caching.

    Returns:
        ``{"files": {name: {"size", "sha256"}}}`` for a folder, ``{"revision": commit or None}`` for a
        hub id.
    """
    return files_identity(name, MODEL_FILES, cache_dir)


def files_identity(
    name: str, patterns: tuple[str, ...], cache_dir: str | os.PathLike | None
) -> dict[str, Any]:
    """``model_identity`` over the files of ``name`` that match ``patterns`` (``MODEL_FILES`` or
    ``TOKENIZER_FILES``)."""
    folder = Path(name)
    if not folder.is_dir():
        return {"revision": _hub_revision(name, _HUB_PROBES.get(patterns, "config.json"))}
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    cache = _HashCache(Path(cache_dir) / _HASH_CACHE if cache_dir is not None else None)
    identity = {p.name: {"size": p.stat().st_size, "sha256": cache.sha256(p)} for p in files}
    cache.save()
    return {"files": identity}


def _hub_revision(name: str, probe: str) -> str | None:
    """The commit of hub id ``name``'s snapshot in the local cache, or None if it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, probe)
    except ValueError:  # not a valid repo id: transformers will say so when it loads
        return None
    # The cache's layout: <cache>/models--org--name/snapshots/<commit>/<file>.
    return Path(found).parent.name if isinstance(found, str) else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _HashCache:
    """File sha256s keyed by resolved path, valid while the file's size, mtime, ctime and inode hold."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.changed = path, False
        self.entries: dict[str, Any] = {}
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                loaded = {}  # a garbled cache only costs a rehash
            self.entries = loaded if isinstance(loaded, dict) else {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        version = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        key = str(file.resolve())
        entry = self.entries.get(key)
        if (
            isinstance(entry, dict)
            and entry.get("version") == version
            and isinstance(entry.get("sha256"), str)
        ):
            return entry["sha256"]
        digest = _sha256(file)
        self.entries[key] = {"version": version, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        """Writes the cache atomically; a failed write (read-only cache folder) only costs a rehash later."""
        if self.path is None or not self.changed:
            return
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.entries), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)
