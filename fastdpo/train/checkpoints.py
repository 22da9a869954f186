"""A run's checkpoints: save, find and restore the newest valid one, check the resumed options, export.

Under none / ddp they are ``fastdpo.checkpoint``'s local checkpoints, written by rank 0 while the other
ranks wait; under fsdp2 every rank writes its shards (``save_sharded``) and the final export consolidates
them into one ``from_pretrained`` folder. Neither a checkpoint nor the export ever holds non-finite weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.distributed.tensor import DTensor

from fastdpo.checkpoint import (
    CheckpointError,
    consolidate,
    latest_sharded,
    load_checkpoint,
    load_sharded,
    read_extra,
    resume_point,
    save_checkpoint,
    save_final,
    save_sharded,
)
from fastdpo.distributed import all_reduce_sum, unwrap_model
from fastdpo.errors import UserError
from fastdpo.train.config import TrainConfig, resume_changes
from fastdpo.train.forward import PackedForward

__all__ = ["RunCheckpoints", "check_resume", "find_resume"]

logger = logging.getLogger("fastdpo")
_MAX_NAMED = 5


class RunCheckpoints:
    """The checkpoints of the run in ``out_dir`` for the policy of ``fwd`` and its optimizer and scheduler."""

    def __init__(
        self,
        fwd: PackedForward,
        out_dir: Path,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        self.fwd, self.out_dir, self.optimizer, self.scheduler = fwd, out_dir, optimizer, scheduler
        self.sharded = fwd.config.strategy == "fsdp2"

    def save(self, step: int, data_state: dict[str, Any], extra: dict[str, Any]) -> Path:
        """Writes an atomic checkpoint of ``step``; every rank calls it.

        Raises:
            UserError: The weights are not finite, or the write failed (e.g. the disk is full); the
                previous checkpoint stays valid.
        """
        self._check_finite(f"checkpoint of step {step}")
        keep_last = self.fwd.config.keep_last
        try:
            if self.sharded:
                extra = {**extra, "data_state": data_state, "scheduler": self.scheduler.state_dict()}
                model = self.fwd.model
                return save_sharded(self.out_dir, step, model, self.optimizer, extra, keep_last=keep_last)
            path, ok = None, False
            try:
                if self.fwd.dist.is_main:
                    path = save_checkpoint(
                        self.out_dir,
                        step,
                        model=unwrap_model(self.fwd.model),
                        optimizer=self.optimizer,
                        scheduler=self.scheduler,
                        data_state=data_state,
                        extra=extra,
                        keep_last=keep_last,
                    )
                ok = True
            finally:
                self.fwd.agree(ok, "saving the checkpoint on rank 0")
            return path or self.out_dir / f"checkpoint-{step:08d}"
        except OSError as err:
            raise UserError(f"step {step}: {err}; free space and rerun the same command to resume") from err

    def restore(self, path: Path) -> dict[str, Any]:
        """Loads checkpoint ``path`` (``find_resume``'s) into the model, optimizer, scheduler and RNGs (every
        rank).

        Returns:
            ``{"step", "data_state", "extra"}``.

        Raises:
            UserError: The checkpoint does not fit the model, or no longer verifies.
        """
        try:
            if self.sharded:
                step, extra = load_sharded(path, self.fwd.model, self.optimizer)
                self.scheduler.load_state_dict(extra["scheduler"])
                return {"step": step, "data_state": extra["data_state"], "extra": extra}
            model = unwrap_model(self.fwd.model)
            return load_checkpoint(path, model=model, optimizer=self.optimizer, scheduler=self.scheduler)
        except CheckpointError as err:
            raise UserError(
                f"cannot resume from {self.out_dir}: {err}; to start over, use resume=false (--no-resume) or "
                "a new output_dir"
            ) from err
        except ValueError as err:
            # The weights do not fit the model: most likely options that shape it changed, which the run's
            # config.yaml (the options of the run that wrote the checkpoint) shows.
            recorded = self.out_dir / "config.yaml"
            identity = (
                resume_changes(yaml.safe_load(recorded.read_text()), self.fwd.config)[0]
                if recorded.is_file()
                else {}
            )
            if identity:
                raise _identity_error(f"{self.out_dir} (its config.yaml)", identity) from err
            raise

    def sharded_at(self, step: int) -> Path | None:
        """The newest sharded checkpoint if it holds ``step``, else None."""
        ckpt = latest_sharded(self.out_dir)
        return ckpt if ckpt is not None and ckpt.name == f"sharded-{step:08d}" else None

    def export(self, out_dir: Path, tokenizer: Any, sharded_ckpt: Path | None) -> None:
        """Writes the trained model and tokenizer as a ``from_pretrained`` folder; every rank calls it.

        Under fsdp2, rank 0 consolidates ``sharded_ckpt`` (the current step's); otherwise rank 0 saves its
        replica (LoRA adapters merged).

        Raises:
            UserError: The weights are not finite; nothing is written.
        """
        self._check_finite(f"final model {out_dir}")
        ok = False
        try:
            if self.fwd.dist.is_main:
                model = unwrap_model(self.fwd.model)
                if sharded_ckpt is not None:
                    consolidate(sharded_ckpt, out_dir, model.config)
                    tokenizer.save_pretrained(out_dir)
                else:
                    save_final(model, out_dir, tokenizer)
                logger.info("final model: %s", out_dir)
            ok = True
        finally:
            self.fwd.agree(ok, "exporting the final model on rank 0")

    def _check_finite(self, what: str) -> None:
        """Raises on every rank if a weight of the policy holds inf or nan on any rank."""
        model = self.fwd.model
        bad = []
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                bad.append(name)
        if all_reduce_sum(len(bad)):
            shown = ", ".join(bad[:_MAX_NAMED]) + (
                f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
            )
            raise UserError(
                f"refusing to write the {what}: the weights hold inf or nan ({shown or 'on another rank'}); "
                "the run diverged, expected finite weights: lower lr or set max_grad_norm and resume from an "
                "earlier checkpoint"
            )


def find_resume(out_dir: Path, sharded: bool) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint in ``out_dir`` (sharded ones under fsdp2) and its ``extra`` state, read
    without loading any weights (every rank calls it); None when ``out_dir`` holds no checkpoint.

    Checkpoints that fail verification are skipped with a warning (``fastdpo.checkpoint.resume_point``).

    Raises:
        UserError: ``out_dir`` holds checkpoints but none is valid.
    """
    try:
        found = resume_point(out_dir, "sharded" if sharded else "local")
        return None if found is None else (found[0], read_extra(*found))
    except CheckpointError as err:
        raise UserError(
            f"cannot resume from {out_dir}: {err}; to start over, use resume=false (--no-resume) or a new "
            "output_dir"
        ) from err


def check_resume(
    path: Path,
    extra: Mapping[str, Any],
    config: TrainConfig,
    plan: Mapping[str, Any],
    model_identity: Mapping[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """The options ``config`` changes against checkpoint ``path``'s run, if it may resume under them.

    Args:
        path: The checkpoint, for the messages.
        extra: Its ``extra`` state: ``config`` (the run's options), ``plan`` (plan options and the
            training data's token digest) and ``model_identity`` (``fastdpo.model_identity``); older
            checkpoints lack the latter ones.
        config: The options of this run.
        plan: This run's ``plan``.
        model_identity: What identifies this run's model files, or None where nothing does (an injected
            model, a hub id not in the local cache yet): then the model's content is not compared.

    Returns:
        Option name -> ``(saved, new)`` for each change ``allow_config_change`` applies.

    Raises:
        UserError: An identity option, the model's content or the training data differs, or another option
            differs without ``allow_config_change``; the message lists every difference.
    """
    identity, changed = resume_changes(extra.get("config", {}), config)
    content = _content_change(extra.get("model_identity"), model_identity)
    if content:
        identity["model content"] = content
    saved_plan = extra.get("plan", {})
    for key, value in plan.items():
        if saved_plan.get(key) != value and key not in identity:
            if key == "data":  # the token ids' sha256, which the data options determine
                identity["data (tokenized training pairs)"] = (str(saved_plan.get(key))[:12], value[:12])
            else:
                identity[key] = (saved_plan.get(key), value)
    if identity:
        raise _identity_error(str(path), identity)
    if changed and not config.allow_config_change:
        raise UserError(
            f"cannot resume {path}: {_listing(changed)} differ from the checkpoint's run; expected the "
            "checkpoint's values, or allow_config_change=true (--allow-config-change) to apply the new ones "
            "from here on"
        )
    if changed:
        logger.warning("resuming %s with changed options: %s", path, _listing(changed))
    return changed


def _content_change(saved: Any, now: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """``(saved, new)`` summaries of the model files whose content differs, or None when it is the same
    or cannot be compared (no record on either side)."""
    if not isinstance(saved, Mapping) or now is None or now.get("revision", "") is None or saved == now:
        return None
    if "revision" in now or "revision" in saved:
        return str(saved.get("revision")), str(now.get("revision"))
    before, after = saved.get("files", {}), now.get("files", {})
    names = sorted(n for n in {*before, *after} if before.get(n) != after.get(n))

    def summary(files: Mapping[str, Any]) -> str:
        return ", ".join(
            f"{n} sha256 {str(files[n].get('sha256'))[:12]}" if n in files else f"no {n}" for n in names
        )

    return summary(before), summary(after)


def _identity_error(where: str, identity: Mapping[str, tuple[Any, Any]]) -> UserError:
    return UserError(
        f"cannot resume {where}: {_listing(identity)} differ from the checkpoint's run, so its weights and "
        "data position would mean something else; expected the same values, or a new output_dir / "
        "resume=false"
    )


def _listing(changes: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changes.items())
