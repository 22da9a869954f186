"""Checkpoints: safetensors and JSON, written atomically, verified (sha256) on load, never unpickled.

``local`` holds single-process checkpoints and the final export, ``sharded`` the per-rank (FSDP2 / DDP)
ones; both go through ``io`` (atomic writes, sha256 metadata, pointers, pruning) and share one resume
policy (``resume_point``).
"""

from fastdpo.checkpoint.io import CheckpointError
from fastdpo.checkpoint.local import latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from fastdpo.checkpoint.resume import read_extra, resume_point
from fastdpo.checkpoint.sharded import consolidate, latest_sharded, load_sharded, save_sharded

__all__ = [
    "CheckpointError",
    "consolidate",
    "latest_checkpoint",
    "latest_sharded",
    "load_checkpoint",
    "load_sharded",
    "read_extra",
    "resume_point",
    "save_checkpoint",
    "save_final",
    "save_sharded",
]
