"""The run's metric log: ``metrics.jsonl`` (one JSON object per line) and, if installed, TensorBoard under
``<output_dir>/tb``. Only rank 0 writes."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MetricsLog", "summarize"]

logger = logging.getLogger("fastdpo")
# Running totals and positions: their value at the end of a logging interval, not a mean over it.
_LAST_VALUE = ("num_tokens", "epoch")


def summarize(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """One logging interval's metrics: the mean over its steps, except the running ``_LAST_VALUE`` ones.

    A metric some steps lack (KTO's ``rewards/chosen`` in a step without desirable examples) is the mean
    over the steps that have it, as TRL averages it over the batches that log it.
    """
    names = dict.fromkeys(k for m in steps for k in m)
    summary = {k: float(np.mean([m[k] for m in steps if k in m])) for k in names}
    summary.update({k: steps[-1][k] for k in _LAST_VALUE if k in steps[-1]})
    return summary


class MetricsLog:
    """Appends ``{"step", "split", **metrics}`` lines to ``out_dir/metrics.jsonl`` and scalars to TensorBoard.

    A run that starts at step ``start_step`` (0, or a resumed checkpoint's step) first drops every line
    and event of a later step, which an earlier attempt logged after that checkpoint: no step repeats.

    Args:
        out_dir: The run folder.
        start_step: The step the run starts from.
        enabled: Whether this process writes (rank 0); otherwise every call does nothing.
        tensorboard: Also write TensorBoard event files, if ``torch.utils.tensorboard`` imports.
    """

    def __init__(self, out_dir: Path, start_step: int, *, enabled: bool, tensorboard: bool) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if enabled:
            self._truncate(start_step)
            if tensorboard:
                self._writer = _open_tensorboard(out_dir / "tb", purge_step=start_step + 1)

    def _truncate(self, start_step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
            if isinstance(step, int) and step <= start_step:
                kept.append(line + "\n")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        if self._writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"{split}/{name}", value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()


def _open_tensorboard(log_dir: Path, *, purge_step: int) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed; logging to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir, purge_step=purge_step)
