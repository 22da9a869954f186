"""Pickle-free state trees: optimizer, scheduler, RNG and data states as JSON plus safetensors.

A component ``name`` is written as ``name.json`` and, only if it holds tensors or numpy arrays,
``name.safetensors``: the JSON tree references each tensor by its key there. Tuples and dicts with
non-string keys are tagged so that decoding gives back the same types (``random.setstate`` and
optimizers' int-keyed state need them). Anything else is refused at save time rather than pickled.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastdpo.checkpoint import io

__all__ = ["read_component", "rng_state", "set_rng_state", "write_component"]

_TAG_TENSOR = "__tensor__"
_TAG_NDARRAY = "__ndarray__"
_TAG_TUPLE = "__tuple__"
_TAG_ITEMS = "__items__"
_TAGS = frozenset({_TAG_TENSOR, _TAG_NDARRAY, _TAG_TUPLE, _TAG_ITEMS})


def rng_state() -> dict[str, Any]:
    """The global RNG states: python ``random``, numpy's global generator, torch CPU and every CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores ``rng_state()``'s result; CUDA states only for the devices visible now."""
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


def write_component(directory: Path, name: str, obj: Any) -> list[str]:
    """Writes ``name.json`` (+ ``name.safetensors`` if ``obj`` holds tensors); returns the file names."""
    tensors: dict[str, torch.Tensor] = {}
    try:
        tree = _encode(obj, "", tensors, {}, set())
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from None
    files = []
    if tensors:
        io.write_tensors(directory / f"{name}.safetensors", tensors, {"format": "pt"})
        files.append(f"{name}.safetensors")
    io.write_json(directory / f"{name}.json", tree)
    files.append(f"{name}.json")
    return files


def read_component(path: Path, name: str, files: Mapping[str, Any], device: str) -> Any:
    """The object ``write_component`` stored as ``name`` in the checkpoint ``path``, or None if absent."""
    if f"{name}.json" not in files:
        return None
    tensors = {}
    if f"{name}.safetensors" in files:
        tensors = io.load_tensors(path / f"{name}.safetensors", device)
    tree = io.read_json(path / f"{name}.json")
    try:
        return _decode(tree, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise io.CheckpointError(f"{name}.json does not decode ({type(err).__name__}: {err})") from None


def _encode(obj: Any, where: str, tensors: dict, seen: dict[int, str], storages: set) -> Any:
    """JSON tree for ``obj``; tensors / arrays go into ``tensors`` under their path and are referenced."""
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
