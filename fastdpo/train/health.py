"""Whether a run is making progress: skipped steps, no-op steps, bad streaks and an honest end.

A step is *skipped* when its loss or gradient norm is not finite: its update is not applied. A step whose
gradient norm is exactly 0 is applied, but moves nothing a gradient should (AdamW's momentum and weight
decay aside). Either is *bad*; ``max_bad_steps`` bad steps in a row stop the run. A run whose last step
was skipped, or that ran steps without applying any, ends with an error instead of exporting. The last
checkpoint written before a bad streak is the one to resume from: the loop writes none during a streak
(``in_streak``), so neither ``latest`` nor ``keep_last``'s pruning can move past it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from fastdpo.errors import UserError
from fastdpo.train.metrics import MetricsLog

__all__ = ["RunHealth", "applied"]

logger = logging.getLogger("fastdpo")


def applied(metrics: dict[str, float]) -> bool:
    """Whether a step's update is applied: its loss and gradient norm are finite."""
    return math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])


class RunHealth:
    """Counts one ``train()`` call's applied and skipped steps and the current bad streak.

    Args:
        max_bad_steps: Bad steps in a row that stop the run.
        lr: The run's learning rate, for the messages.
        last_checkpoint: The checkpoint the run resumed from, if any.
    """

    def __init__(self, max_bad_steps: int, lr: float, last_checkpoint: Path | None) -> None:
        self.max_bad_steps, self.lr = max_bad_steps, lr
        self.applied = self.skipped = 0
        self.streak: list[str] = []  # "skipped" / "zero", one per bad step in a row
        self.last_skipped = False
        self.good_checkpoint = last_checkpoint

    @property
    def in_streak(self) -> bool:
        """Whether the last step was bad: its weights are not ones to resume from."""
        return bool(self.streak)

    def saved(self, path: Path) -> None:
        """Notes a checkpoint; one written during a bad streak is not a good one."""
        if not self.streak:
            self.good_checkpoint = path

    def skip_save(self, step: int) -> None:
        """Notes a checkpoint not written because a bad streak runs."""
        logger.warning(
            "step %d: no checkpoint during a bad streak (%d bad in a row); the resume point stays %s",
            step,
            len(self.streak),
            self.good_checkpoint or "none (a rerun starts over)",
        )

    def step(self, step: int, metrics: dict[str, float], log: MetricsLog) -> bool:
        """Records step ``step``; returns whether it was applied.

        Raises:
            UserError: This step ends a streak of ``max_bad_steps`` bad steps.
        """
        ok = applied(metrics)
        self.applied += ok
        self.skipped += not ok
        self.last_skipped = not ok
        loss, grad_norm = metrics["loss"], metrics["grad_norm"]
        if ok and grad_norm != 0.0:
            self.streak = []
            return True
        self.streak.append("zero" if ok else "skipped")
        if ok:
            reason = "gradient norm 0: the update moves no weight along a gradient"
        else:
            reason = f"non-finite loss {loss} or grad_norm {grad_norm}, the update was not applied"
        logger.warning(
            "step %d %s: %s (%d bad in a row, max_bad_steps %d)",
            step,
            "no-op" if ok else "skipped",
            reason,
            len(self.streak),
            self.max_bad_steps,
        )
        if not ok:
            log.log(step, "skipped", {"reason": reason, "bad_steps": len(self.streak)})
        if len(self.streak) >= self.max_bad_steps:
            log.flush()
            raise UserError(self._streak_message(step, loss, grad_norm))
        return ok

    def _streak_message(self, step: int, loss: float, grad_norm: float) -> str:
        resume = self._next_step()
        if all(kind == "zero" for kind in self.streak):
            return (
                f"stopping at step {step}: {len(self.streak)} optimizer steps in a row had a gradient norm "
                f"of exactly 0 (loss {loss}), so the updates are no-ops: the model no longer learns (e.g. an "
                f"lr ({self.lr}) so large that the weights saturated and every gradient vanished); nothing "
                f"was exported; expected a nonzero gradient norm: lower lr, then {resume}"
            )
        return (
            f"stopping at step {step}: {len(self.streak)} optimizer steps in a row had a non-finite loss or "
            f"gradient norm or a gradient norm of 0 (last: loss {loss}, grad_norm {grad_norm}), so the run "
            f"has diverged and nothing was exported; expected finite values: lower lr ({self.lr}) or set "
            f"max_grad_norm, then {resume}"
        )

    def check_end(self, step: int) -> None:
        """Refuses to end a run whose last step was skipped, or that ran steps and applied none.

        Raises:
            UserError: Naming the checkpoint to resume from; nothing is exported.
        """
        ran = self.applied + self.skipped
        if not ran or (self.applied and not self.last_skipped):
            return
        what = "no step was applied" if not self.applied else f"its last step ({step}) was skipped"
        raise UserError(
            f"the run ended at step {step} but {what} ({self.applied} applied, {self.skipped} skipped: "
            f"non-finite loss or gradient norm), so nothing was exported; expected finite steps: lower lr "
            f"({self.lr}) or set max_grad_norm, then {self._next_step()}"
        )

    def _next_step(self) -> str:
        if self.good_checkpoint is None:
            return "start over (no checkpoint was written before the first bad step)"
        return (
            f"rerun to resume from {self.good_checkpoint}, the last checkpoint written before the first bad "
            "step (with allow_config_change for a new lr), or start over"
        )
