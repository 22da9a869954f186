"""``fastdpo.plan_memory``: what one training step of a config needs on a device, and what fits.

Memory is planned, not modeled: :class:`~fastdpo.planner.step.StepPlanner` runs the trainer's own step on
the meta device under a live-bytes tracker, so the figure follows the code. What the tracker cannot see is
the margin: the CUDA context, the cuBLAS workspaces and the caching allocator's rounding and fragmentation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastdpo.errors import UserError
from fastdpo.longctx import auto_tile_tokens
from fastdpo.planner.step import StepMeasure, StepPlanner, fit_tokens
from fastdpo.train.config import AUTO_TILE, AUTO_TOKENS, TrainConfig

__all__ = [
    "GIB",
    "MemoryPlan",
    "auto_tile_tokens_from_plan",
    "auto_tokens_per_step",
    "largest_free_tile",
    "load_model_config",
    "margin_bytes",
    "parse_bytes",
    "plan_memory",
    "resolve_auto",
]

logger = logging.getLogger("fastdpo")
GIB = 1 << 30
# Outside the tracker's view on CUDA: the context (about 0.5 GiB on recent drivers) and the cuBLAS /
# cuBLASLt workspaces, as a fixed 1 GiB; the allocator's block rounding and fragmentation as 5% of the card
# (with expandable_segments, which fastdpo train sets, fragmentation stays small). Modeled, not measured.
_MARGIN_FIXED = GIB
_MARGIN_FRACTION = 0.05
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40})


@dataclass
class MemoryPlan:
    """The planned memory of one optimizer step (bytes; "planned (meta-device run)").

    Attributes:
        peak_bytes: The device peak: weights plus every live tensor at the step's worst moment.
        where: The phase (``forward``, ``backward``, ``optimizer``, ``reference``), decoder layer and op of
            the peak.
        breakdown: What was alive at the peak, by part (weights, trainable params, gradients, optimizer
            state, checkpointed activations, recomputed layer working set, head and loss, ...).
        host_bytes: Host memory the step holds at its peak (offloaded activations).
        tokens_per_step: Tokens of the planned micro-batch.
        device: The device type planned for.
        gpu_memory: The card's memory, or None.
        margin_bytes: What is kept free of the card for what the tracker cannot see (see ``margin_bytes``).
        fits: ``peak_bytes + margin_bytes <= gpu_memory`` (None without ``gpu_memory``).
        max_tokens_per_step: With ``fit``: the largest step that fits (0: not even ``2 * max_length``).
        trl: With ``compare_trl``: the same plan for stock TRL's compute path.
    """

    peak_bytes: int
    where: dict[str, Any]
    breakdown: dict[str, int]
    host_bytes: int
    tokens_per_step: int
    num_pairs: int
    device: str
    gpu_memory: int | None = None
    margin_bytes: int = 0
    fits: bool | None = None
    max_tokens_per_step: int | None = None
    trl: dict[str, Any] | None = field(default=None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def parse_bytes(text: str | int) -> int:
    """``"80GiB"``, ``"80GB"`` (10**9), ``"24G"`` (GiB) or a plain number of bytes, as bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    unit = {"k": "kib", "m": "mib", "g": "gib", "t": "tib"}.get(unit, unit)
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--gpu-memory: expected a size such as 80GiB, 80GB or 24G, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def margin_bytes(gpu_memory: int | None, device: str) -> int:
    """The part of the card a plan keeps free: 1 GiB plus 5% of ``gpu_memory`` on CUDA, none on the CPU."""
    if device != "cuda" or gpu_memory is None:
        return 0
    return _MARGIN_FIXED + int(_MARGIN_FRACTION * gpu_memory)


def load_model_config(name: str, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of ``name``: a ``config.json``, a model folder or a hub id already in the
    local cache. Never downloads and never reads weights."""
    from transformers import AutoConfig

    path = Path(name)
    try:
        if path.is_file():
            values = json.loads(path.read_text(encoding="utf-8"))
            return AutoConfig.for_model(**values)
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"model {name!r}: expected a config.json, a model folder or a hub id in the local cache (the "
            f"planner never downloads), got an error: {e}"
        ) from None


def _local_gpu_memory() -> int | None:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def plan_memory(
    config: TrainConfig,
    *,
    model_config: Any = None,
    device: str = "cuda",
    gpu_memory: int | str | None = None,
    fit: bool = False,
    compare_trl: bool = False,
) -> MemoryPlan:
    """Plans one optimizer step of ``config`` (``fastdpo train``'s options) on a ``device`` GPU or CPU.

    Args:
        config: The run's options; ``tokens_per_step`` is the micro-batch planned (pairs of ``max_length``).
        model_config: The model's transformers config; default: loaded from ``config.model``.
        device: ``"cuda"`` or ``"cpu"``, the device type planned for.
        gpu_memory: The card's memory (bytes or ``"80GiB"``); default: the local GPU's, if any.
        fit: Also find the largest ``tokens_per_step`` that fits ``gpu_memory`` less the margin.
        compare_trl: Also plan stock TRL 1.16 ``DPOTrainer``'s compute path on the same step.

    Returns:
        The plan.

    Raises:
        UserError: A model config that cannot be read, an option the planner does not plan, or ``fit``
            without a memory to fit.
    """
    if device not in ("cuda", "cpu"):
        raise UserError(f"--device: the planner plans 'cuda' or 'cpu', got {device!r}")
    model_config = model_config or load_model_config(config.model, trust_remote_code=config.trust_remote_code)
    memory = parse_bytes(gpu_memory) if gpu_memory is not None else None
    if memory is None and device == "cuda":
        memory = _local_gpu_memory()
    if fit and memory is None:
        raise UserError("--fit needs the memory to fit: pass --gpu-memory (e.g. 80GiB); no local GPU found")
    margin = margin_bytes(memory, device)
    config = auto_tile_tokens_from_plan(config, device, model_config)
    planner = _planner(config, model_config, device)
    measure = planner.measure(config.tokens_per_step)
    plan = _plan(measure, device, memory, margin)
    if fit:
        plan.max_tokens_per_step = fit_tokens(planner, 2 * config.max_length, memory - margin)
    if compare_trl:
        from fastdpo.planner.trl import plan_trl

        budget = None if memory is None else memory - margin
        plan.trl = plan_trl(config, model_config, device, budget=budget, fit=fit)
    return plan


def _planner(config: TrainConfig, model_config: Any, device: str) -> StepPlanner:
    try:
        return StepPlanner(config, model_config, torch.device("meta"), device)
    except ValueError as e:
        raise UserError(str(e)) from None


def _plan(measure: StepMeasure, device: str, memory: int | None, margin: int) -> MemoryPlan:
    fits = None if memory is None else measure.peak_bytes + margin <= memory
    return MemoryPlan(
        peak_bytes=measure.peak_bytes,
        where=measure.where,
        breakdown=measure.breakdown,
        host_bytes=measure.host_bytes,
        tokens_per_step=measure.tokens,
        num_pairs=measure.num_pairs,
        device=device,
        gpu_memory=memory,
        margin_bytes=margin,
        fits=fits,
    )


def auto_tokens_per_step(config: TrainConfig, device: torch.device, model_config: Any = None) -> TrainConfig:
    """``config`` with ``tokens_per_step: auto`` resolved: the largest step that fits the GPU's free memory.

    Raises:
        UserError: Not on CUDA, or not even one pair of ``max_length`` fits.
    """
    if config.tokens_per_step != AUTO_TOKENS:
        return config
    if device.type != "cuda":
        raise UserError(f"tokens_per_step: auto plans for the GPU, but the run is on {device}; set a number")
    free, total = torch.cuda.mem_get_info(device)
    smallest = dataclasses.replace(config, tokens_per_step=2 * config.max_length)
    plan = plan_memory(smallest, model_config=model_config, device="cuda", gpu_memory=free, fit=True)
    if not plan.max_tokens_per_step:
        raise UserError(
            f"tokens_per_step: auto: not even one pair of max_length {config.max_length} fits the "
            f"{free / GIB:.1f} GiB free on {device} (planned peak {plan.peak_bytes / GIB:.1f} GiB, margin "
            f"{plan.margin_bytes / GIB:.1f} GiB); lower max_length or turn on the memory options"
        )
    logger.info(
        "tokens_per_step auto: %d, the largest step fastdpo plan fits in the %.1f GiB free of %.1f GiB on %s "
        "(margin %.1f GiB kept free)",
        plan.max_tokens_per_step,
        free / GIB,
        total / GIB,
        device,
        plan.margin_bytes / GIB,
    )
    return dataclasses.replace(config, tokens_per_step=plan.max_tokens_per_step)


_TILE_GROWTH = 16  # tile_tokens: auto tries ALST's tile times 1, 2, 4, 8, 16


def largest_free_tile(peak_of: Any, base: int, limit: int) -> int:
    """The largest of ``base * 2**k`` (up to ``16 * base`` and ``limit`` rows) whose ``peak_of(tile)`` is no
    higher than ``peak_of(base)``: a bigger tile means fewer, fuller matmuls, and while the step's peak falls
    elsewhere (attention's backward, say) it costs no memory. Stops at the first tile that raises it."""
    floor, best, tile = peak_of(base), base, 2 * base
    while tile <= min(limit, _TILE_GROWTH * base) and peak_of(tile) <= floor:
        best, tile = tile, 2 * tile
    return best


def auto_tile_tokens_from_plan(
    config: TrainConfig, device: str | torch.device, model_config: Any = None
) -> TrainConfig:
    """``config`` with ``tile_tokens: auto`` resolved for a run on ``device`` (its type) by
    :func:`largest_free_tile`, each tile planned at ``tokens_per_step``; any other ``config`` unchanged."""
    if config.tile_tokens != AUTO_TILE:
        return config
    target = torch.device(device).type
    model_config = model_config or load_model_config(config.model, trust_remote_code=config.trust_remote_code)
    tokens = config.tokens_per_step

    def peak_of(tile: int) -> int:
        return (
            _planner(dataclasses.replace(config, tile_tokens=tile), model_config, target)
            .measure(tokens)
            .peak_bytes
        )

    base = auto_tile_tokens(model_config.hidden_size, tokens)
    tile = largest_free_tile(peak_of, base, tokens) if config.tiled_mlp or config.lean_norms else base
    logger.info(
        "tile_tokens auto: %d, the largest tile (ALST's rule gives %d) whose planned peak for a %d-token "
        "step on %s is no higher than with the rule's",
        tile,
        base,
        tokens,
        target,
    )
    return dataclasses.replace(config, tile_tokens=tile)


def resolve_auto(config: TrainConfig, device: torch.device, model_config: Any = None) -> TrainConfig:
    """``config`` with ``tokens_per_step: auto`` (CUDA only), then ``tile_tokens: auto``, resolved."""
    config = auto_tokens_per_step(config, device, model_config)
    return auto_tile_tokens_from_plan(config, device, model_config)
