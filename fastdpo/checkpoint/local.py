"""Atomic, verified, pickle-free single-process checkpoints with exact resume, and the final model export.

A checkpoint is a folder ``run_dir/checkpoint-{step:08d}/`` holding:

- ``model.safetensors``: the model's state dict, each shared storage once (tied embeddings are stored
  under one name, the other names are recorded as aliases in ``meta.json``). For a peft model only the
  trainable parameters and buffers are stored by default; the frozen base comes from its pretrained
  source when the run is rebuilt.
- ``optimizer.safetensors`` + ``optimizer.json``: state tensors under keys such as ``state.0.exp_avg``;
  the JSON holds everything else (param groups, python numbers) with references to those keys.
- ``scheduler.json``, ``rng.json`` + ``rng.safetensors`` (python ``random``, numpy's global generator,
  torch CPU and, when CUDA is available, every CUDA device), ``data_state.json``, ``extra.json``; each
  gets a ``.safetensors`` companion only if it holds tensors (``fastdpo.checkpoint.state``).
- ``meta.json``: format version, step, the model's key aliases, every file with its size and sha256, and
  a checksum of itself. It is written last, so a folder without a valid ``meta.json`` is never a
  checkpoint.

Writing, verifying and choosing the checkpoint to resume from are ``fastdpo.checkpoint.io``'s: a
checkpoint that fails a check is skipped with a warning and the newest valid one is used. Loading reads
safetensors and JSON only; nothing is unpickled.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fastdpo.checkpoint import io
from fastdpo.checkpoint.state import read_component, rng_state, set_rng_state, write_component

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint", "save_final"]

FORMAT_NAME = "fastdpo-checkpoint"
FORMAT_VERSION = 2
LATEST_FILE = "latest"
LAYOUT = io.Layout(
    prefix="checkpoint-", pointer=LATEST_FILE, meta="meta.json", format=FORMAT_NAME, version=FORMAT_VERSION
)

_MODEL = "model.safetensors"
_MAX_LISTED = 20


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    data_state: dict | None = None,
    extra: dict | None = None,
    keep_last: int | None = 2,
    model_weights: Literal["auto", "full", "trainable"] = "auto",
    protect: str | os.PathLike | None = None,
) -> Path:
    """Atomically writes ``run_dir/checkpoint-{step:08d}`` and points ``run_dir/latest`` at it.

    Args:
        run_dir: Folder holding the run's checkpoints; created if missing.
        step: Global optimizer step (>= 0) the checkpoint is taken after.
        model: The model; DDP / ``torch.compile`` wrappers are looked through, so keys never carry
            ``module.`` or ``_orig_mod.`` prefixes.
        optimizer: Optimizer whose ``state_dict`` is saved, or None.
        scheduler: Anything with ``state_dict`` / ``load_state_dict`` (LR scheduler), or None.
        data_state: Data-loader position (nested dicts/lists of python scalars, str, tensors), or None.
        extra: Any other resumable state, same value types as ``data_state``, or None.
        keep_last: How many complete checkpoints with a step <= ``step`` to keep, the new one included;
            older ones are deleted only after the new one and ``latest`` are in place. None keeps all.
        model_weights: ``"full"`` saves the whole state dict; ``"trainable"`` only parameters with
            ``requires_grad`` plus buffers (the rest must be rebuilt identically before loading);
            ``"auto"`` is ``"trainable"`` for peft models and ``"full"`` otherwise.
        protect: A checkpoint never pruned, whatever ``keep_last`` says (on top of the kept ones), or None.

    Returns:
        Path of the new checkpoint folder.

    Raises:
        OSError: A write failed (e.g. the disk is full); the message says so, the half-written folder is
            removed, and the previous checkpoint and ``latest`` are left as they were.
    """
    step = io.check_step(step)
    io.check_keep_last(keep_last)
    model = _unwrap(_check_module(model))
    scope = _resolve_scope(model, model_weights)
    _check_stateful("optimizer", optimizer)
    _check_stateful("scheduler", scheduler)
    for name, value in (("data_state", data_state), ("extra", extra)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    io.remove_stale(run_dir, LAYOUT, _complete_meta)
    final = run_dir / LAYOUT.folder(step)
    tmp = run_dir / f".tmp-{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        weights, aliases = _model_tensors(model, scope)
        io.write_tensors(tmp / _MODEL, weights, {"format": "pt"})
        files = [_MODEL]
        del weights
        if optimizer is not None:
            files += write_component(tmp, "optimizer", optimizer.state_dict())
        if scheduler is not None:
            files += write_component(tmp, "scheduler", scheduler.state_dict())
        files += write_component(tmp, "rng", rng_state())
        if data_state is not None:
            files += write_component(tmp, "data_state", dict(data_state))
        if extra is not None:
            files += write_component(tmp, "extra", dict(extra))
        digests = {name: io.file_digest(tmp / name) for name in files}
        io.write_meta(tmp, LAYOUT, step, digests, model={"weights": scope, "aliases": aliases})
        io.replace_dir(tmp, final, trash_prefix=f".trash-{final.name}")
        io.write_pointer(run_dir, LAYOUT, final.name)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise io.save_failed(err, final, run_dir / LATEST_FILE) from err
        raise
    io.remove_stale(run_dir, LAYOUT, _complete_meta)
    if keep_last is not None:
        io.prune(run_dir, LAYOUT, step, keep_last, _complete_meta, protect=protect)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Returns the checkpoint ``run_dir/latest`` names if it is valid, else the newest valid one.

    A checkpoint is valid when its ``meta.json`` parses, matches its checksum and carries this format,
    and every file it lists exists with the recorded size and sha256. One that is not is skipped with a
    warning naming it and the reason. The pointer wins over checkpoints with a higher step, which belong
    to a timeline abandoned by resuming from an earlier checkpoint.

    Returns:
        The checkpoint folder, or None when ``run_dir`` holds no checkpoint.

    Raises:
        CheckpointError (a ValueError): ``run_dir`` holds checkpoints but none is valid; names them all
            with their reasons.
    """
    found = io.newest_valid(Path(run_dir), LAYOUT, _verified_meta)
    return None if found is None else found[0]


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Loads a checkpoint folder into ``model`` (and optimizer / scheduler / global RNGs) in place.

    Every file is checked against the size and sha256 recorded at save time before anything is loaded.

    Args:
        path: A checkpoint folder (see ``latest_checkpoint`` to find one in a run folder).
        model: Model with the same architecture (and, for ``"trainable"`` checkpoints, the same frozen
            weights) as the one saved.
        optimizer: Optimizer over the same parameters in the same order, or None to skip.
        scheduler: Scheduler built the same way as the saved one, or None to skip.
        restore_rng: Restore python ``random``, numpy's global generator, torch CPU and CUDA RNG states.
        map_location: Device tensors are read to before being copied into the model / optimizer.

    Returns:
        ``{"step": int, "data_state": dict | None, "extra": dict | None}``.

    Raises:
        CheckpointError (a ValueError): The folder is not a complete, valid checkpoint (the failed check
            is named).
        ValueError: It lacks requested state, or its weights do not match the model (missing /
            unexpected keys, shape or dtype mismatches, all named).
    """
    path = Path(path)
    model = _unwrap(_check_module(model))
    _check_stateful("optimizer", optimizer)
    _check_stateful("scheduler", scheduler)
    try:
        meta = _verified_meta(path)
    except io.CheckpointError as err:
        hint = " (a run folder? use latest_checkpoint(run_dir))" if (path / LATEST_FILE).exists() else ""
        raise io.CheckpointError(
            f"{path} is not a complete, valid {FORMAT_NAME} v{FORMAT_VERSION} folder: {err}{hint}"
        ) from None
    files = meta["files"]
    device = str(map_location)
    for name, given in (("optimizer", optimizer), ("scheduler", scheduler)):
        if given is not None and f"{name}.json" not in files:
            raise ValueError(f"{path} holds no {name} state, but a {name} was passed to load_checkpoint")

    model_meta = meta["model"]
    weights = io.load_tensors(path / _MODEL, device)
    for alias, canonical in model_meta["aliases"].items():
        weights[alias] = weights[canonical]
    _check_weights(path, model, weights, model_meta["weights"])
    model.load_state_dict(weights, strict=model_meta["weights"] == "full")
    del weights

    if optimizer is not None:
        optimizer.load_state_dict(read_component(path, "optimizer", files, device))
    if scheduler is not None:
        scheduler.load_state_dict(read_component(path, "scheduler", files, device))
    if restore_rng:
        set_rng_state(read_component(path, "rng", files, "cpu"))
    return {
        "step": meta["step"],
        "data_state": read_component(path, "data_state", files, device),
        "extra": read_component(path, "extra", files, device),
    }


def save_final(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any | None = None) -> Path:
    """Atomically writes a folder ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads (safetensors).

    A peft model is deep-copied and its adapters merged into the copy (``merge_and_unload``), so the
    folder holds a plain transformers model and ``model`` itself is left untouched. The tokenizer, if
    given, is saved alongside. An existing ``out_dir`` is replaced only if it is empty or a previous
    export (holds ``config.json``).

    Returns:
        ``out_dir`` as a Path.
    """
    model = _unwrap(_check_module(model))
    if _is_peft(model):
        model = copy.deepcopy(model).merge_and_unload()
    if not callable(getattr(model, "save_pretrained", None)):
        raise TypeError(
            f"save_final expects a transformers PreTrainedModel (or a peft model over one), "
            f"got {type(model).__name__} without save_pretrained"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not (
        out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / "config.json").is_file())
    ):
        raise ValueError(
            f"refusing to replace {out_dir}: expected a missing folder, an empty one, or a previous export "
            "holding config.json"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stale = re.compile(rf"^\.(tmp|trash)-final-{re.escape(out_dir.name)}-[0-9a-f]{{8}}$")
    for entry in out_dir.parent.iterdir():
        if stale.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    tmp = out_dir.parent / f".tmp-final-{out_dir.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for root, _, names in os.walk(tmp, topdown=False):
            for name in names:
                io.fsync(Path(root) / name)
            io.fsync(Path(root))
        io.replace_dir(tmp, out_dir, trash_prefix=f".trash-final-{out_dir.name}")
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_module(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_stateful(name: str, obj: Any) -> None:
    if obj is not None and not (
        callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
    ):
        raise TypeError(f"{name} must have state_dict() and load_state_dict(), got {type(obj).__name__}")


def _unwrap(model: nn.Module) -> nn.Module:
    """Returns the module under DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional: without it no model can be a peft model
        return False
    return isinstance(model, PeftModel)


def _resolve_scope(model: nn.Module, model_weights: str) -> str:
    if model_weights not in ("auto", "full", "trainable"):
        raise ValueError(f"model_weights must be 'auto', 'full' or 'trainable', got {model_weights!r}")
    if model_weights == "auto":
        return "trainable" if _is_peft(model) else "full"
    return model_weights


def _scoped_state_dict(model: nn.Module, scope: str) -> dict[str, torch.Tensor]:
    """The state dict, restricted for ``"trainable"`` to requires_grad parameters and buffers.

    Keys that are neither parameters nor buffers (e.g. quantization metadata of a frozen 4-bit base) are
    frozen state too, so they are left out of the trainable scope.
    """
    state = model.state_dict()
    if scope == "full":
        return state
    keep = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    keep.update(n for n, _ in model.named_buffers(remove_duplicate=False))
    return {k: v for k, v in state.items() if k in keep}


def _model_tensors(model: nn.Module, scope: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU tensors to store, each storage once, and the alias -> stored-name map for identical views."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in _scoped_state_dict(model, scope).items():
        t = t.detach()
        if t.numel() == 0:
            tensors[name] = t.cpu().clone()
            continue
        ptr = (t.device, t.untyped_storage().data_ptr())
        view = (*ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        # safetensors refuses tensors sharing memory; a different view of an already stored storage
        # (rare: slices of one buffer) gets its own copy.
        shared = ptr in storages
        storages.add(ptr)
        t = t.cpu().contiguous()
        tensors[name] = t.clone() if shared else t
    return tensors, aliases


def _check_weights(path: Path, model: nn.Module, weights: dict[str, torch.Tensor], scope: str) -> None:
    expected = _scoped_state_dict(model, scope)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    dtypes = [
        f"{k}: checkpoint {weights[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if k in weights and weights[k].shape == v.shape and weights[k].dtype != v.dtype
    ]
    problems = [
        f"{label} ({len(items)}): {_listing(items)}"
        for label, items in (
            ("missing keys, in the model but not the checkpoint", missing),
            ("unexpected keys, in the checkpoint but not the model", unexpected),
            ("shape mismatches", shapes),
            ("dtype mismatches", dtypes),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"checkpoint {path} ({scope} weights) does not match {type(model).__name__}; expected the same "
            f"state-dict keys, shapes and dtypes; " + "; ".join(problems)
        )


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _complete_meta(path: Path) -> dict[str, Any]:
    """The metadata of a complete checkpoint (files present with their sizes), else CheckpointError."""
    meta = io.read_meta(path, LAYOUT)
    model = meta.get("model")
    if not (
        isinstance(model, dict)
        and model.get("weights") in ("full", "trainable")
        and isinstance(model.get("aliases"), dict)
        and _MODEL in meta["files"]
    ):
        raise io.CheckpointError(f"{LAYOUT.meta} does not describe the model's weights")
    io.verify_files(path, meta["files"], deep=False)
    return meta


def _verified_meta(path: Path) -> dict[str, Any]:
    """``_complete_meta``, and every file's sha256 checked too."""
    meta = _complete_meta(path)
    io.verify_files(path, meta["files"], deep=True)
    return meta
