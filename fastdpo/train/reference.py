"""Reference log-probs for the loss, in one of ``REFERENCE_MODES``.

``precompute`` runs one no-grad pass over the data before training and caches the result on disk
(safetensors, keyed by model, data and options); ``model`` runs a frozen reference model next to the
policy; ``adapter`` runs the policy itself with its LoRA adapters disabled; ``none`` trains reference-free.
Loss types without a reference (``simpo``, ``orpo``, ``sft``) ignore it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from fastdpo.distributed import all_reduce_sum, unsharded_lm_head, unwrap_model
from fastdpo.modeling import reference_context
from fastdpo.packing import PackedBatch
from fastdpo.train.forward import PackedForward
from fastdpo.train.plan import Split

__all__ = ["precompute_reference", "reference_inputs"]

logger = logging.getLogger("fastdpo")
# 2: the entry records its key and the sha256 of its tensors, checked on load; 3: the model files' sha256
_REF_CACHE_VERSION = 3


def reference_inputs(
    fwd: PackedForward,
    mode: str,
    ref_model: nn.Module | None,
    split: Split,
    indices: np.ndarray,
    batch: PackedBatch,
) -> dict[str, Any]:
    """The reference keyword arguments of ``FusedLinearDPOLoss`` for the pairs ``indices`` of ``split``.

    ``precompute`` reads the split's table; ``model`` and ``adapter`` run a no-grad forward of ``ref_model``
    or of the policy with its adapters off, and pass its hidden states and lm_head.
    """
    if mode == "none":
        return {}
    if mode == "precompute":
        idx = torch.from_numpy(indices)
        return {
            "ref_chosen_logps": split.ref_chosen[idx].to(fwd.device),
            "ref_rejected_logps": split.ref_rejected[idx].to(fwd.device),
        }
    model = ref_model if mode == "model" else fwd.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference_context(unwrap_model(model)) if mode == "adapter" else nullcontext():
            hidden = fwd.hidden(model, batch)
            with unsharded_lm_head(model) as (weight, bias):
                return {
                    "ref_hidden": hidden,
                    "ref_weight": weight.detach(),
                    "ref_bias": None if bias is None else bias.detach(),
                }
    finally:
        model.train(was_training)


def precompute_reference(
    fwd: PackedForward,
    split: Split,
    bins: list[np.ndarray],
    *,
    cache_dir: Path,
    cacheable: bool,
    model_identity: dict[str, Any] | None,
    source: Callable[[], nn.Module],
) -> None:
    """Fills ``split.ref_chosen / ref_rejected`` from the disk cache, or by one no-grad pass over ``bins``.

    ``source()`` gives the model that scores the pass (the reference model, or the policy before any
    update); it is called on a cache miss only. Each rank scores its share of the bins into a zero table
    and the tables are summed over ranks. ``cacheable`` False (an injected policy without ``ref_model``:
    nothing on disk names its weights) bypasses the cache. ``model_identity`` (``fastdpo.model_identity``)
    identifies the scoring model's files in the cache key, so weights replaced in place are a miss.
    """
    cfg = fwd.config
    key = {
        "version": _REF_CACHE_VERSION,
        "model": model_identity,
        "data": split.digest,
        "compute_dtype": str(fwd.compute_dtype),
        "param_dtype": cfg.param_dtype,
        "shared_prompt": cfg.shared_prompt,
        "tokens_per_step": cfg.tokens_per_step,
        "attn_backend": cfg.attn_backend,
        "backend": cfg.backend,
        "device": fwd.device.type,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_dir / f"ref-logps-{digest}.safetensors"
    n = len(split.data)
    cached = _read_cache(path, key, n) if cacheable and path.exists() else None
    hit = cached is not None
    # Every rank must take the same branch: the pass below is collective under DDP / FSDP2.
    if all_reduce_sum(int(hit)) == fwd.dist.world_size:
        split.ref_chosen, split.ref_rejected = cached["chosen"], cached["rejected"]
        logger.info("%s reference log-probs: read from %s", split.name, path)
        return
    model = source()
    chosen, rejected = torch.zeros(n), torch.zeros(n)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b, real in tqdm(
            fwd.shard(bins, split.tokens),
            desc=f"reference log-probs ({split.name})",
            disable=not (cfg.progress and fwd.dist.is_main),
        ):
            c, r = fwd.sequence_logps(model, fwd.batch(split, b))
            if real:
                idx = torch.from_numpy(b)
                chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
    fwd.release(model)
    model.train(was_training)
    # Each pair was scored on exactly one rank and is 0 elsewhere, so the sum is exact.
    chosen, rejected = all_reduce_sum(chosen), all_reduce_sum(rejected)
    split.ref_chosen, split.ref_rejected = chosen, rejected
    if fwd.dist.is_main and cacheable:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {"chosen": chosen, "rejected": rejected}
        save_file(tensors, tmp, metadata={"key": json.dumps(key), "sha256": _tensors_sha256(tensors)})
        os.replace(tmp, path)
        logger.info("%s reference log-probs: computed, cached at %s", split.name, path)


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        sha.update(name.encode())
        sha.update(tensors[name].contiguous().numpy().tobytes())
    return sha.hexdigest()


def _read_cache(path: Path, key: dict[str, Any], n: int) -> dict[str, torch.Tensor] | None:
    """The cached log-probs at ``path`` if its key, sha256 and shape check out; else a warning and None.

    The file name holds only a prefix of the key's hash, and a file can be cut or flipped on disk, so a
    wrong or damaged entry would otherwise feed the loss wrong references without a word.
    """
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118  (not a dict)
    except (OSError, SafetensorError, ValueError) as err:
        problem = f"unreadable ({err})"
    else:
        if metadata.get("key") is None or json.loads(metadata["key"]) != key:
            problem = "its key (model, data, options) differs from this run's"
        elif metadata.get("sha256") != _tensors_sha256(tensors):
            problem = "its contents do not match their recorded sha256"
        elif tensors.keys() != {"chosen", "rejected"} or tensors["chosen"].shape != (n,):
            problem = f"it does not hold {n} chosen and rejected log-probs"
        else:
            return tensors
    logger.warning("reference log-prob cache %s: %s; recomputing it", path, problem)
    return None
