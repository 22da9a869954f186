"""The training step the planner measures: ``fastdpo train``'s own step, built from a config alone.

The model is built from its ``config.json`` under ``torch.device("meta")`` (no weights are read), prepared,
given LoRA and wrapped exactly as the trainer does it, and a synthetic split of ``tokens_per_step`` tokens
stands in for the data: pairs of ``max_length`` tokens each (prompt ``max_prompt_length``), packed by the
same packer. Then :func:`fastdpo.train.step.accumulate` runs its forward, loss and backward and the
optimizer steps, under :class:`fastdpo.memtrack.LiveBytes`. The same function runs on real CPU tensors
(``device="cpu"``), which is how the plan is validated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from fastdpo.distributed import DistState
from fastdpo.longctx import decoder_layers
from fastdpo.losses import LOSS_TYPES
from fastdpo.memtrack import LiveBytes, current_tracker, label
from fastdpo.metarun import autocast_dtype, meta_autocast, plan_for
from fastdpo.ops._head_chunked import release_scratch
from fastdpo.packing import pair_num_tokens
from fastdpo.train.build import (
    add_lora,
    build_dpo_loss,
    build_optimizer,
    build_scheduler,
    logit_transform,
    prepare_model,
)
from fastdpo.train.config import DTYPES, TrainConfig
from fastdpo.train.forward import PackedForward
from fastdpo.train.plan import Split
from fastdpo.train.step import accumulate, clip_gradients

__all__ = ["StepMeasure", "StepPlanner", "build_policy", "fit_tokens", "synthetic_split"]


@dataclass
class StepMeasure:
    """What one tracked training step held: the device peak, where it fell and what was alive then."""

    peak_bytes: int
    where: dict[str, Any]
    breakdown: dict[str, int]
    host_bytes: int
    tokens: int
    num_pairs: int
    static: dict[str, int] = field(default_factory=dict)


class _PlannedSplit(Split):
    """A split of synthetic pairs (token 0 everywhere): only the lengths matter to memory."""

    def __init__(self, lengths: list[tuple[int, int, int]], shared_prompt: bool) -> None:
        prompt, chosen, rejected = (list(column) for column in zip(*lengths, strict=True))
        tokens = pair_num_tokens(prompt, chosen, rejected, shared_prompt=shared_prompt)
        n = len(lengths)
        super().__init__("plan", None, tokens, "", torch.zeros(n), torch.zeros(n))
        self.lengths = lengths

    def pairs(self, indices: np.ndarray) -> list[dict[str, list[int]]]:
        keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        return [{k: [0] * n for k, n in zip(keys, self.lengths[i], strict=True)} for i in indices.tolist()]


def synthetic_split(config: TrainConfig) -> _PlannedSplit:
    """Pairs filling one ``tokens_per_step`` bin: ``max_length`` tokens a sequence, the last one shorter."""
    prompt = min(config.max_prompt_length or config.max_length // 2, config.max_length - 1)
    response = config.max_length - prompt
    budget, lengths = config.tokens_per_step, []
    full = int(pair_num_tokens([prompt], [response], [response], shared_prompt=config.shared_prompt)[0])
    while budget >= full:
        lengths.append((prompt, response, response))
        budget -= full
    # The rest of the bin as one shorter pair, so the step holds the budget's tokens, not a multiple of full.
    if config.shared_prompt:
        p = min(prompt, budget // 3)
        short = (budget - p - 1) // 2
    else:
        p = min(prompt, budget // 4)
        short = (budget - 2 * p) // 2
    if p >= 1 and short >= 1:
        lengths.append((p, short, short))
    return _PlannedSplit(lengths, config.shared_prompt)


def build_policy(config: TrainConfig, model_config: Any, device: torch.device) -> nn.Module:
    """The policy as ``Trainer`` builds it (prepared, LoRA), from ``model_config`` on ``device``, with
    random weights (meta: none at all)."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config, dtype=DTYPES[config.param_dtype])
    model = prepare_model(config, model, device)
    return add_lora(config, model) if config.lora_r else model


def _labeled(fn: Any, region: str, layer: int | None) -> Any:
    """``fn`` that tags allocations inside with ``region`` and ``layer``, keeping the layer afterwards (so
    its backward, which follows its recompute, stays attributed to it)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        tracker = current_tracker()
        if tracker is None:
            return fn(*args, **kwargs)
        tracker.where.region, tracker.where.layer = region, layer
        try:
            return fn(*args, **kwargs)
        finally:
            tracker.where.region = "other"

    return call


@contextmanager
def _region_hooks(model: nn.Module, loss_fn: nn.Module) -> Iterator[None]:
    """Labels allocations with the decoder layer that runs, forward and recomputed, and with the head."""
    undo = []

    def wrap(module: nn.Module, name: str, region: str, layer: int | None) -> None:
        original = module.__dict__.get(name)
        bound = getattr(module, name)
        setattr(module, name, _labeled(bound, region, layer))
        undo.append((module, name, original))

    wrap(loss_fn, "forward", "head", None)
    for i, layer in enumerate(decoder_layers(model)):
        wrap(layer, "forward", "decoder", i)
        # transformers checkpoints a layer's forward (not its __call__, so hooks miss the recompute): the
        # function it checkpoints is labeled too.
        if callable(getattr(layer, "_gradient_checkpointing_func", None)):
            checkpointed = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = _label_checkpoint(checkpointed, i)
            undo.append((layer, "_gradient_checkpointing_func", checkpointed))
    try:
        yield
    finally:
        for module, name, original in reversed(undo):
            if original is None:
                delattr(module, name)
            else:
                setattr(module, name, original)


def _label_checkpoint(checkpoint_fn: Any, layer: int) -> Any:
    """The layer's checkpoint function, labeled; its recompute runs under the meta autocast of its forward,
    as torch's checkpoint restores a real autocast state (it knows nothing of the meta stand-in)."""

    def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        dtype = autocast_dtype("meta")

        def run(*a: Any, **k: Any) -> Any:
            if dtype is None or autocast_dtype("meta") == dtype:
                return fn(*a, **k)
            with meta_autocast(dtype):
                return fn(*a, **k)

        return checkpoint_fn(_labeled(run, "decoder", layer), *args, **kwargs)

    return call


def _ref(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    storages = {_ref(t): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _static_bytes(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {
        "weights": _unique_bytes([p for p in params if not p.requires_grad] + list(model.buffers())),
        "trainable params": _unique_bytes([p for p in params if p.requires_grad]),
    }


def _category(alloc: Any, grads: set, states: set) -> str:
    if alloc.ref in grads:
        return "gradients"
    if alloc.ref in states:
        return "optimizer state"
    if alloc.region == "head":
        return "head and loss"
    if alloc.phase == "forward" and alloc.region == "decoder":
        return "checkpointed activations"
    if alloc.phase == "backward":
        # Before the first layer recomputes, backward runs the loss and the final norm.
        return "recomputed layer working set" if alloc.layer is not None else "head and loss"
    if alloc.phase == "reference":
        return "reference pass"
    return "temporaries"


class StepPlanner:
    """The policy, loss and optimizer of ``config`` built once on ``device``, measured step by step as they
    run on a ``target`` (``"cuda"`` or ``"cpu"``) device: its compute dtype, backend and buffers.

    Args:
        config: The run's options (DPO loss types; the reference ``precompute``, ``adapter`` or ``none``).
        model_config: The model's transformers config; the weights are random (meta: none at all).
        device: Where the step runs: ``meta`` to plan, ``cpu`` to validate the plan on real tensors.
        target: The device type planned for.
    """

    def __init__(self, config: TrainConfig, model_config: Any, device: torch.device, target: str) -> None:
        self.config, self.device, self.target = config, device, target
        self.model = model = build_policy(config, model_config, device)
        temperature, softcap = logit_transform(model)
        needs_ref = LOSS_TYPES[config.loss_type].needs_reference
        self.reference = config.reference if needs_ref else "none"
        if self.reference not in ("precompute", "adapter", "none"):
            raise ValueError(
                f"reference: the planner plans 'precompute', 'adapter' or 'none', got {self.reference!r} (a "
                "separate ref_model adds its weights and a no-grad forward)"
            )
        self.loss_fn = build_dpo_loss(config, temperature=temperature, softcap=softcap)
        dist = DistState(rank=0, world_size=1, local_rank=0, device=device, is_main=True)
        auto = "bf16" if target == "cuda" else "fp32"
        compute = DTYPES[auto if config.dtype == "auto" else config.dtype]
        self.fwd = PackedForward(
            config, dist, device, compute, model, self.loss_fn, temperature=temperature, softcap=softcap
        )
        self.static = _static_bytes(model)

    def measure(self, tokens_per_step: int) -> StepMeasure:
        """One optimizer step of a synthetic ``tokens_per_step`` bin, the optimizer's state already there
        (as from a run's second step on); with ``reference: precompute``, that pass on the bin first."""
        config = dataclasses.replace(self.config, tokens_per_step=tokens_per_step)
        model, fwd = self.model, self.fwd
        split = synthetic_split(config)
        bins = [np.arange(len(split.lengths))]
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer, total_steps=2)
        # As in a fresh run, the torch fold's kept buffer is allocated within the step.
        release_scratch(self.device.type)
        with ExitStack() as stack:
            if self.device.type == "meta":
                stack.enter_context(plan_for(self.target))
            tracker = stack.enter_context(LiveBytes(exclude=[*model.parameters(), *model.buffers()]))
            stack.enter_context(_region_hooks(model, self.loss_fn))
            with label(phase="optimizer"), torch.no_grad():
                _init_optimizer_state(model, optimizer)
            tracker.pin(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))
            if self.reference == "precompute":
                with label(phase="reference"), torch.no_grad():
                    model.eval()
                    fwd.sequence_logps(model, fwd.batch(split, bins[0]))
            model.train()
            accumulate(fwd, model, split, bins, reference=self.reference, ref_model=None, world_size=1)
            with label(phase="optimizer", region="other", layer=None):
                clip_gradients(model, config.max_grad_norm)
                breakdown = _step_and_breakdown(tracker, model, optimizer, self.static, scheduler)
        peak = tracker.peak
        w = peak.where
        return StepMeasure(
            peak_bytes=peak.bytes + sum(self.static.values()),
            where={"phase": w.phase, "layer": w.layer, "op": peak.op, "region": w.region},
            breakdown=breakdown,
            host_bytes=tracker.host_peak,
            tokens=int(split.tokens.sum()),
            num_pairs=len(split.lengths),
            static=dict(self.static),
        )


def _step_and_breakdown(
    tracker: LiveBytes,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    static: dict[str, int],
    scheduler: Any = None,
) -> dict[str, int]:
    """Takes the optimizer step, then sorts what was alive at the step's peak into parts."""
    grads = {_ref(p.grad) for p in model.parameters() if p.grad is not None}
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    states = {_ref(t) for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)}
    breakdown = dict(static)
    for alloc in tracker.peak.live:
        key = _category(alloc, grads, states)
        breakdown[key] = breakdown.get(key, 0) + alloc.nbytes
    optimizer.zero_grad(set_to_none=True)
    return breakdown


def _init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Creates the optimizer's state with a zero-gradient step that leaves the parameters as they were."""
    saved_lr = [g["lr"] for g in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, saved_lr, strict=True):
        group["lr"] = lr


_FIT_QUANTUM = 1024  # --fit searches tokens_per_step in multiples of this


def fit_tokens(planner: Any, smallest: int, budget: int) -> int:
    """The largest multiple of 1024 tokens (at least ``smallest``) whose planned peak is within ``budget``
    (0 if even ``smallest`` does not fit), for a peak that does not fall as tokens grow.

    A planned peak is close to linear in the tokens (flash attention's memory is), and a plan's cost grows
    with them, so each next step size is where the line through the two measured sizes nearest the budget
    meets it: two small plans, then usually two near the answer (one that fits, one a quantum above that
    does not). The search keeps a bracket (a size that fits, one that does not) and bisects it whenever a
    line guess moved the same side of it twice in a row, so it ends on any non-decreasing peak.
    """
    q = _FIT_QUANTUM
    peaks: dict[int, int] = {}

    def fits(tokens: int) -> bool:
        if tokens not in peaks:
            peaks[tokens] = planner.measure(tokens).peak_bytes
        return peaks[tokens] <= budget

    low, high = -(-smallest // q) * q, None
    if not fits(low):
        return 0
    guess, moved = 2 * low, []
    while True:
        moved.append(fits(guess))
        if moved[-1]:
            low = guess
        else:
            high = guess
        if high is not None and high - low <= q:
            return low
        guess = _next_guess(peaks, budget, low, high, bisect=moved[-2:] in ([True, True], [False, False]))


def _next_guess(peaks: dict[int, int], budget: int, low: int, high: int | None, bisect: bool) -> int:
    """A multiple of the quantum strictly inside ``(low, high)``: the line guess, or the bracket's middle."""
    q = _FIT_QUANTUM
    if high is not None and bisect:
        return max(low + q, (low + high) // 2 // q * q)
    near = sorted(peaks, key=lambda t: abs(peaks[t] - budget))[:2] if high is None else [low, high]
    (t0, p0), (t1, p1) = ((t, peaks[t]) for t in sorted(near))
    if p1 <= p0:  # flat: no line to follow
        guess = 2 * low if high is None else (low + high) // 2
    else:
        guess = int(t0 + (budget - p0) * (t1 - t0) / (p1 - p0))
    guess = max(low + q, guess // q * q)
    # Without a bracket yet, at most 64x the largest fit: a near-flat line must not plan a huge step.
    return min(guess, 64 * low) if high is None else min(guess, high - q)
