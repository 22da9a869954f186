"""Sharded (FSDP2 / DDP) checkpoints: every rank writes its own shards, as safetensors; nothing is pickled.

A checkpoint is the folder ``run_dir/sharded-{step:08d}`` (next to, and distinct from, the single-process
``checkpoint-*`` folders) holding:

- ``dcp/shard-*.safetensors``: the model's and optimizer's tensors, written by
  ``torch.distributed.checkpoint`` (DCP) through its safetensors storage (``HuggingFaceStorageWriter``):
  each rank writes its FSDP2 shards (DDP replicas once), and each file's safetensors header records the
  shards' offsets as JSON. DCP's default ``FileSystemReader`` would ``pickle.load`` a ``.metadata`` file;
  ``HuggingFaceStorageReader`` rebuilds that metadata from the safetensors headers instead.
- ``rng-rank{r}.safetensors``: each rank's torch RNG states.
- ``fastdpo-sharded.json``: format, step, world size, the optimizer's non-tensor state, ``extra``, every
  file's size and sha256 and a checksum of itself; written last by rank 0.

All ranks write into one temporary folder; after every rank has finished, the ranks hash the files
(each a share of them), rank 0 writes the metadata, renames the folder into place, points
``run_dir/latest-sharded`` at it and prunes. Verification on load is shared the same way, and the ranks
agree on the outcome. All ranks must see the same ``run_dir``.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fastdpo.checkpoint import io
from fastdpo.distributed.collectives import all_agree, all_reduce_sum, is_distributed, rank, world_size
from fastdpo.distributed.launch import unwrap_model

__all__ = ["consolidate", "latest_sharded", "load_sharded", "save_sharded"]

FORMAT_NAME = "fastdpo-sharded-checkpoint"
FORMAT_VERSION = 2
LAYOUT = io.Layout(
    prefix="sharded-", pointer="latest-sharded", meta="fastdpo-sharded.json", format=FORMAT_NAME,
    version=FORMAT_VERSION,
)  # fmt: skip

_DCP_DIR = "dcp"


def save_sharded(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    keep_last: int | None = 2,
    protect: str | os.PathLike | None = None,
) -> Path:
    """Atomically writes ``run_dir/sharded-{step:08d}``; every rank calls it, each writes its own shards.

    Holds the model's and optimizer's tensors in DCP's safetensors format (FSDP2 shards stay sharded; DDP
    replicas are written once), the optimizer's other state and ``extra`` as JSON, each rank's torch RNG
    state, and every file's sha256. A crash or a failed write (e.g. a full disk) at any point leaves the
    previous checkpoint and pointer valid.

    Args:
        run_dir: folder of the run, visible to every rank (a shared filesystem across nodes).
        step: optimizer steps taken (>= 0).
        model: the model returned by ``fastdpo.distributed.wrap_model`` (or a plain module).
        optimizer: its optimizer, or None.
        extra: JSON-serializable resumable state (scheduler, data position, ...), or None.
        keep_last: how many sharded checkpoints to keep, this one included; None keeps all.
        protect: a checkpoint never pruned, whatever ``keep_last`` says (on top of the kept ones), or None.

    Returns:
        The checkpoint folder.

    Raises:
        OSError: a write failed on this rank or another (e.g. a full disk); every rank raises, naming the
            checkpoint.
    """
    step = io.check_step(step)
    io.check_keep_last(keep_last)
    extra = dict(extra or {})
    _check_json("extra", extra)
    run_dir = Path(run_dir)
    final = run_dir / LAYOUT.folder(step)
    # Every rank writes into the same temporary folder: rank 0 draws its name.
    token = int(all_reduce_sum(secrets.randbits(31) if rank() == 0 else 0))
    tmp = run_dir / f".tmp-{final.name}-{token:08x}"

    def prepare() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        io.remove_stale(run_dir, LAYOUT, _complete_meta)

    aliases = _tied_aliases(model)
    tensors: dict[str, Any] = {
        "model": {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}
    }
    optim_rest = None
    if optimizer is not None:
        tensors["optim"], optim_rest = _split_optimizer(get_optimizer_state_dict(model, optimizer))

    def write_shards() -> None:
        writer = HuggingFaceStorageWriter(str(tmp / _DCP_DIR), save_distributed=True)
        with _dcp_errors():
            dcp.save(tensors, storage_writer=writer, no_dist=not is_distributed())
        rng = {k: v.contiguous() for k, v in _rng_tensors().items()}
        io.write_tensors(tmp / f"rng-rank{rank()}.safetensors", rng, {"format": "pt"})

    def publish() -> None:
        io.fsync(tmp / _DCP_DIR)
        fields = {"world_size": world_size(), "optimizer": optim_rest, "extra": extra}
        io.write_meta(tmp, LAYOUT, step, digests, **fields)
        io.replace_dir(tmp, final, trash_prefix=f".trash-{final.name}")
        io.write_pointer(run_dir, LAYOUT, final.name)
        io.remove_stale(run_dir, LAYOUT, _complete_meta)
        if keep_last is not None:
            io.prune(run_dir, LAYOUT, step, keep_last, _complete_meta, protect=protect)

    _on_every_rank("prepare", prepare if rank() == 0 else None, final)
    try:
        _on_every_rank("write the shards", write_shards, final)
        digests = _shared_digests(tmp, _files(tmp))
        _on_every_rank("publish", publish if rank() == 0 else None, final)
    except BaseException:
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_sharded(run_dir: str | os.PathLike) -> Path | None:
    """The newest valid sharded checkpoint under ``run_dir`` (named by ``latest-sharded``), or None.

    Every rank calls it (the ranks share the hashing and agree). A checkpoint that fails a check (missing
    file, size, sha256, garbled metadata, other format) is skipped with a warning naming it and the
    reason; pointer and order as for ``fastdpo.checkpoint.latest_checkpoint``.

    Raises:
        CheckpointError (a ValueError): ``run_dir`` holds sharded checkpoints but none is valid.
    """
    found = io.newest_valid(Path(run_dir), LAYOUT, _verified_meta)
    return None if found is None else found[0]


def load_sharded(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[int, dict[str, Any]]:
    """Restores a :func:`save_sharded` checkpoint in place; every rank calls it.

    The checkpoint is verified first (sizes and sha256, shared among the ranks). The model (wrapped as
    when saved, any world size) and optimizer get their exact saved values; each rank's torch RNG state is
    restored too when the world size is unchanged.

    Args:
        path: a ``sharded-*`` folder, or a run folder (its newest valid sharded checkpoint).
        model: the model returned by ``fastdpo.distributed.wrap_model`` (or a plain module).
        optimizer: its optimizer (same type and parameter groups as saved), or None.

    Returns:
        ``(step, extra)`` as saved.

    Raises:
        CheckpointError (a ValueError): the checkpoint fails a check (named), or a run folder holds none
            that is valid.
        ValueError: no checkpoint at ``path``, or an optimizer is asked for but none saved.
    """
    ckpt, meta = _resolve(path)
    if optimizer is not None and meta["optimizer"] is None:
        raise ValueError(f"{ckpt} holds no optimizer state")
    model_sd = get_model_state_dict(model)
    aliases = _tied_aliases(model)
    tensors: dict[str, Any] = {"model": {k: v for k, v in model_sd.items() if k not in aliases}}
    if optimizer is not None:
        tensors["optim"], _ = _split_optimizer(get_optimizer_state_dict(model, optimizer))
    with _dcp_errors():
        dcp.load(tensors, storage_reader=_reader(ckpt), no_dist=not is_distributed())
    for alias, canonical in aliases.items():
        model_sd[alias] = model_sd[canonical]
    set_model_state_dict(model, model_sd)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, _join_optimizer(tensors["optim"], meta["optimizer"]))
    rng_file = f"rng-rank{rank()}.safetensors"
    if meta["world_size"] == world_size() and rng_file in meta["files"]:
        rng = io.load_tensors(ckpt / rng_file)
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
    ``model_config`` on the CPU, reads every shard of the checkpoint into it and calls
    ``save_pretrained``. Needs the full model in CPU memory once. Written to a temporary folder and renamed,
    so ``out_dir`` is either complete or absent.

    Args:
        ckpt_dir: a ``sharded-*`` folder, or a run folder (its newest valid one).
        out_dir: the folder to create (replaced if it exists).
        model_config: the model's ``transformers.PretrainedConfig``, or a path / hub-cache name to load it
            from with ``AutoConfig.from_pretrained``.
        dtype: dtype of the written weights; None keeps the checkpoint's.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: the checkpoint fails verification, or lacks weights the model needs (other than tied
            aliases).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    ckpt, _ = _resolve(ckpt_dir, collective=False)
    if isinstance(model_config, PretrainedConfig):
        config = copy.deepcopy(model_config)  # from_config records the dtype on the config it is given
    else:
        config = AutoConfig.from_pretrained(model_config)
    with _dcp_errors():
        saved = _reader(ckpt).read_metadata().state_dict_metadata
    saved_model = {k[len("model.") :]: v for k, v in saved.items() if k.startswith("model.")}
    saved_dtypes = {v.properties.dtype for v in saved_model.values() if hasattr(v, "properties")}
    load_dtype = next(iter(saved_dtypes)) if len(saved_dtypes) == 1 else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=load_dtype)
    state = model.state_dict()
    wanted = {k: v for k, v in state.items() if k in saved_model}
    missing = [k for k in state if k not in saved_model]
    with _dcp_errors():
        dcp.load({"model": wanted}, storage_reader=_reader(ckpt), no_dist=True)
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


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def _complete_meta(path: Path) -> dict[str, Any]:
    """The metadata of a complete checkpoint (files present with their sizes), else CheckpointError."""
    meta = io.read_meta(path, LAYOUT)
    if not (isinstance(meta.get("world_size"), int) and isinstance(meta.get("extra"), dict)):
        raise io.CheckpointError(f"{LAYOUT.meta} lacks the world size or the extra state")
    listed = {name for name in meta["files"] if name.startswith(f"{_DCP_DIR}/")}
    if not listed:
        raise io.CheckpointError(f"{LAYOUT.meta} lists no {_DCP_DIR}/ shard files")
    io.verify_files(path, meta["files"], deep=False)
    # The reader takes every safetensors file of the folder: one slipped in would feed it other tensors.
    present = {f"{_DCP_DIR}/{p.name}" for p in (path / _DCP_DIR).glob("*.safetensors")}
    if present - listed:
        raise io.CheckpointError(f"{sorted(present - listed)} are not part of the checkpoint as saved")
    return meta


def _verified_meta(path: Path, *, collective: bool = True) -> dict[str, Any]:
    """``_complete_meta`` and every sha256; with ``collective``, each rank hashes a share and all agree.

    Exactly one collective runs per call whatever the outcome, so ranks walking the same candidates stay
    in step.
    """
    meta, reason = None, None
    shard, shards = (rank(), world_size()) if collective else (0, 1)
    try:
        meta = _complete_meta(path)
        mine = sorted(meta["files"])[shard::shards]
        io.verify_files(path, {name: meta["files"][name] for name in mine}, deep=True)
    except io.CheckpointError as err:
        reason = str(err)
    if collective and not all_agree(reason is None, f"verifying {path.name}"):
        raise io.CheckpointError(reason or "a file failed verification on another rank")
    if reason is not None:
        raise io.CheckpointError(reason)
    return meta


def _resolve(path: str | os.PathLike, *, collective: bool = True) -> tuple[Path, dict[str, Any]]:
    """``(checkpoint folder, verified metadata)`` for a checkpoint folder or a run folder."""
    path = Path(path)
    if (path / LAYOUT.meta).is_file() or LAYOUT.step_of(path.name) is not None:
        try:
            return path, _verified_meta(path, collective=collective)
        except io.CheckpointError as err:
            raise io.CheckpointError(
                f"{path} is not a complete, valid {FORMAT_NAME} v{FORMAT_VERSION} folder: {err}"
            ) from None
    check = _verified_meta if collective else lambda p: _verified_meta(p, collective=False)
    found = io.newest_valid(path, LAYOUT, check) if path.is_dir() else None
    if found is None:
        raise ValueError(f"{path} is neither a sharded checkpoint folder nor a run folder holding one")
    return found


# --------------------------------------------------------------------------------------------------
# Plumbing
# --------------------------------------------------------------------------------------------------


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """Tied names -> the first name of the same parameter or buffer (safetensors stores a storage once).

    Found from the module tree, not from data pointers, so every rank drops the same names even where
    its shard of a tied weight is empty.
    """
    first: dict[int, str] = {}
    aliases = {}
    module = unwrap_model(model)
    while isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile, as DCP strips it
        module = module._orig_mod
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _reader(ckpt: Path) -> HuggingFaceStorageReader:
    return HuggingFaceStorageReader(str(ckpt / _DCP_DIR))


def _files(tmp: Path) -> list[str]:
    """Every file under ``tmp``, relative to it, sorted: the same list on every rank."""
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())


def _shared_digests(tmp: Path, files: list[str]) -> dict[str, str]:
    """sha256 of each file; every rank hashes a share, one sum hands every rank all of them."""
    table = torch.zeros(len(files), 32, dtype=torch.int64)
    for i in range(rank(), len(files), world_size()):
        table[i] = torch.tensor(list(bytes.fromhex(io.file_digest(tmp / files[i]))))
    table = all_reduce_sum(table)
    return {name: bytes(row.tolist()).hex() for name, row in zip(files, table, strict=True)}


def _on_every_rank(what: str, fn: Any, final: Path) -> None:
    """Runs ``fn`` (None: nothing on this rank); every rank raises if it failed on any rank.

    A rank whose own write failed raises that error (an ``OSError`` restated by ``io.save_failed``); the
    others raise an ``OSError`` saying another rank failed, so callers handle one exception type.
    """
    error = None
    try:
        if fn is not None:
            fn()
    except Exception as err:  # every rank must reach the agreement below, whatever went wrong
        error = err
    if all_agree(error is None, f"save_sharded ({what})"):
        return
    pointer = final.parent / LAYOUT.pointer
    if isinstance(error, OSError):
        raise io.save_failed(error, final, pointer) from error
    if error is not None:
        raise error
    raise io.save_failed(OSError(f"could not {what}: failed on another rank, see its error"), final, pointer)


@contextmanager
def _dcp_errors() -> Iterator[None]:
    """Silences DCP's one-process warning; unwraps its ``CheckpointException`` (a BaseException)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*assuming the intent is to (load|save) in a single process"
            )
            yield
    except CheckpointException as err:
        failures = [f[0] if isinstance(f, tuple) else f for f in err.failures.values()]
        first = next((f for f in failures if isinstance(f, OSError)), failures[0] if failures else None)
        if isinstance(first, Exception):
            raise first from err
        raise RuntimeError(str(err)) from err


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
