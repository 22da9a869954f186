"""``Trainer``: the packed DPO training loop, read top to bottom.

One optimizer step:

1. The epoch's pairs are packed into bins of at most ``tokens_per_step`` tokens; consecutive bins form a
   step of at most ``tokens_per_optimizer_step`` tokens (``plan.epoch_plan``), so gradient accumulation is
   counted in tokens, not micro-batches.
2. Each bin of this rank is packed, run through the decoder and scored by ``FusedLinearDPOLoss`` against
   the lm_head weight (``forward.PackedForward``): logits are never materialized. Unpaired data
   (``loss_type`` kto / apo_zero_unpaired) go through ``FusedLinearKTOLoss`` instead (``kto``).
3. Each micro-batch's mean loss is weighted by its share of the step's pairs, so the accumulated gradient
   is that of the mean loss over every pair of the step.
4. Gradient clipping, AdamW, linear warmup then cosine decay; metrics under TRL's names; evaluation;
   atomic checkpoints that resume exactly (model, optimizer, scheduler, RNG, data position).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from fastdpo.distributed import wrap_model
from fastdpo.losses import LOSS_TYPES
from fastdpo.losses.kto import KTO_LOSS_TYPES
from fastdpo.model_identity import model_identity
from fastdpo.train.build import (
    add_lora,
    build_dpo_loss,
    build_optimizer,
    build_scheduler,
    join_job,
    load_model,
    logit_transform,
    prepare_model,
    resolve_device,
    seed_everything,
    warn_max_length,
)
from fastdpo.train.checkpoints import RunCheckpoints, check_resume, find_resume
from fastdpo.train.config import AUTO_TILE, AUTO_TOKENS, DTYPES, TrainConfig
from fastdpo.train.forward import PackedForward
from fastdpo.train.health import RunHealth, applied
from fastdpo.train.kto import UnpairedForward, build_kto_loss, load_unpaired_splits
from fastdpo.train.metrics import MetricsLog, summarize
from fastdpo.train.plan import epoch_plan, load_splits
from fastdpo.train.reference import precompute_reference, reference_inputs
from fastdpo.train.runlock import RunLock
from fastdpo.train.signals import StopSignals
from fastdpo.train.step import accumulate, clip_gradients

__all__ = ["Trainer", "train"]

logger = logging.getLogger("fastdpo")
# Options that fix which pairs form which step; a checkpoint cannot resume under different ones.
_PLAN_KEYS = ("seed", "tokens_per_step", "tokens_per_optimizer_step", "shared_prompt")


class Trainer:
    """Packed DPO training of one policy: ``Trainer(config).train()`` is ``fastdpo train``.

    Under torchrun (``RANK`` / ``WORLD_SIZE`` set) the process joins the job with ``init_distributed``
    and trains data-parallel as ``config.strategy`` says; otherwise it is a single process.

    Args:
        config: The run's options.
        model: An already built transformers causal LM to train instead of loading ``config.model``
            (which then only names it). It is used as it is (dtype included), moved to the device and
            prepared like a loaded one (no KV cache, dropout off, gradient checkpointing). With
            ``reference="precompute"`` and no ``ref_model``, its reference log-probs are computed but
            never read from or written to the disk cache, since nothing identifies its weights.
        tokenizer: Its tokenizer; default: loaded from ``config.tokenizer`` or ``config.model``.
        rank: Expected rank, checked against the process group (default: whatever it is).
        world_size: Expected number of ranks, checked likewise.

    Attributes:
        model: The policy as trained: wrapped by DDP / FSDP2 under those strategies, a peft model when
            ``lora_r > 0``; ``fastdpo.distributed.unwrap_model(model)`` is the transformers model.
        tokenizer: Its tokenizer.
        dist: This process's place in the job (``fastdpo.distributed.DistState``).
        step: Optimizer steps taken so far (restored on resume).
        total_steps: Steps the run will take.
        health: Applied and skipped steps so far, and the current bad streak (``RunHealth``).
        stopped_by: The signal (``signal.SIGINT`` / ``SIGTERM``) that ended the last ``train()`` early,
            else None.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: nn.Module | None = None,
        tokenizer: Any | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if model is not None and not callable(getattr(model, "get_decoder", None)):
            raise TypeError(
                f"model: expected a transformers causal LM (with get_decoder()), got {type(model).__name__}"
            )
        self.config = cfg = config
        self.dist = join_job(cfg, rank, world_size)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.out_dir = Path(cfg.output_dir)
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out_dir / "cache"
        seed_everything(cfg.seed)
        self.device = resolve_device(cfg, self.dist)
        if AUTO_TOKENS == cfg.tokens_per_step or cfg.tile_tokens == AUTO_TILE:
            from fastdpo.planner.api import resolve_auto

            self.config = cfg = resolve_auto(cfg, self.device, getattr(model, "config", None))
        auto_dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.compute_dtype = DTYPES[auto_dtype if cfg.dtype == "auto" else cfg.dtype]

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code
            )
        self.tokenizer = tokenizer
        # KTO's loss types train on unpaired rows (fastdpo.train.kto); every other one on pairs. The data
        # comes before the model, so that bad data fails before the (possibly long) model load.
        unpaired = cfg.loss_type in KTO_LOSS_TYPES
        load = load_unpaired_splits if unpaired else load_splits
        self.train_split, self.eval_split = load(cfg, tokenizer, self.cache_dir)
        injected = model is not None
        self._identify_model(injected)
        if injected:
            self.model = prepare_model(cfg, model, self.device)
        else:
            self.model = load_model(cfg, cfg.model, self.device)
        if self.model_identity == {"revision": None}:  # a hub id downloaded just now: its commit is known
            self._identify_model(injected)
        warn_max_length(cfg, self.model)

        needs_ref = unpaired or LOSS_TYPES[cfg.loss_type].needs_reference
        self.reference = cfg.reference if needs_ref else "none"
        temperature, softcap = logit_transform(self.model)
        if unpaired:
            self.loss_fn = build_kto_loss(cfg, temperature=temperature, softcap=softcap)
        else:
            self.loss_fn = build_dpo_loss(cfg, temperature=temperature, softcap=softcap)
        self.ref_model = None
        if self.reference == "model":
            self.ref_model = load_model(cfg, cfg.ref_model, self.device, trainable=False)
        if cfg.lora_r:
            self.model = add_lora(cfg, self.model)
        if cfg.strategy != "none":
            self.model = wrap_model(self.model, cfg.strategy, self.dist)
        self.forward = (UnpairedForward if unpaired else PackedForward)(
            cfg,
            self.dist,
            self.device,
            self.compute_dtype,
            self.model,
            self.loss_fn,
            temperature=temperature,
            softcap=softcap,
        )
        self.eval_bins = self.eval_split.fixed_bins(cfg.tokens_per_step) if self.eval_split else []
        if self.reference == "precompute":
            self._precompute_references(cacheable=bool(cfg.ref_model) or not injected)

        self.total_steps = cfg.max_steps or sum(len(self._epoch_plan(e)) for e in range(cfg.epochs))
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
        self.checkpoints = RunCheckpoints(self.forward, self.out_dir, self.optimizer, self.scheduler)
        self.step = self.epoch = self.step_in_epoch = self.num_tokens = 0
        self.stopped_by: int | None = None
        self.metrics_log: MetricsLog | None = None  # opened by train(), which truncates it to self.step
        resumed = self._resume_latest() if self._resume_from else None
        self.health = RunHealth(cfg.max_bad_steps, cfg.lr, resumed)

    def _identify_model(self, injected: bool) -> None:
        """Records what identifies the policy's weights and checks a resume against it (``_resume_from``).

        The identity (``fastdpo.model_identity``) goes into each checkpoint, so that a resume on weights
        replaced in place is refused like one on another model; an injected model has nothing on disk to
        identify it. A resume that would be refused is refused here, before the model loads and before any
        reference pass.
        """
        cfg = self.config
        self.model_identity = None if injected else model_identity(cfg.model, self.cache_dir)
        self._resume_from = self._check_resume() if cfg.resume else None

    def _check_resume(self) -> tuple[Path, dict[str, tuple[Any, Any]]] | None:
        """The checkpoint to resume from and the options it changes, checked from its recorded state only."""
        found = find_resume(self.out_dir, self.config.strategy == "fsdp2")
        if found is None:
            return None
        path, extra = found
        changed = check_resume(path, extra, self.config, self._plan_identity(), self.model_identity)
        return path, changed

    def _precompute_references(self, *, cacheable: bool) -> None:
        """Reference log-probs of every split: ``ref_model``'s if set, else the policy's before any update."""
        cfg, source, budget = self.config, [], self.config.tokens_per_step
        identity = model_identity(cfg.ref_model, self.cache_dir) if cfg.ref_model else self.model_identity

        def reference_model() -> nn.Module:  # loaded on the first cache miss only
            if not source:
                ref = load_model(cfg, cfg.ref_model, self.device, trainable=False) if cfg.ref_model else None
                source.append(ref or self.model)
            return source[0]

        for split in filter(None, (self.train_split, self.eval_split)):
            # The eval plan is the one evaluate() uses, so before any update the policy scores it identically.
            bins = self.eval_bins if split is self.eval_split else split.fixed_bins(budget)
            precompute_reference(
                self.forward,
                split,
                bins,
                cache_dir=self.cache_dir,
                cacheable=cacheable,
                model_identity=identity,
                source=reference_model,
            )

    def _epoch_plan(self, epoch: int) -> list[list[np.ndarray]]:
        """The epoch's optimizer steps, each a list of bins (of all ranks), deterministic in (seed, epoch)."""
        split = self.train_split
        return epoch_plan(split.tokens, self.config, epoch, self.world_size, split.bins)

    # ------------------------------------------------------------------ training

    def train(self, *, stop_after: int | None = None) -> dict[str, dict[str, float]]:
        """Runs the remaining optimizer steps, evaluating, logging and checkpointing on the way.

        It holds ``output_dir``'s lock (``RunLock``, rank 0 for the whole job) while it runs, so that a
        second run on the folder fails at once instead of interleaving checkpoints and metrics.

        A step whose loss or gradient norm is not finite is not applied (logged as ``split: skipped``);
        after ``max_bad_steps`` of them (or of steps with a gradient norm of 0) in a row the run stops with a
        ``UserError``, and so does a run whose last step was skipped or that applied none (``RunHealth``).
        SIGINT / SIGTERM end the run after the current step with a checkpoint, and ``stopped_by`` names the
        signal.

        Args:
            stop_after: Return right after this global step, as if the job were killed there (no final
                evaluation or export); the next ``Trainer`` with ``resume=True`` carries on.

        Returns:
            ``{"train": last logged train metrics, "eval": last eval metrics, "steps": {"applied",
            "skipped"}}`` (this Trainer's steps); ``eval`` only with eval pairs, ``train`` only once an
            applied step was logged.

        Raises:
            UserError: Another run holds ``output_dir``; a bad streak or a dishonest end (see above).
        """
        with RunLock(self.out_dir, enabled=self.dist.is_main):
            return self._train(stop_after)

    def _train(self, stop_after: int | None) -> dict[str, dict[str, float]]:
        cfg = self.config
        self._write_config()
        if self.metrics_log is None:
            self.metrics_log = MetricsLog(
                self.out_dir, self.step, enabled=self.dist.is_main, tensorboard=cfg.tensorboard
            )
        result: dict[str, dict[str, float]] = {}
        pending: list[dict[str, float]] = []
        evaluated_at = saved_at = -1
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=self.forward.name,
            dynamic_ncols=True,
            disable=not (cfg.progress and self.dist.is_main),
        )
        self.model.train()
        with StopSignals(cfg.save_every_minutes) as signals:
            while self.step < self.total_steps:
                plan = self._epoch_plan(self.epoch)
                while self.step_in_epoch < len(plan) and self.step < self.total_steps:
                    metrics = self._step_or_explain(plan[self.step_in_epoch])
                    self.step += 1
                    self.step_in_epoch += 1
                    bar.update(1)
                    if self.health.step(self.step, metrics, self.metrics_log):
                        metrics["epoch"] = self.epoch + self.step_in_epoch / len(plan)
                        pending.append(metrics)
                        # shown[1]: DPO's reward accuracy ("acc"), KTO's KL term ("kl").
                        second = self.forward.shown[1]
                        bar.set_postfix(
                            loss=f"{metrics['loss']:.4f}",
                            **{second.split("/")[-1][:3]: f"{metrics.get(second, math.nan):.2f}"},
                            tok_s=f"{metrics['tokens_per_second']:.0f}",
                        )
                    if pending and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                        result["train"] = summarize(pending)
                        self.metrics_log.log(self.step, "train", result["train"])
                        pending = []
                    if self.eval_split is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                        result["eval"] = self._log_eval()
                        evaluated_at = self.step
                    stop, save_due = signals.poll(self.dist.is_main)
                    if stop is not None or save_due or (cfg.save_every and self.step % cfg.save_every == 0):
                        # A bad streak's weights must never become the resume point (``latest``), nor make
                        # keep_last prune the last good checkpoint: none is written until the streak ends.
                        if self.health.in_streak:
                            self.health.skip_save(self.step)
                        else:
                            self.save()
                            saved_at = self.step
                        signals.saved()
                    if stop is not None:
                        self.stopped_by = stop
                        logger.warning(
                            "stopped by %s after step %d; checkpoint %s; rerun the same command to resume",
                            signal.Signals(stop).name,
                            self.step,
                            self.health.good_checkpoint or "none (a rerun starts over)",
                        )
                    if stop is not None or (stop_after is not None and self.step >= stop_after):
                        bar.close()
                        self.metrics_log.flush()
                        return result
                if self.step_in_epoch >= len(plan):
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
        bar.close()
        self.metrics_log.flush()
        self.health.check_end(self.step)
        if self.eval_split is not None and evaluated_at != self.step:
            result["eval"] = self._log_eval()
        if cfg.save_every and saved_at != self.step and self.step > 0 and not self.health.in_streak:
            self.save()
        if cfg.save_model:
            self._export(self.out_dir / "final")
        self.metrics_log.flush()
        result["steps"] = {"applied": float(self.health.applied), "skipped": float(self.health.skipped)}
        return result

    def _write_config(self) -> None:
        """Records the options this run uses in ``output_dir/config.yaml`` (rank 0)."""
        if self.dist.is_main:
            import yaml

            self.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.out_dir / f".config.yaml.{os.getpid()}.tmp"
            tmp.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False), encoding="utf-8")
            os.replace(tmp, self.out_dir / "config.yaml")

    def _step_or_explain(self, bins: list[np.ndarray]) -> dict[str, float]:
        """Runs ``_train_step``; across ranks a failure names the step and rank and points at the peers."""
        try:
            return self._train_step(bins)
        except RuntimeError as err:
            if self.world_size == 1:
                raise
            raise RuntimeError(
                f"training step {self.step + 1} failed on rank {self.rank} of {self.world_size}: when "
                "another rank crashed, was killed or stalled past the process-group timeout, its own error "
                f"is the cause ({err})"
            ) from err

    def _train_step(self, bins: list[np.ndarray]) -> dict[str, float]:
        """One optimizer step over ``bins`` (all ranks'); returns the step's metrics."""
        start = time.perf_counter()
        fwd, split = self.forward, self.train_split
        step_tokens = sum(int(split.tokens[b].sum()) for b in bins)
        sums, local_pairs = accumulate(
            fwd,
            self.model,
            split,
            bins,
            reference=self.reference,
            ref_model=self.ref_model,
            world_size=self.world_size,
        )
        metrics = fwd.global_means(sums, local_pairs)
        metrics["grad_norm"] = float(clip_gradients(self.model, self.config.max_grad_norm))
        lr = self.optimizer.param_groups[0]["lr"]
        # The loss and the norm are global (reduced over ranks), so every rank makes the same choice. A
        # skipped step still advances the schedule: the LR stays a function of the step.
        if applied(metrics):
            self.optimizer.step()
            self.scheduler.step()
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`", UserWarning)
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_tokens += step_tokens
        elapsed = time.perf_counter() - start
        metrics.update(
            learning_rate=lr,
            num_tokens=float(self.num_tokens),
            tokens_per_second=step_tokens / elapsed,
        )
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics (``METRIC_NAMES``; unpaired data: ``KTO_METRIC_NAMES``) over every held-out pair, in eval
        mode and without gradients."""
        if self.eval_split is None:
            raise ValueError("evaluate: no eval pairs; set eval_data, eval_split or eval_fraction")
        fwd, split = self.forward, self.eval_split
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(len(fwd.metric_names), device=self.device)
        local_pairs = 0
        for b, real in fwd.shard(self.eval_bins, split.tokens):
            batch = fwd.batch(split, b)
            out = fwd.loss(batch, reference_inputs(fwd, self.reference, self.ref_model, split, b, batch))
            if real:
                sums += fwd.pair_sums(out, batch.num_pairs)
                local_pairs += batch.num_pairs
        fwd.release(self.model)
        self.model.train(was_training)
        return fwd.global_means(sums, local_pairs)

    def _log_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        self.metrics_log.log(self.step, "eval", metrics)
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in self.forward.shown if k in metrics)
        logger.info("step %d eval: %s", self.step, shown)
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def _plan_identity(self) -> dict[str, Any]:
        return {**{k: getattr(self.config, k) for k in _PLAN_KEYS}, "data": self.train_split.digest}

    def save(self) -> Path:
        """Writes an atomic checkpoint of the current step into ``output_dir``; every rank calls it.

        Under fsdp2 every rank writes its shards (``save_sharded``); otherwise rank 0 writes the whole
        state (``save_checkpoint``) while the others wait for it. Non-finite weights are refused.
        """
        data_state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}
        extra = {
            "plan": self._plan_identity(),
            "num_tokens": self.num_tokens,
            "config": self.config.to_dict(),
            "model_identity": self.model_identity,
        }
        path = self.checkpoints.save(self.step, data_state, extra)
        self.health.saved(path)
        return path

    def _resume_latest(self) -> Path:
        """Restores the checkpoint ``_check_resume`` found and accepted (the same on every rank).

        Options that differ from the checkpoint's run were refused there, or with ``allow_config_change``
        are applied from here on: the LR schedule is rebuilt from the new ``lr``, warmup and run length.
        """
        path, changed = self._resume_from
        state = self.checkpoints.restore(path)
        self.step = state["step"]
        self.epoch = state["data_state"]["epoch"]
        self.step_in_epoch = state["data_state"]["step_in_epoch"]
        self.num_tokens = state["extra"]["num_tokens"]
        if changed:
            cfg = self.config
            for group, decay in zip(self.optimizer.param_groups, (cfg.weight_decay, 0.0), strict=True):
                group.update(initial_lr=cfg.lr, weight_decay=decay)
            self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps, last_step=self.step)
            self.checkpoints.scheduler = self.scheduler
        logger.info("resumed from %s at step %d", path, self.step)
        return path

    def _export(self, out_dir: Path) -> None:
        """Writes the trained model and tokenizer as a ``from_pretrained`` folder; every rank calls it."""
        ckpt = None
        if self.config.strategy == "fsdp2":
            ckpt = self.checkpoints.sharded_at(self.step) or self.save()
        self.checkpoints.export(out_dir, self.tokenizer, ckpt)


def train(config: TrainConfig) -> dict[str, dict[str, float]]:
    """Runs ``fastdpo train``: ``Trainer(config).train()`` holding ``output_dir``'s lock (``RunLock``).

    Raises:
        SystemExit: With status 130 (SIGINT) or 143 (SIGTERM) when a signal stopped the run; its
            checkpoint was written first.
    """
    # Rank 0 alone takes the lock: the job's other ranks share the folder with it. It is held from before
    # the reference pass and the resume; Trainer.train() takes it again, which nests (RunLock).
    with RunLock(config.output_dir, enabled=os.environ.get("RANK", "0") in ("", "0")):
        trainer = Trainer(config)
        result = trainer.train()
    if trainer.stopped_by is not None:
        raise SystemExit(128 + trainer.stopped_by)
    return result
