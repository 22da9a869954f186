"""Atomic, pickle-free training checkpoints with exact resume, and the final model export.

A checkpoint is a folder ``run_dir/checkpoint-{step:08d}/`` holding:

- ``model.safetensors``: the model's state dict, each shared storage once (tied embeddings are stored
  under one name, the other names are recorded as aliases in ``meta.json``). For a peft model only the
  trainable parameters and buffers are stored by default; the frozen base comes from its pretrained
  source when the run is rebuilt.
- ``optimizer.safetensors`` + ``optimizer.json``: state tensors under keys such as ``state.0.exp_avg``;
  the JSON holds everything else (param groups, python numbers) with references to those keys.
- ``scheduler.json``, ``rng.json`` + ``rng.safetensors`` (python ``random``, numpy's global generator,
  torch CPU and, when CUDA is available, every CUDA device), ``data_state.json``, ``extra.json``; each
  gets a ``.safetensors`` companion only if it holds tensors.
- ``meta.json``: format version, step, the model's key aliases and every file with its size. It is
  written last, so a folder without a valid ``meta.json`` is never treated as a checkpoint.

Everything is written into ``run_dir/.tmp-checkpoint-*``, fsynced, and renamed into place in one
``os.replace``; the ``run_dir/latest`` pointer is replaced atomically after that, and older checkpoints
are pruned only then. A job killed at any point leaves the previous checkpoint and ``latest`` valid;
leftover temp folders are ignored and removed by the next save.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.torch
import torch
from torch import nn

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint", "save_final"]

FORMAT_NAME = "fastdpo-checkpoint"
FORMAT_VERSION = 1
LATEST_FILE = "latest"

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8,})$")
_STALE_RE = re.compile(r"^\.(tmp-checkpoint-\d{8,}|trash-checkpoint-\d{8,}|tmp-latest)-[0-9a-f]{8}$")
_META = "meta.json"
_MODEL = "model.safetensors"
_TAG_TENSOR = "__tensor__"
_TAG_NDARRAY = "__ndarray__"
_TAG_TUPLE = "__tuple__"
_TAG_ITEMS = "__items__"
_TAGS = frozenset({_TAG_TENSOR, _TAG_NDARRAY, _TAG_TUPLE, _TAG_ITEMS})
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

    Returns:
        Path of the new checkpoint folder.
    """
    step = _check_step(step)
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int)):
        raise TypeError(f"keep_last must be an int >= 1 or None, got {type(keep_last).__name__}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (or None to keep every checkpoint), got {keep_last}")
    model = _unwrap(_check_module(model))
    scope = _resolve_scope(model, model_weights)
    _check_stateful("optimizer", optimizer)
    _check_stateful("scheduler", scheduler)
    for name, value in (("data_state", data_state), ("extra", extra)):
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}")

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(run_dir)
    final = run_dir / f"checkpoint-{step:08d}"
    tmp = run_dir / f".tmp-checkpoint-{step:08d}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        files: list[str] = []
        weights, aliases = _model_tensors(model, scope)
        _write_tensors(tmp / _MODEL, weights, {"format": "pt"})
        files.append(_MODEL)
        del weights
        if optimizer is not None:
            files += _write_component(tmp, "optimizer", optimizer.state_dict())
        if scheduler is not None:
            files += _write_component(tmp, "scheduler", scheduler.state_dict())
        files += _write_component(tmp, "rng", _rng_state())
        if data_state is not None:
            files += _write_component(tmp, "data_state", dict(data_state))
        if extra is not None:
            files += _write_component(tmp, "extra", dict(extra))
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "step": step,
            "model": {"weights": scope, "aliases": aliases},
            "files": {name: (tmp / name).stat().st_size for name in files},
        }
        _write_json(tmp / _META, meta)
        _fsync(tmp)
        _replace_dir(tmp, final, trash_prefix=f".trash-checkpoint-{step:08d}")
        _write_latest(run_dir, final.name)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale(run_dir)
    if keep_last is not None:
        _prune(run_dir, step, keep_last)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Returns the checkpoint ``run_dir/latest`` names if it is complete, else the newest complete one.

    A checkpoint is complete when its ``meta.json`` parses, carries this format, and every file it lists
    exists with the recorded size. The pointer wins over checkpoints with a higher step, which belong to
    a timeline abandoned by resuming from an earlier checkpoint. Returns None when ``run_dir`` holds no
    complete checkpoint.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _CHECKPOINT_RE.match(name):
            if _read_meta(run_dir / name) is not None:
                return run_dir / name
            # A kill while re-saving the same step leaves the old folder moved aside, still intact.
            for moved in sorted(run_dir.glob(f".trash-{name}-*")):
                if _STALE_RE.match(moved.name) and _read_meta(moved) is not None:
                    return moved
    complete = _complete_checkpoints(run_dir)
    return complete[-1][1] if complete else None


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
        ValueError: The folder is not a complete checkpoint, lacks requested state, or its weights do
            not match the model (missing / unexpected keys, shape or dtype mismatches, all named).
    """
    path = Path(path)
    model = _unwrap(_check_module(model))
    _check_stateful("optimizer", optimizer)
    _check_stateful("scheduler", scheduler)
    meta = _read_meta(path)
    if meta is None:
        hint = " (a run folder? use latest_checkpoint(run_dir))" if (path / LATEST_FILE).exists() else ""
        raise ValueError(
            f"{path} is not a complete {FORMAT_NAME} v{FORMAT_VERSION} folder: expected a readable "
            f"{_META} whose listed files all exist{hint}"
        )
    files = meta["files"]
    device = str(map_location)
    for name, given in (("optimizer", optimizer), ("scheduler", scheduler)):
        if given is not None and f"{name}.json" not in files:
            raise ValueError(f"{path} holds no {name} state, but a {name} was passed to load_checkpoint")

    model_meta = meta["model"]
    weights = safetensors.torch.load_file(path / _MODEL, device=device)
    for alias, canonical in model_meta["aliases"].items():
        weights[alias] = weights[canonical]
    _check_weights(path, model, weights, model_meta["weights"])
    model.load_state_dict(weights, strict=model_meta["weights"] == "full")
    del weights

    if optimizer is not None:
        optimizer.load_state_dict(_read_component(path, "optimizer", files, device))
    if scheduler is not None:
        scheduler.load_state_dict(_read_component(path, "scheduler", files, device))
    if restore_rng:
        _set_rng_state(_read_component(path, "rng", files, "cpu"))
    return {
        "step": meta["step"],
        "data_state": _read_component(path, "data_state", files, device),
        "extra": _read_component(path, "extra", files, device),
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
                _fsync(Path(root) / name)
            _fsync(Path(root))
        _replace_dir(tmp, out_dir, trash_prefix=f".trash-final-{out_dir.name}")
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


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


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        warnings.warn("checkpoint holds CUDA RNG states but CUDA is unavailable; not restored", stacklevel=3)
        return
    if len(cuda) != torch.cuda.device_count():
        warnings.warn(
            f"checkpoint holds CUDA RNG states for {len(cuda)} devices, {torch.cuda.device_count()} visible; "
            "restoring the common ones",
            stacklevel=3,
        )
    for index, device_state in enumerate(cuda[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(device_state, index)


def _write_component(directory: Path, name: str, obj: Any) -> list[str]:
    """Writes ``name.json`` (+ ``name.safetensors`` if ``obj`` holds tensors); returns the file names."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        tree = _encode(obj, "", tensors, {}, set())
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None
    files = []
    if tensors:
        _write_tensors(directory / f"{name}.safetensors", tensors, {"format": "pt"})
        files.append(f"{name}.safetensors")
    _write_json(directory / f"{name}.json", tree)
    files.append(f"{name}.json")
    return files


def _read_component(path: Path, name: str, files: Mapping[str, int], device: str) -> Any:
    if f"{name}.json" not in files:
        return None
    tensors = {}
    if f"{name}.safetensors" in files:
        tensors = safetensors.torch.load_file(path / f"{name}.safetensors", device=device)
    tree = json.loads((path / f"{name}.json").read_text(encoding="utf-8"))
    return _decode(tree, tensors)


def _encode(obj: Any, where: str, tensors: dict, seen: dict[int, str], storages: set) -> Any:
    """JSON tree for ``obj``; tensors / arrays go into ``tensors`` under their path and are referenced.

    Tuples and dicts with non-string keys are tagged so that decoding gives back the same types
    (``random.setstate`` and optimizers' int-keyed state need them).
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return _encode(obj.item(), where, tensors, seen, storages)
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return {_TAG_TENSOR: seen[id(obj)]}
        key = _unique_key(where or "value", tensors)
        seen[id(obj)] = key
        ptr = (obj.device, obj.untyped_storage().data_ptr())
        t = obj.detach().cpu().contiguous()
        tensors[key] = t.clone() if ptr in storages and obj.numel() else t
        storages.add(ptr)
        return {_TAG_TENSOR: key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"cannot store the object numpy array at {where!r}; expected a numeric dtype")
        key = _unique_key(where or "value", tensors)
        tensors[key] = torch.from_numpy(np.array(obj, copy=True, order="C"))
        return {_TAG_NDARRAY: key}
    if isinstance(obj, tuple):
        return {_TAG_TUPLE: [_encode(v, _join(where, i), tensors, seen, storages) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(where, i), tensors, seen, storages) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not _TAGS.intersection(obj):
            return {k: _encode(v, _join(where, k), tensors, seen, storages) for k, v in obj.items()}
        return {
            _TAG_ITEMS: [
                [_encode_key(k, where), _encode(v, _join(where, k), tensors, seen, storages)]
                for k, v in obj.items()
            ]
        }
    raise TypeError(
        f"cannot store {type(obj).__name__} at {where!r} without pickle; expected tensors, numpy arrays, "
        "None, bool, int, float, str, and lists / tuples / dicts of them"
    )


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


def _encode_key(key: Any, where: str) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    if isinstance(key, np.generic):
        return key.item()
    if isinstance(key, tuple):
        return {_TAG_TUPLE: [_encode_key(k, where) for k in key]}
    raise TypeError(
        f"cannot store the {type(key).__name__} dict key in {where!r}; expected None, bool, int, float, str "
        "or tuples of them"
    )


def _unique_key(where: str, taken: Mapping[str, Any]) -> str:
    key, n = where, 1
    while key in taken:
        key, n = f"{where}#{n}", n + 1
    return key


def _decode(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) == 1:
        ((tag, value),) = tree.items()
        if tag == _TAG_TENSOR:
            return tensors[value]
        if tag == _TAG_NDARRAY:
            return tensors[value].cpu().numpy()
        if tag == _TAG_TUPLE:
            return tuple(_decode(v, tensors) for v in value)
        if tag == _TAG_ITEMS:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in tree.items()}


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    _fsync(path)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _write_latest(run_dir: Path, name: str) -> None:
    """Points ``run_dir/latest`` at ``name`` with one atomic replace."""
    tmp = run_dir / f".tmp-latest-{secrets.token_hex(4)}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST_FILE)
    _fsync(run_dir)


def _fsync(path: Path) -> None:
    """Flushes a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path, *, trash_prefix: str) -> None:
    """Moves ``src`` to ``dst``; an existing ``dst`` is first moved aside, then deleted."""
    trash = None
    if dst.exists():
        trash = dst.parent / f"{trash_prefix}-{secrets.token_hex(4)}"
        os.replace(dst, trash)
    os.replace(src, dst)
    _fsync(dst.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _remove_stale(run_dir: Path) -> None:
    """Deletes leftovers of killed saves, sparing a moved-aside folder that is still the latest."""
    keep = latest_checkpoint(run_dir)
    for entry in run_dir.iterdir():
        if _STALE_RE.match(entry.name) and entry != keep:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _read_meta(path: Path) -> dict[str, Any] | None:
    """The folder's ``meta.json`` if it describes a complete checkpoint of this format, else None."""
    try:
        meta = json.loads((path / _META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT_NAME
        and meta.get("version") == FORMAT_VERSION
        and isinstance(meta.get("step"), int)
        and isinstance(meta.get("files"), dict)
        and isinstance(meta.get("model"), dict)
        and meta["model"].get("weights") in ("full", "trainable")
        and isinstance(meta["model"].get("aliases"), dict)
        and _MODEL in meta["files"]
    ):
        return None
    for name, size in meta["files"].items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return meta


def _complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint in ``run_dir``, oldest first."""
    found = []
    for entry in run_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and entry.is_dir() and _read_meta(entry) is not None:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Deletes complete checkpoints older than the ``keep_last`` newest with a step <= ``step``.

    Checkpoints with a higher step (from a timeline abandoned by resuming an earlier checkpoint) are not
    touched. Each victim is renamed to a stale name first, so a kill mid-delete never leaves a
    half-deleted folder that looks like a checkpoint.
    """
    older = [path for s, path in _complete_checkpoints(run_dir) if s <= step]
    for path in older[: max(len(older) - keep_last, 0)]:
        trash = run_dir / f".trash-{path.name}-{secrets.token_hex(4)}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
