"""Data-parallel training on PyTorch's own stack: process group, DDP / FSDP2, bins per rank, metrics, DCP.

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

Collectives fail instead of hanging: the process group has a timeout (gloo and NCCL raise once it
expires; NCCL's watchdog tears the process down under PyTorch's default ``TORCH_NCCL_ASYNC_ERROR_HANDLING``),
and a peer that exits closes its connections, which fails pending collectives at once. The helpers here
re-raise such failures naming the rank and the likely cause.

Sharded checkpoints use ``torch.distributed.checkpoint`` (DCP) for the model and optimizer tensors, so
every rank writes only its shards; everything else is JSON. A checkpoint is the folder
``run_dir/sharded-{step:08d}`` (next to, and distinct from, ``fastdpo.checkpoint``'s ``checkpoint-*``
folders), written under ``run_dir/.tmp-sharded-{step:08d}`` and renamed by rank 0 after every rank has
finished; ``run_dir/latest-sharded`` names the newest one. All ranks must see the same ``run_dir``.
"""

from __future__ import annotations

import copy
import datetime
import inspect
import json
import math
import os
import shutil
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from fastdpo.modeling import lm_head_params
from fastdpo.packing import balance_bins

__all__ = [
    "STRATEGIES",
    "DistState",
    "all_reduce_sum",
    "consolidate",
    "gather_metrics",
    "global_pair_count",
    "gradient_sync",
    "init_distributed",
    "latest_sharded",
    "load_sharded",
    "save_sharded",
    "shard_bins",
    "unsharded_lm_head",
    "unwrap_model",
    "wrap_model",
]

STRATEGIES = ("none", "ddp", "fsdp2")
DEFAULT_TIMEOUT_S = 1800.0

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SHARDED_PREFIX = "sharded-"
_LATEST = "latest-sharded"
_META = "fastdpo-sharded.json"
_FORMAT = "fastdpo-sharded-checkpoint"
_FORMAT_VERSION = 1
_timeout_s = DEFAULT_TIMEOUT_S


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


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
    global _timeout_s
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    present = [name for name in _TORCHRUN_ENV if os.environ.get(name)]
    if not any(name in present for name in _TORCHRUN_ENV[:3]) and not _distributed():
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistState(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
    if _distributed():
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
    if _distributed():
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
    if not _distributed():
        dist.init_process_group(
            backend=chosen,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if use_cuda else None,
        )
        _timeout_s = float(timeout_s)
    return DistState(rank=rank, world_size=world, local_rank=local_rank, device=device, is_main=rank == 0)


@contextmanager
def _collective(what: str) -> Iterator[None]:
    """Re-raises a failed collective with the rank, the timeout and the likely cause."""
    try:
        yield
    except RuntimeError as err:
        rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        raise RuntimeError(
            f"{what} failed on rank {rank} of {world}: another rank probably crashed, was killed or stalled "
            f"past the {_timeout_s:g} s process-group timeout ({type(err).__name__}: {err})"
        ) from err


def _comm_device() -> torch.device:
    """The device collectives of the default group take tensors on (CUDA for NCCL)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    if strategy != "none" and not _distributed():
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


# --------------------------------------------------------------------------------------------------
# Reductions and the bin plan
# --------------------------------------------------------------------------------------------------


def all_reduce_sum(x: torch.Tensor | float | int) -> torch.Tensor | float | int:
    """Equals ``sum(x over ranks)`` (``x`` itself without a process group), as a new tensor or a number.

    Args:
        x: a tensor (any shape, same on every rank) or a Python int / float.

    Returns:
        The elementwise sum, of ``x``'s type (an int stays an int).
    """
    if isinstance(x, bool) or not isinstance(x, torch.Tensor | int | float):
        raise TypeError(f"all_reduce_sum takes a tensor, int or float, got {type(x).__name__}")
    if isinstance(x, torch.Tensor):
        if not _distributed():
            return x.clone()
        buf = x.detach().to(_comm_device(), copy=True)
        with _collective("all_reduce_sum"):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(x.device)
    if not _distributed():
        return x
    dtype = torch.int64 if isinstance(x, int) else torch.float64
    total = all_reduce_sum(torch.tensor(x, dtype=dtype))
    return int(total) if isinstance(x, int) else float(total)


def global_pair_count(n_local: int) -> int:
    """Equals the number of pairs over all ranks: ``sum(n_local over ranks)``.

    Scale each rank's mean loss by ``n_local * world_size / global_pair_count(n_local)`` before backward
    so that DDP's and FSDP2's gradient averaging yields the gradient of the mean over all pairs.

    Args:
        n_local: pairs this rank contributes to the step (0 for a padding step).
    """
    if isinstance(n_local, bool) or not isinstance(n_local, int | np.integer) or n_local < 0:
        raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
    return int(all_reduce_sum(int(n_local)))


def gather_metrics(
    metrics: Mapping[str, float | torch.Tensor], weights: float | Mapping[str, float]
) -> dict[str, float]:
    """Equals ``sum_r(w_r * m_r) / sum_r(w_r)`` per metric: the global mean one process would log.

    Metrics that are means over the local pairs (TRL's ``rewards/*``, ``logps/*``) weighted by the local
    pair count give the mean over all pairs of the step. A rank with weight 0 (a padding step) does not
    count, even if its metric is NaN; a metric whose weights are 0 on every rank comes back NaN.

    Args:
        metrics: name -> scalar (float or one-element tensor); the same names on every rank.
        weights: one weight for every metric (e.g. the local pair count), or name -> weight.

    Returns:
        name -> global weighted mean, the same on every rank.

    Raises:
        ValueError: ranks pass different metric names, a weight is negative or missing.
    """
    names = sorted(metrics)
    if isinstance(weights, Mapping):
        missing = [k for k in names if k not in weights]
        if missing:
            raise ValueError(f"weights has no entry for metrics {missing}")
        w = [float(weights[k]) for k in names]
    else:
        w = [float(weights)] * len(names)
    if any(not x >= 0 for x in w):
        raise ValueError(f"metric weights must be >= 0, got {dict(zip(names, w, strict=True))}")
    values = [float(metrics[k]) for k in names]
    if _distributed():
        fingerprint = zlib.crc32("\0".join(names).encode())
        # One MAX over (count, fingerprint) and their negations tells every rank whether all agree.
        agree = torch.tensor(
            [len(names), fingerprint, -len(names), -fingerprint], dtype=torch.float64, device=_comm_device()
        )
        with _collective("gather_metrics"):
            dist.all_reduce(agree, op=dist.ReduceOp.MAX)
        count, crc, neg_count, neg_crc = agree.tolist()
        if count != -neg_count or crc != -neg_crc:
            raise ValueError(f"ranks pass different metric names to gather_metrics; this rank has {names}")
    stacked = torch.tensor(
        [0.0 if wi == 0 else wi * v for wi, v in zip(w, values, strict=True)] + w, dtype=torch.float64
    )
    totals = all_reduce_sum(stacked).tolist()
    n = len(names)
    return {k: (totals[i] / totals[n + i] if totals[n + i] > 0 else math.nan) for i, k in enumerate(names)}


def shard_bins(bin_tokens: Sequence[int] | np.ndarray, state: DistState) -> np.ndarray:
    """Equals this rank's bins under LPT over ranks, padded with -1 to the same count on every rank.

    ``fastdpo.packing.balance_bins`` gives each bin to the least-loaded rank, largest bin first, so token
    counts are balanced. Each rank's bins come largest first (ties by index), so the k-th micro-batches of
    all ranks are of similar size. FSDP2 gathers parameters in every micro-batch, so every rank must run the
    same number of them: a ``-1`` entry is a padding step. Run it as a normal step on any bin (e.g. the
    rank's first, or bin 0) with its loss multiplied by 0, a pair count of 0 in ``global_pair_count`` and
    a weight of 0 in ``gather_metrics``: its collectives match the other ranks' and it changes nothing.

    Args:
        bin_tokens: ``[m]`` token count per bin, identical on every rank.
        state: from :func:`init_distributed`.

    Returns:
        int64 ``[k]`` bin indices for this rank, ``k = max bins per rank``, -1 for padding (at the end).
    """
    tokens = np.asarray(bin_tokens)
    groups = balance_bins(tokens, state.world_size)
    tokens = tokens.astype(np.int64)
    counts = np.bincount(groups, minlength=state.world_size)
    mine = np.flatnonzero(groups == state.rank)
    mine = mine[np.argsort(-tokens[mine], kind="stable")]
    pad = int(counts.max()) - mine.size
    return np.concatenate([mine, np.full(pad, -1, dtype=np.int64)]).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints (DCP)
# --------------------------------------------------------------------------------------------------


def _all_ok(ok: bool, what: str) -> bool:
    """Whether ``ok`` holds on every rank; every rank learns the same answer."""
    if not _distributed():
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=_comm_device())
    with _collective(what):
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


@contextmanager
def _single_process_dcp() -> Iterator[None]:
    """Silences DCP's warning that it runs in one process, where that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*assuming the intent is to (load|save) in a single process"
        )
        yield


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _check_json(name: str, value: Any) -> None:
    try:
        json.dumps(value, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be JSON-serializable (dicts, lists, str, numbers, bool, None): {err}"
        ) from None


def _split_optimizer(optim_sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Splits an FQN-keyed optimizer state dict into its tensors (for DCP) and everything else (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for fqn, entries in optim_sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}/{key}"] = value
            else:
                plain.setdefault(fqn, {})[key] = value
    rest = {"state": plain, "param_groups": list(optim_sd["param_groups"])}
    _check_json("the optimizer's non-tensor state", rest)
    return tensors, rest


def _join_optimizer(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {fqn: dict(entries) for fqn, entries in rest["state"].items()}
    for name, value in tensors.items():
        fqn, key = name.rsplit("/", 1)
        state.setdefault(fqn, {})[key] = value
    return {"state": state, "param_groups": [dict(g) for g in rest["param_groups"]]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return tensors


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sharded_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    found = []
    for path in run_dir.glob(f"{_SHARDED_PREFIX}*"):
        suffix = path.name[len(_SHARDED_PREFIX) :]
        if suffix.isdigit() and (path / _META).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def latest_sharded(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete sharded checkpoint under ``run_dir`` (named by ``latest-sharded``), or None."""
    run_dir = Path(run_dir)
    pointer = run_dir / _LATEST
    if pointer.is_file():
        path = run_dir / pointer.read_text().strip()
        if (path / _META).is_file():
            return path
    found = _sharded_dirs(run_dir)
    return found[-1][1] if found else None


def save_sharded(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    keep_last: int | None = 2,
) -> Path:
    """Atomically writes ``run_dir/sharded-{step:08d}``; every rank calls it, each writes its own shards.

    Holds the model's and optimizer's tensors in DCP format (FSDP2 shards stay sharded; DDP replicas are
    written once), the optimizer's other state and ``extra`` as JSON, and each rank's torch RNG state. All
    ranks write into ``run_dir/.tmp-sharded-{step:08d}``; after a barrier rank 0 adds the metadata file,
    renames the folder into place, points ``run_dir/latest-sharded`` at it and prunes older ones. A crash at
    any point leaves the previous checkpoint and pointer valid.

    Args:
        run_dir: folder of the run, visible to every rank (a shared filesystem across nodes).
        step: optimizer steps taken (>= 0).
        model: the model returned by :func:`wrap_model`.
        optimizer: its optimizer, or None.
        extra: JSON-serializable resumable state (scheduler, data position, ...), or None.
        keep_last: how many sharded checkpoints to keep, this one included; None keeps all.

    Returns:
        The checkpoint folder.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep_last is not None and (
        isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1
    ):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    extra = dict(extra or {})
    _check_json("extra", extra)
    run_dir = Path(run_dir)
    final = run_dir / f"{_SHARDED_PREFIX}{step:08d}"
    tmp = run_dir / f".tmp-{final.name}"
    ok = True
    if _rank() == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            # Saves run one after another, so any temporary folder left now is from an interrupted one.
            for stale in [
                *run_dir.glob(f".tmp-{_SHARDED_PREFIX}*"),
                *run_dir.glob(f".trash-{_SHARDED_PREFIX}*"),
            ]:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            if not _distributed():
                raise
            ok = False
    if not _all_ok(ok, "save_sharded (prepare)"):
        raise RuntimeError(f"save_sharded: rank 0 could not create {run_dir}")

    tensors: dict[str, Any] = {"model": get_model_state_dict(model)}
    optim_rest = None
    if optimizer is not None:
        tensors["optim"], optim_rest = _split_optimizer(get_optimizer_state_dict(model, optimizer))
    with _single_process_dcp():
        dcp.save(tensors, checkpoint_id=tmp, no_dist=not _distributed())
    try:
        rng_file = tmp / f"rng-rank{_rank()}.safetensors"
        safetensors.torch.save_file({k: v.contiguous() for k, v in _rng_tensors().items()}, str(rng_file))
    except OSError:
        if not _distributed():
            raise
        ok = False
    if not _all_ok(ok, "save_sharded (shards written)"):
        raise RuntimeError(f"save_sharded: a rank could not write its RNG state into {tmp}")
    if _rank() == 0:
        try:
            meta = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "step": step,
                "world_size": _world(),
                "optimizer": optim_rest,
                "extra": extra,
            }
            _write_json(tmp / _META, meta)
            _fsync_dir(tmp)
            if final.exists():
                trash = run_dir / f".trash-{final.name}"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = run_dir / f".tmp-{_LATEST}"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, run_dir / _LATEST)
            _fsync_dir(run_dir)
            if keep_last is not None:
                older = [p for s, p in _sharded_dirs(run_dir) if s < step]
                for path in older[: max(0, len(older) - (keep_last - 1))]:
                    shutil.rmtree(path, ignore_errors=True)
        except OSError:
            ok = False
            if not _distributed():
                raise
    if not _all_ok(ok, "save_sharded (rename)"):
        raise RuntimeError(f"save_sharded: rank 0 could not move {tmp} into place as {final}")
    return final


def _resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / _META).is_file():
        return path
    latest = latest_sharded(path) if path.is_dir() else None
    if latest is None:
        raise ValueError(f"{path} is neither a sharded checkpoint folder nor a run folder holding one")
    return latest


def _read_meta(ckpt: Path) -> dict[str, Any]:
    with open(ckpt / _META) as f:
        meta = json.load(f)
    if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
        raise ValueError(
            f"{ckpt} holds format {meta.get('format')!r} version {meta.get('version')!r}; expected "
            f"{_FORMAT!r} version {_FORMAT_VERSION}"
        )
    return meta


def load_sharded(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[int, dict[str, Any]]:
    """Restores a :func:`save_sharded` checkpoint in place; every rank calls it.

    The model (wrapped as when saved, any world size) and optimizer get their exact saved values; each
    rank's torch RNG state is restored too when the world size is unchanged.

    Args:
        path: a ``sharded-*`` folder, or a run folder (its newest sharded checkpoint).
        model: the model returned by :func:`wrap_model`.
        optimizer: its optimizer (same type and parameter groups as saved), or None.

    Returns:
        ``(step, extra)`` as saved.

    Raises:
        ValueError: no checkpoint at ``path``, another format, or an optimizer is asked for but none saved.
    """
    ckpt = _resolve_checkpoint(path)
    meta = _read_meta(ckpt)
    if optimizer is not None and meta["optimizer"] is None:
        raise ValueError(f"{ckpt} holds no optimizer state")
    model_sd = get_model_state_dict(model)
    tensors: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        tensors["optim"], _ = _split_optimizer(get_optimizer_state_dict(model, optimizer))
    with _single_process_dcp():
        dcp.load(tensors, checkpoint_id=ckpt, no_dist=not _distributed())
    set_model_state_dict(model, model_sd)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, _join_optimizer(tensors["optim"], meta["optimizer"]))
    rng_file = ckpt / f"rng-rank{_rank()}.safetensors"
    if meta["world_size"] == _world() and rng_file.is_file():
        rng = safetensors.torch.load_file(str(rng_file))
        torch.set_rng_state(rng["cpu"])
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states)
    return int(meta["step"]), dict(meta["extra"])


def consolidate(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    model_config: Any,
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Writes a sharded checkpoint's model as one ``from_pretrained``-loadable folder (safetensors).

    Runs in one process (no process group needed, and none is used if one exists): builds the model from
    ``model_config`` on the CPU, reads every shard of the DCP checkpoint into it and calls
    ``save_pretrained``. Needs the full model in CPU memory once. Written to a temporary folder and renamed,
    so ``out_dir`` is either complete or absent.

    Args:
        ckpt_dir: a ``sharded-*`` folder, or a run folder (its newest).
        out_dir: the folder to create (replaced if it exists).
        model_config: the model's ``transformers.PretrainedConfig``, or a path / hub-cache name to load it
            from with ``AutoConfig.from_pretrained``.
        dtype: dtype of the written weights; None keeps the checkpoint's.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: the checkpoint lacks weights the model needs (other than tied aliases).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    ckpt = _resolve_checkpoint(ckpt_dir)
    _read_meta(ckpt)
    if isinstance(model_config, PretrainedConfig):
        config = copy.deepcopy(model_config)  # from_config records the dtype on the config it is given
    else:
        config = AutoConfig.from_pretrained(model_config)
    saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    saved_model = {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}
    saved_dtypes = {v.properties.dtype for v in saved_model.values() if hasattr(v, "properties")}
    load_dtype = next(iter(saved_dtypes)) if len(saved_dtypes) == 1 else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=load_dtype)
    state = model.state_dict()
    wanted = {k: v for k, v in state.items() if k in saved_model}
    missing = [k for k in state if k not in saved_model]
    with _single_process_dcp():
        dcp.load({"model": wanted}, checkpoint_id=ckpt, no_dist=True)
    pointers = {t.data_ptr() for t in wanted.values()}
    unloaded = [k for k in missing if state[k].data_ptr() not in pointers]
    if unloaded:
        raise ValueError(
            f"{ckpt} has no weights for {unloaded[:10]} (of {len(unloaded)}); wrong model_config?"
        )
    if dtype is not None:
        model = model.to(dtype)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
