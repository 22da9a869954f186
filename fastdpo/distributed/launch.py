"""Data-parallel training on PyTorch's own stack: the process group, DDP / FSDP2 wrapping and their hooks.

Dimension letters: B pairs, N tokens, D hidden, V vocab.

A training step on ``world_size`` ranks, in a few lines::

    state = init_distributed()
    model = wrap_model(model, "fsdp2", state)              # or "ddp" / "none"
    plan = shard_bins(bin_tokens, state)                   # same length on every rank; -1 pads
    pairs = [bins[i].num_pairs if i >= 0 else 0 for i in plan]
    global_pairs = global_pair_count(sum(pairs))
    for k, index in enumerate(plan):
        batch = bins[max(index, 0)].to(state.device)
        with gradient_sync(model, enabled=k == len(plan) - 1):
            hidden = packed_hidden_states(unwrap_model(model), batch)
            with unsharded_lm_head(model) as (weight, bias):
                out = loss_fn(hidden, weight, batch.labels, bias, seq_index=batch.seq_index,
                              num_pairs=batch.num_pairs, ...)
            (out.loss * (pairs[k] * state.world_size / global_pairs)).backward()
    optimizer.step()

DDP and FSDP2 average gradients over ranks, so scaling each micro-batch's mean loss by
``local_pairs * world_size / global_pairs`` makes the update that of the mean over all pairs of the
step, as one process on the global batch would compute it. Metrics go through ``gather_metrics`` with
the local pair counts as weights.

The decoder runs directly (``packed_hidden_states`` calls ``model.get_decoder()``), not through the
wrapper's ``forward``, and the fused head reads the lm_head weight instead of calling lm_head.
``wrap_model`` therefore hooks the decoder so that a direct call counts as the wrapper's forward (DDP
prepares its gradient reducer; FSDP2 runs its root pre/post-forward, all-gathering the root unit that
holds the embeddings, final norm and lm_head) and ``unsharded_lm_head`` hands out the head's unsharded
parameters. FSDP2 keeps the root unit unsharded from the forward until its post-backward, which
reduce-scatters the head's gradient into the sharded parameter and frees the full weight.

Collectives and their failure messages live in ``fastdpo.distributed.collectives``.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fastdpo.distributed.collectives import DEFAULT_TIMEOUT_S, is_distributed, set_timeout
from fastdpo.modeling import lm_head_params

__all__ = [
    "STRATEGIES",
    "DistState",
    "gradient_sync",
    "init_distributed",
    "unsharded_lm_head",
    "unwrap_model",
    "wrap_model",
]

STRATEGIES = ("none", "ddp", "fsdp2")

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistState:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, ``0..world_size-1``.
        world_size: number of processes (1 when not launched by torchrun).
        local_rank: rank on this node; the CUDA device index.
        device: the device this rank computes on (``cuda:<local_rank>`` or ``cpu``).
        is_main: ``rank == 0``: the rank that logs and writes shared files.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(*, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> DistState:
    """Joins the torchrun job described by the environment, or describes a single process.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. With none of
    the first three set, this is a single process (no process group) on ``cuda:0`` if CUDA is available,
    else the CPU. Otherwise it initializes the default process group (NCCL on CUDA, gloo on CPU) with
    ``timeout_s``, and on CUDA makes ``cuda:<LOCAL_RANK>`` the current device. An already initialized
    process group is reused as it is.

    Args:
        timeout_s: seconds a collective may wait for its peers before it fails (and init for rendezvous).
        backend: process-group backend overriding the default (e.g. ``"gloo"``).

    Returns:
        This process's ``DistState``.

    Raises:
        ValueError: the torchrun variables are only partly set, not integers, or inconsistent, or
            ``LOCAL_RANK`` names a CUDA device that does not exist.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    present = [name for name in _TORCHRUN_ENV if os.environ.get(name)]
    if not any(name in present for name in _TORCHRUN_ENV[:3]) and not is_distributed():
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistState(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
    if is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in present else rank
    else:
        missing = [name for name in _TORCHRUN_ENV if name not in present]
        if missing:
            raise ValueError(
                f"torchrun environment is incomplete: {missing} unset while {present} are set; launch with "
                "torchrun, set all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, or none"
            )
        rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
        if world < 1 or not 0 <= rank < world or local_rank < 0:
            raise ValueError(
                f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}"
            )
    if is_distributed():
        chosen = dist.get_backend()
    else:
        chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    use_cuda = torch.cuda.is_available() and chosen != "gloo"
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not is_distributed():
        dist.init_process_group(
            backend=chosen,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
        set_timeout(timeout_s)
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=device, is_main=rank == 0)


# --------------------------------------------------------------------------------------------------
# Wrapping
# --------------------------------------------------------------------------------------------------


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP and peft wrappers."""
    model = unwrap_model(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _decoder(model: nn.Module) -> nn.Module:
    base = _base_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    if get_decoder is None:
        raise TypeError(f"expected a transformers causal LM with get_decoder(), got {type(base).__name__}")
    return get_decoder()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of the ``_no_split_modules`` classes, else ``decoder.layers``."""
    base = _base_model(model)
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        layers = list(getattr(_decoder(model), "layers", ()))
    if not layers:
        raise TypeError(f"cannot find the decoder layers of {type(base).__name__} to shard one by one")
    return layers


class _DecoderForwardScope:
    """Makes a direct decoder call count as a forward of the wrapper (DDP, or the FSDP2 root).

    The hooks run the wrapper's own pre/post-forward around the decoder call, as torch's composable
    ``replicate`` and ``register_fsdp_forward_method`` do, and stand aside while the wrapper's forward is
    already running (a plain ``model(...)`` call).
    """

    def __init__(self, outer: nn.Module, decoder: nn.Module, enter: Any, leave: Any) -> None:
        self._enter, self._leave = enter, leave
        self._outer_depth = 0
        self._active = False
        outer.register_forward_pre_hook(self._outer_pre)
        outer.register_forward_hook(self._outer_post, always_call=True)
        decoder.register_forward_pre_hook(self._pre, with_kwargs=True)
        decoder.register_forward_hook(self._post, always_call=True)

    def _outer_pre(self, module: nn.Module, args: Any) -> None:
        self._outer_depth += 1

    def _outer_post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._outer_depth -= 1

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._outer_depth or self._active:
            return None
        self._active = True
        return self._enter(args, kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if not self._active or self._outer_depth:
            return None
        self._active = False
        # ``always_call`` runs this with no output when the forward raised; the wrapper's post-forward
        # must not run on a half-done forward.
        return None if output is None else self._leave(args, output)


def wrap_model(
    model: nn.Module,
    strategy: str,
    state: DistState,
    *,
    param_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Wraps ``model`` for data parallelism on ``state.device``.

    * ``"none"``: the model itself, moved to the device.
    * ``"ddp"``: ``DistributedDataParallel`` of the model moved to the device, without re-broadcasting
      buffers before each forward.
    * ``"fsdp2"``: ``fully_shard`` on each decoder layer, then on the root, whose unit holds what is left:
      embeddings, final norm and lm_head, so tied embeddings share one unit. ``fully_shard`` moves one
      unit at a time to the device and shards it there, so the whole model never sits on one device.
      The root unit stays unsharded from the forward until its post-backward (FSDP2's rule for the
      root), which is when the fused head reads the lm_head weight.

    For ``"ddp"`` and ``"fsdp2"`` a direct call of the decoder (``packed_hidden_states``) runs the
    wrapper's forward logic, see the module docstring.

    Args:
        model: a transformers causal LM (``get_decoder()``, decoder layers in ``_no_split_modules``).
        strategy: one of ``STRATEGIES``.
        state: from :func:`init_distributed`.
        param_dtype: FSDP2 mixed precision: parameters are all-gathered and computed in this dtype
            (e.g. ``torch.bfloat16`` on GPU) while sharded master weights and gradient reduction stay fp32.
        reshard_after_forward: FSDP2: free each layer's gathered parameters after its forward (gathering
            them again for backward), trading communication for memory.

    Returns:
        The wrapped model (for FSDP2 the same object, its class swapped by ``fully_shard``).

    Raises:
        ValueError: unknown strategy, no process group for ``"ddp"`` / ``"fsdp2"``, or ``param_dtype``
            without FSDP2.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(state, DistState):
        raise TypeError(f"state must be a DistState from init_distributed(), got {type(state).__name__}")
    if param_dtype is not None and strategy != "fsdp2":
        raise ValueError(
            f"param_dtype is FSDP2 mixed precision; use torch.autocast with strategy {strategy!r}"
        )
    if strategy != "none" and not is_distributed():
        raise ValueError(
            f"strategy {strategy!r} needs a process group: launch with torchrun and call init_distributed(), "
            "or use strategy 'none' for a single process"
        )
    decoder = _decoder(model)
    if strategy != "fsdp2":
        model = model.to(state.device)
    if strategy == "none":
        return model
    if strategy == "ddp":
        # A causal LM's buffers are rotary tables computed from the config: no need to re-broadcast them
        # before every forward (newer torch spells the switch forward_sync_buffers).
        no_buffer_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False}
        )
        ddp = DistributedDataParallel(
            model, device_ids=[state.local_rank] if state.device.type == "cuda" else None, **no_buffer_sync
        )
        _DecoderForwardScope(
            ddp,
            decoder,
            lambda args, kwargs: ddp._pre_forward(*args, **kwargs),
            lambda args, out: ddp._post_forward(out),
        )
        return ddp
    mesh = init_device_mesh(state.device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
    )
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    root = model._get_fsdp_state()
    _DecoderForwardScope(
        model,
        decoder,
        lambda args, kwargs: root._pre_forward(model, args, kwargs),
        lambda args, out: root._post_forward(model, args, out),
    )
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module to call ``packed_hidden_states`` / ``lm_head_params`` / ``save_pretrained`` on.

    DDP's inner module; an FSDP2 model is sharded in place and is returned as is.
    """
    return model.module if isinstance(model, DistributedDataParallel) else model


def _head_owner(model: nn.Module) -> FSDPModule | None:
    """The FSDP2 module whose unit manages the lm_head weight, or None without FSDP2."""
    base = unwrap_model(model)
    head = _base_model(model).get_output_embeddings()
    owner = None
    for module in base.modules():
        if isinstance(module, FSDPModule) and any(m is head for m in module.modules()):
            owner = module  # modules() is pre-order, so the last hit is the innermost unit
    return owner


@contextmanager
def unsharded_lm_head(model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yields ``(weight [V, D], bias [V] or None)`` of the lm_head, whole, for the fused head.

    Without FSDP2 (``"none"``, ``"ddp"``) this is ``lm_head_params``. Under FSDP2, after the step's
    decoder forward the root unit is already unsharded (see :func:`wrap_model`): the yielded tensors are
    its unsharded parameters, gradients computed from them are reduce-scattered into the sharded
    parameters by FSDP2's post-backward, which also frees them. Without a preceding forward and with
    gradients off (e.g. scoring with a previously computed hidden), the unit is all-gathered on entry
    and freed again on exit; every rank must then enter together.

    Args:
        model: the model returned by :func:`wrap_model`.

    Yields:
        The lm_head weight and bias (None when the head has no bias).

    Raises:
        RuntimeError: under FSDP2 with gradients enabled and no decoder forward before: nothing would
            reduce the head's gradient.
    """
    owner = _head_owner(model)
    weight, bias = lm_head_params(unwrap_model(model))
    if owner is None or not isinstance(weight, DTensor):
        yield weight, bias
        return
    if torch.is_grad_enabled() and weight.requires_grad:
        raise RuntimeError(
            "under FSDP2 run the step's decoder forward (packed_hidden_states) before unsharded_lm_head: the "
            "lm_head's unit is gathered by that forward, and only then is its gradient reduce-scattered"
        )
    owner.unshard()
    try:
        yield lm_head_params(unwrap_model(model))
    finally:
        owner.reshard()


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Turns gradient synchronization off for accumulation micro-batches that are not the step's last.

    Enter around the forward and backward of a micro-batch: DDP's ``no_sync`` or FSDP2's
    ``set_requires_gradient_sync(False)``; gradients then accumulate locally until a micro-batch runs
    with ``enabled=True``. A no-op for ``enabled=True`` and for unwrapped models.

    Args:
        model: the model returned by :func:`wrap_model`.
        enabled: whether this micro-batch's backward synchronizes gradients.
    """
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
