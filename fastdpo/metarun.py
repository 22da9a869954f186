"""Autocast on the meta device, where torch has none, so that a planned step runs in the dtypes it runs in.

``torch.autocast`` works per device type and knows no ``meta``: under it, meta tensors would keep their
dtypes, and a bf16 step would be planned as an fp32 one. :func:`meta_autocast` stands in for it above
autograd (a ``TorchFunctionMode``, so the casts are recorded for backward as autocast's are): the ops
autocast runs in the lower precision (matmuls, linear layers, attention) get their floating inputs cast to
its dtype, those it runs in fp32 (softmax, log-softmax, layer norm) get theirs cast up, and casts of leaf
tensors that require grad are cached for the context, as autocast caches weight casts.

:func:`plan_for` names the device type a meta run stands for, so that fake implementations allocate what
that device's kernels allocate (:func:`planning_for` reads it).

A meta tensor has no values; where the planned code must read some (which tokens carry a label), the
tensor it was made from can be kept beside it: :func:`remember_values` / :func:`host_values`.

:func:`autocast_dtype` answers "is autocast on for this tensor's device, and in which dtype?" for real
devices and for meta alike; fastdpo's code asks it instead of ``torch.is_autocast_enabled``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

__all__ = [
    "autocast_dtype",
    "autocast_off",
    "device_type",
    "host_values",
    "meta_autocast",
    "plan_for",
    "planning_for",
    "remember_values",
]

_state = threading.local()
_LOWER = {
    F.linear,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.Tensor.mm,
    F.scaled_dot_product_attention,
}
_FP32 = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, F.layer_norm, torch.Tensor.softmax}
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype in force for ``device``'s type (meta: :func:`meta_autocast`'s), or None if off."""
    kind = torch.device(device).type
    if kind == "meta":
        return getattr(_state, "dtype", None)
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class _MetaAutocast(TorchFunctionMode):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cast(self, value: object, dtype: torch.dtype) -> object:
        if not (isinstance(value, torch.Tensor) and value.is_meta and value.dtype in _CASTABLE):
            return value
        if value.dtype == dtype:
            return value
        if value.is_leaf and value.requires_grad:
            hit = self.cache.get(id(value))
            if hit is None or hit[0] is not value:
                hit = self.cache[id(value)] = (value, value.to(dtype))
            return hit[1]
        return value.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if getattr(_state, "dtype", None) is not None and (func in _LOWER or func in _FP32):
            dtype = self.dtype if func in _LOWER else torch.float32
            args, kwargs = tree_map(lambda v: self._cast(v, dtype), (args, kwargs))
        return func(*args, **kwargs)


@contextmanager
def autocast_off(device: torch.device | str) -> Iterator[None]:
    """``torch.autocast(device_type, enabled=False)``, which also suspends :func:`meta_autocast` on meta."""
    kind = torch.device(device).type
    if kind != "meta":
        with torch.autocast(kind, enabled=False):
            yield
        return
    previous = getattr(_state, "dtype", None)
    _state.dtype = None
    try:
        yield
    finally:
        _state.dtype = previous


@contextmanager
def meta_autocast(dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast(dtype=dtype)`` for meta tensors (other tensors are left alone)."""
    previous = getattr(_state, "dtype", None)
    _state.dtype = dtype
    try:
        with _MetaAutocast(dtype):
            yield
    finally:
        _state.dtype = previous


def device_type(device: torch.device | str) -> str:
    """``device``'s type, or for a meta device under :func:`plan_for` the type planned for."""
    kind = torch.device(device).type
    return (planning_for() or kind) if kind == "meta" else kind


def planning_for() -> str | None:
    """The device type a meta run plans for (``"cuda"`` or ``"cpu"``), or None outside :func:`plan_for`."""
    return getattr(_state, "target", None)


@contextmanager
def plan_for(device_type: str) -> Iterator[None]:
    """Meta tensors made inside stand for tensors on a ``device_type`` device.

    Inside, ``nonzero`` on meta assumes every element is nonzero (torch's opt-in upper bound): the few
    data-dependent index sets of the head's folds are then planned at their largest.
    """
    from torch.fx.experimental import _config as fx_config

    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"plan_for: expected 'cuda' or 'cpu', got {device_type!r}")
    previous = planning_for()
    _state.target = device_type
    try:
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            yield
    finally:
        _state.target = previous


_VALUES: dict[int, torch.Tensor] = {}


def remember_values(meta: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Keeps ``values``, a real tensor of ``meta``'s shape, as the values of ``meta`` while it lives."""
    if not meta.is_meta or values.shape != meta.shape:
        raise ValueError(
            f"remember_values: expected a meta tensor and values of its shape {tuple(meta.shape)}"
        )
    key = id(meta)
    _VALUES[key] = values
    weakref.finalize(meta, _VALUES.pop, key, None)
    return meta


def host_values(t: torch.Tensor) -> torch.Tensor | None:
    """The values :func:`remember_values` kept for meta tensor ``t``, or None."""
    return _VALUES.get(id(t)) if t.is_meta else None
