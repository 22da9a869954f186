"""``fastdpo plan``: plans a config's step and prints it, as a table or as one JSON object."""

from __future__ import annotations

from fastdpo.planner.api import plan_memory
from fastdpo.planner.report import format_plan
from fastdpo.train.config import TrainConfig

__all__ = ["run_plan"]


def run_plan(
    config: TrainConfig, *, gpu_memory: str | None, fit: bool, compare_trl: bool, as_json: bool
) -> int:
    """Plans ``config`` on its device (``auto``: CUDA) and prints the plan; returns the exit status."""
    device = "cpu" if config.device == "cpu" else "cuda"
    plan = plan_memory(config, device=device, gpu_memory=gpu_memory, fit=fit, compare_trl=compare_trl)
    print(plan.to_json() if as_json else format_plan(plan, title=str(config.model)))
    return 0
