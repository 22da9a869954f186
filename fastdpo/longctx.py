"""Memory for long packed sequences: tiled MLPs and norms, and decoder-layer checkpoints kept in host memory.

At half a million tokens the decoder's memory is not the weights but what one layer holds for its backward:

* **Tiled rows** (:func:`tiled_rows`): a token-wise module (an MLP, an RMSNorm) runs over tiles of the
  sequence under ``no_grad`` and saves only its input; the backward recomputes it tile by tile and takes
  the input's and the trainable parameters' gradients with ``torch.autograd.grad``. The parameter gradients
  are summed over tiles and returned by the autograd node itself, so each parameter's ``AccumulateGrad``
  runs once per backward, which is what DDP's reducer and FSDP2's post-backward hooks expect (a tiled MLP
  that calls ``backward`` per tile makes them fire once a tile). The MLP's ``[N, intermediate]`` products
  and the norm's full-sequence fp32 copies then exist for one tile at a time.
* **Offloaded layer checkpoints** (:class:`LayerOffload`): under non-reentrant checkpointing the only
  tensor a decoder layer keeps for its backward is its input. That input goes to host memory (pinned, on
  CUDA, copied on a side stream) and comes back one layer ahead: when layer ``i`` is recomputed, layer
  ``i - 1``'s input starts its copy back on the side stream.

On the meta device (``fastdpo plan``) everything runs the same code, except that a tiled call skips the
tiles whose memory repeats an earlier one's; "host" copies are meta tensors made under
:func:`fastdpo.memtrack.host_allocation`, so the live-bytes tracker counts them as host memory.
"""

from __future__ import annotations

import logging
import math
import types
import weakref
from collections.abc import Callable, MutableMapping, Sequence
from contextlib import AbstractContextManager, ExitStack
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.checkpoint import checkpoint

from fastdpo.memtrack import host_allocation
from fastdpo.metarun import autocast_dtype, autocast_off, meta_autocast

logger = logging.getLogger(__name__)

__all__ = [
    "ALLOC_CONF",
    "LayerOffload",
    "auto_tile_tokens",
    "decoder_layers",
    "default_alloc_conf",
    "install_long_context",
    "save_on_host",
    "tiled_rows",
]

# The caching allocator's setting `fastdpo train` uses unless the user chose one: expandable segments grow
# one mapping instead of carving fixed blocks, so the varying sizes of long packed steps fragment far less.
ALLOC_CONF = "expandable_segments:True"
_ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def default_alloc_conf(environ: MutableMapping[str, str]) -> bool:
    """Sets ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` in ``environ`` unless the user set an
    allocator config (that variable or torch's newer ``PYTORCH_ALLOC_CONF``); returns whether it set it.

    Call before CUDA initializes: the allocator reads the variable once.
    """
    if any(environ.get(name) for name in _ALLOC_VARS):
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    return True


_TILE_QUANTUM = 64


def auto_tile_tokens(hidden_size: int, num_tokens: int) -> int:
    """Tokens a tile for ``tile_tokens: 0``: ``ceil(N / D)`` equal tiles of about ``hidden_size`` tokens.

    Each tile is rounded up to a multiple of 64 rows. This is ALST's rule (arXiv 2506.13996): a tile's MLP
    product ``[tile, intermediate]`` is then about the size of one MLP weight matrix, small beside the
    ``[N, D]`` hidden state, and a tile still fills a GPU.
    """
    tiles = max(1, math.ceil(num_tokens / max(1, hidden_size)))
    # Whole multiples of 64 rows keep the matmul's row blocks (8 on CPU, 64-128 on GPU) the same as untiled.
    return _TILE_QUANTUM * math.ceil(num_tokens / tiles / _TILE_QUANTUM)


def _autocast_states(device_type: str) -> list[tuple[str, torch.dtype | None]]:
    """The autocast dtype (None: off) in force per device type, for a backward to recompute under."""
    kinds = sorted({device_type, "cpu"})
    return [(k, autocast_dtype(k)) for k in kinds if k == "meta" or torch.amp.is_autocast_available(k)]


def _autocast(kind: str, dtype: torch.dtype | None) -> AbstractContextManager[None]:
    if kind == "meta":
        return meta_autocast(dtype) if dtype is not None else autocast_off(kind)
    return torch.autocast(kind, dtype=dtype, enabled=dtype is not None)


# A planned (meta) run computes only the first _PLANNED_TILES tiles and the last. A tile's allocations depend
# on its size and on what the loop carries from the tile before (the previous tile's output in forward, its
# parameter gradients in backward), and that carried state is the same from the third tile on, so the middle
# tiles repeat the third's memory exactly; running them made a tiled 8B plan 1.2M ops long
# (tests/test_longctx.py checks the peak against every tile run for real on CPU).
_PLANNED_TILES = 3


def _tile_starts(rows: int, tile: int, device: torch.device) -> list[int]:
    starts = list(range(0, rows, tile))
    if device.type == "meta" and len(starts) > _PLANNED_TILES + 1:
        return [*starts[:_PLANNED_TILES], starts[-1]]
    return starts


class _TiledRows(torch.autograd.Function):
    """``fn(x)`` computed over row tiles of ``x``; saves ``x`` only and recomputes each tile in backward."""

    @staticmethod
    def forward(ctx: Any, fn: Callable, tile: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.fn, ctx.tile, ctx.params = fn, tile, params
        ctx.autocast = _autocast_states(x.device.type)
        ctx.save_for_backward(x)
        rows = x.reshape(-1, x.shape[-1])
        out = None
        for start in _tile_starts(rows.shape[0], tile, x.device):
            y = fn(rows[start : start + tile])
            if out is None:
                out = y.new_empty((rows.shape[0], *y.shape[1:]))
            out[start : start + tile] = y
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        rows = x.reshape(-1, x.shape[-1])
        grads = grad_out.reshape(-1, grad_out.shape[-1])
        dx = torch.empty_like(rows) if need_x else None
        dparams: list[torch.Tensor | None] = [None] * len(ctx.params)
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())
            for kind, dtype in ctx.autocast:
                stack.enter_context(_autocast(kind, dtype))
            for start in _tile_starts(rows.shape[0], ctx.tile, x.device):
                xt = rows[start : start + ctx.tile].detach().requires_grad_(need_x)
                inputs = ([xt] if need_x else []) + [ctx.params[i] for i in wanted]
                got = torch.autograd.grad(
                    ctx.fn(xt), inputs, grads[start : start + ctx.tile], allow_unused=True
                )
                if need_x:
                    dx[start : start + ctx.tile] = got[0]
                    got = got[1:]
                for i, g in zip(wanted, got, strict=True):
                    if g is not None:
                        dparams[i] = g if dparams[i] is None else dparams[i].add_(g)
        for i in wanted:
            if dparams[i] is None:
                dparams[i] = torch.zeros_like(ctx.params[i])
        return None, None, (dx.view_as(x) if need_x else None), *dparams


def tiled_rows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    params: Sequence[torch.Tensor],
    tile_tokens: int,
) -> torch.Tensor:
    """Equals ``fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)`` for a row-wise ``fn``.

    ``fn`` must treat rows independently (an MLP, a norm over the last dim). Forward runs ``fn`` on
    ``tile_tokens`` rows at a time without building a graph; the backward recomputes each tile and returns
    the gradients of ``x`` and of ``params`` (the tensors ``fn`` reads that need gradients; parameter
    gradients are summed over tiles). Forward values and the input gradient are those of ``fn`` on each
    tile, so on CPU they usually match the untiled call bit for bit; parameter gradients differ by the
    rounding of a sum split into tiles.

    Args:
        fn: The row-wise function.
        x: ``[..., D]`` input.
        params: Tensors ``fn`` reads whose gradients are wanted (others may be left out).
        tile_tokens: Rows a tile; 0 picks :func:`auto_tile_tokens` from ``D`` and the row count.

    Returns:
        ``[..., D_out]``, as ``fn`` returns it.
    """
    if tile_tokens < 0:
        raise ValueError(f"tile_tokens: expected an int >= 0 (0: ALST's rule), got {tile_tokens}")
    n = x.numel() // max(1, x.shape[-1])
    tile = tile_tokens or auto_tile_tokens(x.shape[-1], n)
    return _TiledRows.apply(fn, max(1, tile), x, *params)


def _tiled_forward(
    module: nn.Module, x: torch.Tensor, *, forward: Callable, tile_tokens: int
) -> torch.Tensor:
    # The trainable parameters are read at each call: peft adds LoRA after install, and FSDP2 swaps in
    # unsharded parameters for the forward.
    params = [p for p in module.parameters() if p.requires_grad]
    return tiled_rows(partial(forward, module), x, params, tile_tokens)


def _stop_kernelizing(model: nn.Module) -> None:
    """Restores the torch forwards of layers transformers replaced with hub kernels and stops it doing so
    again (it would pop the tiled forwards at the next train/eval switch)."""
    for module in model.modules():
        if getattr(module, "use_kernels", False) and hasattr(module, "set_use_kernels"):
            logger.info(
                "long context: transformers' hub kernels off for %s (tiled modules)", type(module).__name__
            )
            module.set_use_kernels(False)


def _tile_module(module: nn.Module, tile_tokens: int) -> None:
    # The class's own forward: installing twice replaces the first install instead of nesting it.
    tiled = partial(_tiled_forward, forward=type(module).forward, tile_tokens=tile_tokens)
    module.forward = types.MethodType(tiled, module)


class _HostCopy:
    """One layer input kept in host memory, and its device copy once fetched back."""

    def __init__(self, host: torch.Tensor, device: torch.device, index: int) -> None:
        self.host, self.device, self.index = host, device, index
        self.prev: weakref.ref[_HostCopy] | None = None
        self.fetched: torch.Tensor | None = None
        self.ready: Any = None

    def fetch(self, stream: Any) -> None:
        """Starts the copy back (on ``stream`` on CUDA); no-op if it is already under way."""
        if self.fetched is not None:
            return
        if self.device.type == "cuda":
            dev = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            with torch.cuda.stream(stream):
                dev.copy_(self.host, non_blocking=True)
                self.ready = stream.record_event()
            # The device buffer was allocated on the compute stream and is written on the side stream.
            dev.record_stream(stream)
        else:
            dev = torch.empty_like(self.host)
            dev.copy_(self.host)
        self.fetched = dev

    def take(self, stream: Any) -> torch.Tensor:
        """The device copy, the compute stream made to wait for it."""
        self.fetch(stream)
        dev, self.fetched = self.fetched, None
        if self.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            self.ready = None
        return dev


class LayerOffload:
    """Saved-tensor hooks that keep each checkpointed decoder layer's input in host memory.

    ``checkpoint(index, function, *args)`` replaces a transformers layer's ``_gradient_checkpointing_func``:
    it runs ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` with hooks that catch what the
    checkpoint saves outside its region, the layer's input ``args[0]``, and move it to host memory. Other
    inputs (the rotary tables, the mask), shared by every layer, stay where they are. In the backward,
    unpacking layer ``i``'s input starts fetching layer ``i - 1``'s, so the copy overlaps layer ``i``'s
    recomputation and backward; at most one fetched input waits on the device.
    """

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}
        self._last: weakref.ref[_HostCopy] | None = None

    def _stream(self, device: torch.device) -> Any:
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cuda":
            stream = self._stream(t.device)
            with host_allocation():
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
            # Keeps the device block from reuse until the side stream's copy has read it.
            t.record_stream(stream)
            return host
        with host_allocation():
            host = torch.empty_like(t)
            host.copy_(t.detach())
        return host

    def _pack(self, index: int, layer_input: StorageWeakRef, t: torch.Tensor) -> Any:
        if StorageWeakRef(t.untyped_storage()) != layer_input:
            return t
        entry = _HostCopy(self._to_host(t), t.device, index)
        last = self._last() if self._last is not None else None
        if last is not None and last.index == index - 1:
            entry.prev = self._last
        self._last = weakref.ref(entry)
        return entry

    def _unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _HostCopy):
            return packed
        stream = self._stream(packed.device)
        dev = packed.take(stream)
        prev = packed.prev() if packed.prev is not None else None
        if prev is not None:
            prev.fetch(stream)
        return dev

    def checkpoint(self, index: int, function: Callable, *args: Any) -> Any:
        """``checkpoint(function, *args, use_reentrant=False)`` with ``args[0]`` saved in host memory."""
        if not args or not isinstance(args[0], torch.Tensor):
            return checkpoint(function, *args, use_reentrant=False)
        hooks = torch.autograd.graph.saved_tensors_hooks(
            partial(self._pack, index, StorageWeakRef(args[0].untyped_storage())), self._unpack
        )
        with hooks:
            return checkpoint(function, *args, use_reentrant=False)


def save_on_host(device: torch.device) -> AbstractContextManager[None]:
    """``torch.autograd.graph.save_on_cpu`` (pinned on CUDA): every tensor autograd saves goes to host memory.

    On the meta device, where ``save_on_cpu`` cannot copy, the "host" copies are meta tensors made under
    :func:`fastdpo.memtrack.host_allocation`, so a planned run counts them as host memory.
    """
    if device.type != "meta":
        return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")

    def pack(t: torch.Tensor) -> torch.Tensor:
        with host_allocation():
            host = torch.empty_like(t)
            host.copy_(t.detach())
        return host

    def unpack(host: torch.Tensor) -> torch.Tensor:
        return host.clone()

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (the first non-empty ``layers`` ModuleList)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def install_long_context(
    model: nn.Module,
    *,
    tiled_mlp: bool = False,
    lean_norms: bool = False,
    tile_tokens: int = 0,
    offload_checkpoints: bool = False,
) -> dict[str, int]:
    """Switches the memory mechanisms on in a transformers causal LM, in place; returns what was changed.

    * ``tiled_mlp``: every decoder layer's ``mlp`` (a module whose class name ends in ``MLP``) runs
      through :func:`tiled_rows`.
    * ``lean_norms``: every ``*RMSNorm`` module (the layers' norms, the final norm, Qwen3's q/k norms)
      runs through :func:`tiled_rows`: its fp32 upcast then lives for one tile, and only its input is
      saved.
    * ``offload_checkpoints``: each checkpointed decoder layer's ``_gradient_checkpointing_func`` becomes
      :meth:`LayerOffload.checkpoint`; call it after gradient checkpointing is enabled.

    Install before peft's ``get_peft_model`` or after it: the tiled modules call their own forward, and so
    their LoRA-wrapped projections, at each call. Tiling turns off transformers' hub-kernel replacement
    of layer forwards for the model (``from_pretrained``'s ``use_kernels``, on by default since
    transformers 5.25 when the ``kernels`` package is installed): it re-kernelizes at every change of
    train/eval mode, and that removes instance forwards, so the tiles would silently be gone after the
    first ``model.train()``.

    Raises:
        ValueError: ``offload_checkpoints`` on a model without gradient checkpointing enabled, or
            ``tile_tokens < 0``.
    """
    if tile_tokens < 0:
        raise ValueError(f"tile_tokens: expected an int >= 0 (0: ALST's rule), got {tile_tokens}")
    changed = {"mlp": 0, "norm": 0, "offloaded_layers": 0}
    layers = decoder_layers(model)
    if tiled_mlp or lean_norms:
        _stop_kernelizing(model)
    if tiled_mlp:
        for layer in layers:
            mlp = getattr(layer, "mlp", None)
            if isinstance(mlp, nn.Module) and type(mlp).__name__.endswith("MLP"):
                _tile_module(mlp, tile_tokens)
                changed["mlp"] += 1
    if lean_norms:
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                _tile_module(module, tile_tokens)
                changed["norm"] += 1
    if offload_checkpoints:
        offload = LayerOffload()
        for i, layer in enumerate(layers):
            if not getattr(layer, "gradient_checkpointing", False):
                raise ValueError(
                    "offload_checkpoints: expected gradient checkpointing enabled on the decoder layers "
                    "(gradient_checkpointing: true), got a layer without it"
                )
            layer._gradient_checkpointing_func = partial(offload.checkpoint, i)
            changed["offloaded_layers"] += 1
    return changed
