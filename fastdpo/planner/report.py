"""The plan as a person reads it: one table of the peak, what held it, the host side and what fits."""

from __future__ import annotations

from typing import Any

from fastdpo.planner.api import GIB, MemoryPlan

__all__ = ["format_plan"]

# Display order of the breakdown's parts; any other part follows in its own order.
_ORDER = (
    "weights",
    "trainable params",
    "gradients",
    "optimizer state",
    "checkpointed activations",
    "recomputed layer working set",
    "head and loss",
    "reference pass",
    "temporaries",
)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _where(where: dict[str, Any]) -> str:
    layer = "" if where.get("layer") is None else f", decoder layer {where['layer']}"
    return f"{where['phase']}{layer}, op {where['op']}"


def _rows(breakdown: dict[str, int]) -> list[tuple[str, int]]:
    known = [(k, breakdown[k]) for k in _ORDER if breakdown.get(k)]
    return known + [(k, v) for k, v in breakdown.items() if k not in _ORDER and v]


def format_plan(plan: MemoryPlan, *, title: str) -> str:
    """The plan as a table; every figure is "planned (meta-device run)"."""
    lines = [
        f"fastdpo plan: {title}",
        f"{plan.tokens_per_step:,} tokens per step ({plan.num_pairs} pairs) on {plan.device}; planned "
        "(meta-device run)",
        "",
        f"{'peak device memory':32} {_gib(plan.peak_bytes):>12}   at {_where(plan.where)}",
    ]
    lines += [f"  {name:30} {_gib(n):>12}" for name, n in _rows(plan.breakdown)]
    lines.append(f"{'host memory (offloaded)':32} {_gib(plan.host_bytes):>12}")
    if plan.gpu_memory is not None:
        verdict = "fits" if plan.fits else "does NOT fit"
        lines.append(
            f"{'GPU memory':32} {_gib(plan.gpu_memory):>12}   margin {_gib(plan.margin_bytes)} (1 GiB for "
            f"the CUDA context and cuBLAS workspaces + 5% for allocator fragmentation): {verdict}"
        )
    if plan.max_tokens_per_step is not None:
        lines.append(f"{'largest tokens_per_step (--fit)':32} {plan.max_tokens_per_step:>12,}")
    if plan.trl is not None:
        trl = plan.trl
        lines += [
            "",
            f"stock TRL 1.16 DPOTrainer, padded batch {trl['padded_shape']}: peak "
            f"{_gib(trl['peak_bytes'])} at {_where(trl['where'])}",
        ]
        lines += [f"  {name:30} {_gib(n):>12}" for name, n in _rows(trl["breakdown"])]
        if trl.get("max_tokens_per_step") is not None:
            lines.append(f"{'TRL largest tokens per step':32} {trl['max_tokens_per_step']:>12,}")
    return "\n".join(lines)
