"""Live-bytes tracking: the peak memory of tensors a piece of code holds, on meta tensors and real ones alike.

:class:`LiveBytes` is a ``TorchDispatchMode``: every op's output storage that is new (not a view of a storage
already seen, not a parameter or buffer of the models given) is recorded with its size and where it was made
(phase, region, layer, op), and dropped when the storage is freed. The sum of the live ones after each op is
the step's memory as the caching allocator sees it, less the allocator's own rounding and fragmentation. On
the meta device nothing is allocated, so a whole 8B training step is measured in seconds on a CPU.

Allocations made under :func:`host_allocation` count as host memory (offloaded activations): on a meta run
they stay on the meta device, so the tracker cannot tell them apart by device.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["Allocation", "LiveBytes", "current_tracker", "host_allocation", "label"]

_state = threading.local()
_PURGE_EVERY = 64  # ops between two purges when no peak is near


@dataclass
class Allocation:
    """One live storage: its bytes and where it was made."""

    ref: StorageWeakRef
    nbytes: int
    host: bool
    phase: str
    region: str
    layer: int | None
    op: str


@dataclass
class _Where:
    phase: str = "setup"
    region: str = "other"
    layer: int | None = None


@dataclass
class Peak:
    """The live allocations at the moment device memory peaked."""

    bytes: int = 0
    op: str = ""
    where: _Where = field(default_factory=_Where)
    live: list[Allocation] = field(default_factory=list)


def current_tracker() -> LiveBytes | None:
    """The :class:`LiveBytes` active on this thread, if any."""
    return getattr(_state, "tracker", None)


@contextlib.contextmanager
def host_allocation() -> Iterator[None]:
    """Allocations inside count as host memory in an active :class:`LiveBytes` (a no-op without one)."""
    previous = getattr(_state, "host", False)
    _state.host = True
    try:
        yield
    finally:
        _state.host = previous


@contextlib.contextmanager
def label(*, phase: str | None = None, region: str | None = None, layer: int | None = -1) -> Iterator[None]:
    """Tags allocations inside with a phase, region or layer (``layer=-1`` keeps the current one)."""
    tracker = current_tracker()
    if tracker is None:
        yield
        return
    before = tracker.where
    tracker.where = _Where(
        phase if phase is not None else before.phase,
        region if region is not None else before.region,
        before.layer if layer == -1 else layer,
    )
    try:
        yield
    finally:
        tracker.where = before


class LiveBytes(TorchDispatchMode):
    """Tracks the live bytes of new storages made by ops run under it; ``peak`` is the device peak.

    Args:
        exclude: Tensors whose storages are not new memory (the models' parameters and buffers).
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._known = {StorageWeakRef(t.untyped_storage()) for t in exclude}
        self._live: dict[StorageWeakRef, Allocation] = {}
        # Allocations that outlive the tracked code (optimizer state): counted, never checked for expiry.
        self._pinned: dict[StorageWeakRef, Allocation] = {}
        self._ops = 0
        self.device_bytes = 0
        self.host_bytes = 0
        self.host_peak = 0
        self.peak = Peak()
        self.where = _Where()

    def __enter__(self) -> LiveBytes:
        _state.tracker = self
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        _state.tracker = None
        super().__exit__(*exc)

    def _purge(self) -> None:
        for ref in [r for r in self._live if r.expired()]:
            alloc = self._live.pop(ref)
            if alloc.host:
                self.host_bytes -= alloc.nbytes
            else:
                self.device_bytes -= alloc.nbytes

    def _record(self, out: object, op: str) -> None:
        host = getattr(_state, "host", False)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref in self._live or ref in self._known or ref in self._pinned:
                continue
            w = self.where
            alloc = Allocation(ref, storage.nbytes(), host, w.phase, w.region, w.layer, op)
            self._live[ref] = alloc
            if host:
                self.host_bytes += alloc.nbytes
            else:
                self.device_bytes += alloc.nbytes
        # The byte counts only miss frees since the last purge, so they bound the live bytes from above:
        # a purge (a check of every live storage, the tracker's cost) is needed only when a bound passes
        # its peak, and now and then to keep the table small.
        self._ops += 1
        bound_passed = self.device_bytes > self.peak.bytes or self.host_bytes > self.host_peak
        if not bound_passed and self._ops % _PURGE_EVERY:
            return
        self._purge()
        self.host_peak = max(self.host_peak, self.host_bytes)
        if self.device_bytes > self.peak.bytes:
            live = [a for a in (*self._pinned.values(), *self._live.values()) if not a.host]
            self.peak = Peak(self.device_bytes, op, _Where(**vars(self.where)), live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self._record(out, str(func.overloadpacket.__name__))
        return out

    def pin(self, tensors: Iterable[torch.Tensor]) -> None:
        """Marks tracked storages of ``tensors`` as living through the tracked code: still counted, but no
        longer checked for expiry. Without it the optimizer's state, thousands of LoRA tensors, would be
        checked after every op."""
        for t in tensors:
            ref = StorageWeakRef(t.untyped_storage())
            if ref in self._live:
                self._pinned[ref] = self._live.pop(ref)

    def live(self) -> list[Allocation]:
        """The allocations alive now."""
        self._purge()
        return [*self._pinned.values(), *self._live.values()]
