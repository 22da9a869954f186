"""The packed DPO trainer behind ``fastdpo train`` and ``fastdpo demo``, readable top to bottom.

One optimizer step:

1. The epoch's pairs are packed into bins of at most ``tokens_per_step`` tokens (``plan_bins`` over pair
   token counts, first-fit-decreasing); consecutive bins form a step of at most
   ``tokens_per_optimizer_step`` tokens, so gradient accumulation is counted in tokens, not micro-batches.
2. Each bin of this rank is packed (``pack_pairs``), run through the decoder (``packed_hidden_states``)
   and scored by ``FusedLinearDPOLoss`` against the lm_head weight: logits are never materialized.
3. Each micro-batch's mean loss is weighted by its share of the step's pairs, so the accumulated
   gradient is that of the mean loss over every pair of the step.
4. Gradient clipping, AdamW, linear warmup then cosine decay; metrics under TRL's names; evaluation;
   atomic checkpoints that resume exactly (model, optimizer, scheduler, RNG, data position).

Reference log-probs (``reference``): ``precompute`` runs one no-grad pass over the data before training
and caches the result on disk (safetensors, keyed by model, data and options); ``model`` runs a frozen
reference model (``ref_model``) next to the policy; ``adapter`` runs the policy itself with its LoRA
adapters disabled; ``none`` trains reference-free. Loss types without a reference (``simpo``, ``orpo``,
``sft``) ignore it.

Limited VRAM: ``gradient_checkpointing`` keeps only each decoder layer's input and recomputes the rest
in the backward. ``offload_activations`` wraps the decoder forward in
``torch.autograd.graph.save_on_cpu``: every tensor autograd saves there, which under (non-reentrant)
checkpointing is essentially each layer's ``[N, D]`` input, is copied to CPU memory (pinned on CUDA)
and copied back during the backward. It trades host-device traffic for memory; use it with
``gradient_checkpointing``, since without it every intermediate activation would travel.

Data parallelism (``strategy`` ddp / fsdp2, launched by torchrun) uses ``fastdpo.distributed``: every
rank plans the same steps, ``shard_bins`` gives each rank a balanced share of each step's bins (padded
with loss-times-zero micro-batches so that all ranks run as many), gradients synchronize on the last
micro-batch only, and each micro-batch's loss is scaled by ``pairs * world_size / step_pairs`` because
DDP and FSDP2 average gradients over ranks: the update is that of the mean over all pairs of the step.
Metrics are combined with ``gather_metrics``; only rank 0 logs and writes files. Checkpoints are
``fastdpo.checkpoint``'s (rank 0) under none / ddp and DCP sharded ones (``save_sharded``) under fsdp2,
whose final export is consolidated into one ``from_pretrained`` folder.

Single node: ``torchrun --nproc_per_node=8 -m fastdpo train --strategy fsdp2 --config run.yaml``.
Multi node: the same on every node with ``--nnodes=2 --node_rank=<i> --master_addr=<node 0>
--master_port=29500`` (``output_dir`` on a filesystem every node sees).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import random
import time
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from fastdpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from fastdpo.data import load_preference_data, tokenize_preferences
from fastdpo.distributed import (
    STRATEGIES,
    DistState,
    all_reduce_sum,
    consolidate,
    gather_metrics,
    gradient_sync,
    init_distributed,
    latest_sharded,
    load_sharded,
    save_sharded,
    shard_bins,
    unsharded_lm_head,
    unwrap_model,
    wrap_model,
)
from fastdpo.losses import LOSS_TYPES, FusedLinearDPOLoss, PreferenceLossOutput, sequence_logps
from fastdpo.modeling import ATTN_BACKENDS, packed_hidden_states, reference_context
from fastdpo.packing import PackedBatch, pack_pairs, pair_num_tokens, plan_bins

__all__ = ["METRIC_NAMES", "TrainConfig", "Trainer", "train"]

logger = logging.getLogger("fastdpo")

# Per-pair metrics, averaged over the pairs of a step (or of the eval set), under TRL's names.
METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
REFERENCE_MODES = ("precompute", "model", "adapter", "none")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Options that fix which pairs form which step; a checkpoint cannot resume under different ones.
_PLAN_KEYS = ("seed", "tokens_per_step", "tokens_per_optimizer_step", "shared_prompt")
_REF_CACHE_VERSION = 1


def _opt(default: Any, help: str) -> Any:
    """A config field with its ``--help`` text; list defaults are copied per instance."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a ``fastdpo train`` run needs; strings from YAML or the command line are coerced to each
    field's type, and invalid values raise ``ValueError`` / ``TypeError`` naming the field."""

    # Model
    model: str = _opt(
        "", "policy model: a local folder (or hub id) for AutoModelForCausalLM, safetensors only"
    )
    tokenizer: str | None = _opt(None, "tokenizer folder or id; default: the model's")
    ref_model: str | None = _opt(
        None,
        "reference model (reference=model, or precompute from it); default: the policy's initial weights",
    )
    trust_remote_code: bool = _opt(False, "allow model/tokenizer code from the model folder or hub")
    param_dtype: str = _opt(
        "fp32", "dtype the weights are loaded in: fp32, or bf16 (e.g. a frozen LoRA base)"
    )
    dtype: str = _opt("auto", "compute dtype: auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32")
    device: str = _opt("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    attn_backend: str | None = _opt(None, f"packed attention: one of {ATTN_BACKENDS}; default: the model's")
    backend: str | None = _opt(None, "fused head/loss kernels: triton or torch; default: triton on CUDA")
    strategy: str = _opt(
        "none",
        "data parallelism under torchrun: none (one process), ddp (replicated weights) or fsdp2 (weights, "
        "gradients and optimizer state sharded over ranks)",
    )
    gradient_checkpointing: bool = _opt(False, "recompute each decoder layer in the backward to save memory")
    offload_activations: bool = _opt(
        False,
        "move the activations autograd saves in the decoder to CPU memory (save_on_cpu); pair with "
        "gradient_checkpointing",
    )
    disable_dropout: bool = _opt(True, "set every nn.Dropout to p=0, as TRL does for DPO")
    # LoRA
    lora_r: int = _opt(0, "LoRA rank; 0 trains all weights")
    lora_alpha: float = _opt(16.0, "LoRA alpha")
    lora_dropout: float = _opt(0.0, "LoRA dropout")
    lora_target_modules: list[str] = _opt(list(_DEFAULT_LORA_TARGETS), "modules that get LoRA adapters")
    # Data
    data: str = _opt(
        "", "training pairs: .jsonl/.json/.parquet or a save_to_disk folder (TRL or ShareGPT rows)"
    )
    split: str = _opt("train", "split to read from a dataset dict")
    eval_data: str | None = _opt(None, "held-out pairs in a separate file or folder")
    eval_split: str | None = _opt(None, "held-out split (e.g. test) of eval_data, or else of data")
    eval_fraction: float = _opt(0.0, "fraction of the training pairs held out for evaluation")
    skip_invalid: bool = _opt(False, "drop invalid rows (counted in the data report) instead of failing")
    max_length: int = _opt(1024, "token limit of prompt + each response")
    max_prompt_length: int | None = _opt(512, "token limit of the prompt")
    truncation_mode: str = _opt("keep_end", "which end of a long prompt survives: keep_end or keep_start")
    shared_prompt: bool = _opt(True, "pack each pair's prompt once, shared by its two responses")
    tokens_per_step: int = _opt(8192, "token budget of one packed micro-batch (at least 2 * max_length)")
    tokens_per_optimizer_step: int = _opt(
        0, "token budget of one optimizer step over all micro-batches (gradient accumulation); 0: one bin"
    )
    cache_dir: str | None = _opt(
        None, "tokenization and reference log-prob cache; default: <output_dir>/cache"
    )
    # Loss
    beta: float = _opt(0.1, "DPO beta")
    loss_type: str = _opt("sigmoid", f"one of {list(LOSS_TYPES)}")
    label_smoothing: float = _opt(0.0, "label smoothing of the robust / exo_pair / aot losses")
    reference: str = _opt("precompute", f"reference log-probs: one of {list(REFERENCE_MODES)}")
    # Optimization
    lr: float = _opt(1e-6, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay of matrices (biases and norms get none)")
    warmup_ratio: float = _opt(0.1, "fraction of the steps with linear warmup")
    warmup_steps: int = _opt(0, "warmup steps; overrides warmup_ratio when > 0")
    min_lr_ratio: float = _opt(0.0, "the cosine decays to lr * min_lr_ratio")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 disables clipping")
    max_steps: int = _opt(0, "optimizer steps; 0: run `epochs` epochs")
    epochs: int = _opt(1, "passes over the training pairs when max_steps is 0")
    seed: int = _opt(42, "seed of the data order, LoRA init and global RNGs")
    # Run
    output_dir: str = _opt("runs/fastdpo", "checkpoints, metrics.jsonl, TensorBoard logs and the final model")
    log_every: int = _opt(10, "log train metrics (averaged over the interval) every N steps")
    eval_every: int = _opt(0, "evaluate every N steps; 0: only at the end")
    save_every: int = _opt(500, "checkpoint every N steps; 0: never")
    keep_last: int = _opt(2, "checkpoints to keep")
    resume: bool = _opt(True, "continue from the latest checkpoint in output_dir")
    save_model: bool = _opt(True, "export <output_dir>/final (from_pretrained-loadable) at the end")
    tensorboard: bool = _opt(True, "also log to TensorBoard under <output_dir>/tb, if installed")
    progress: bool = _opt(True, "show a progress bar")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self._validate()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Builds a config from a mapping (e.g. parsed YAML); unknown keys raise ``ValueError``."""
        if not isinstance(values, Mapping):
            raise TypeError(
                f"config: expected a mapping of option names to values, got {type(values).__name__}"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            described = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), names, n=1)
                described.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            raise ValueError(f"unknown config option(s) {', '.join(described)}; expected some of {names}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain Python values (YAML/JSON-serializable)."""
        return dataclasses.asdict(self)

    def _validate(self) -> None:
        def check(ok: bool, name: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

        check(bool(self.model), "model", "a model folder or id")
        check(bool(self.data), "data", "a preference data file or folder")
        check(self.param_dtype in _DTYPES, "param_dtype", f"one of {list(_DTYPES)}")
        check(self.dtype in ("auto", *_DTYPES), "dtype", f"one of {['auto', *_DTYPES]}")
        check(
            self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
            "device",
            "auto, cpu, cuda[:N]",
        )
        check(
            self.attn_backend is None or self.attn_backend in ATTN_BACKENDS,
            "attn_backend",
            f"one of {ATTN_BACKENDS}",
        )
        check(self.backend in (None, "triton", "torch"), "backend", "triton or torch")
        check(self.strategy in STRATEGIES, "strategy", f"one of {list(STRATEGIES)}")
        check(
            self.strategy != "fsdp2" or self.lora_r == 0,
            "strategy",
            "none or ddp with LoRA (lora_r > 0); fsdp2 exports full weights only",
        )
        check(self.lora_r >= 0, "lora_r", "an int >= 0")
        check(self.lora_alpha > 0, "lora_alpha", "a float > 0")
        check(0 <= self.lora_dropout < 1, "lora_dropout", "a float in [0, 1)")
        check(not self.lora_r or bool(self.lora_target_modules), "lora_target_modules", "at least one module")
        check(0 <= self.eval_fraction < 1, "eval_fraction", "a float in [0, 1)")
        if self.eval_fraction and (self.eval_data or self.eval_split):
            raise ValueError(
                "eval_fraction: expected 0 when eval_data or eval_split names the eval pairs, "
                f"got {self.eval_fraction}"
            )
        check(self.max_length >= 2, "max_length", "an int >= 2")
        check(
            self.max_prompt_length is None or self.max_prompt_length >= 1,
            "max_prompt_length",
            "None or an int >= 1",
        )
        check(self.truncation_mode in ("keep_end", "keep_start"), "truncation_mode", "keep_end or keep_start")
        check(
            self.tokens_per_step >= 2 * self.max_length,
            "tokens_per_step",
            f"an int >= 2 * max_length = {2 * self.max_length}, so that every pair fits a bin",
        )
        check(
            self.tokens_per_optimizer_step == 0 or self.tokens_per_optimizer_step >= self.tokens_per_step,
            "tokens_per_optimizer_step",
            f"0 or an int >= tokens_per_step = {self.tokens_per_step}",
        )
        check(self.beta > 0, "beta", "a float > 0")
        check(self.loss_type in LOSS_TYPES, "loss_type", f"one of {list(LOSS_TYPES)}")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "a float in [0, 1)")
        check(self.reference in REFERENCE_MODES, "reference", f"one of {list(REFERENCE_MODES)}")
        check(
            self.reference != "model" or bool(self.ref_model),
            "ref_model",
            "a model path when reference=model",
        )
        check(self.reference != "adapter" or self.lora_r > 0, "lora_r", "> 0 when reference=adapter")
        check(self.lr > 0, "lr", "a float > 0")
        check(self.weight_decay >= 0, "weight_decay", "a float >= 0")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "a float in [0, 1)")
        check(self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a float in [0, 1]")
        check(self.max_grad_norm >= 0, "max_grad_norm", "a float >= 0")
        check(self.max_steps >= 0, "max_steps", "an int >= 0")
        check(self.epochs >= 1, "epochs", "an int >= 1")
        check(self.log_every >= 1, "log_every", "an int >= 1")
        for name in ("eval_every", "save_every"):
            check(getattr(self, name) >= 0, name, "an int >= 0")
        check(self.keep_last >= 1, "keep_last", "an int >= 1")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``; strings (command line, YAML's ``1e-5``) are parsed."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        (hint,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{name}: expected a list of strings (or 'a,b,c'), got {value!r}")
        return list(value)
    if hint is bool:
        if isinstance(value, str) and value.strip().lower() in (
            "true",
            "yes",
            "on",
            "1",
            "false",
            "no",
            "off",
            "0",
        ):
            return value.strip().lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise TypeError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                raise ValueError(f"{name}: expected {hint.__name__}, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
        if hint is int and value != int(value):
            raise ValueError(f"{name}: expected an int, got {value!r}")
        return hint(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type(value).__name__} {value!r}")
    return value


@dataclass
class _Split:
    """Tokenized pairs of one split and what the loop derives from them."""

    name: str
    data: Any  # datasets.Dataset with prompt_ids / chosen_ids / rejected_ids
    tokens: np.ndarray  # [n] packed token count of each pair
    digest: str  # hash of the token ids, for the reference cache key
    ref_chosen: torch.Tensor | None = None  # [n] precomputed reference log-probs
    ref_rejected: torch.Tensor | None = None

    def pairs(self, indices: np.ndarray) -> list[dict[str, list[int]]]:
        rows = self.data[indices.tolist()]
        keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        return [dict(zip(keys, values, strict=True)) for values in zip(*(rows[k] for k in keys), strict=True)]


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
        self.dist = self._join_job(rank, world_size)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.out_dir = Path(cfg.output_dir)
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out_dir / "cache"
        _seed_everything(cfg.seed)
        if cfg.strategy != "none":
            self.device = self.dist.device
        elif cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        auto_dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.compute_dtype = _DTYPES[auto_dtype if cfg.dtype == "auto" else cfg.dtype]

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code
            )
        self.tokenizer = tokenizer
        self._injected_model = model is not None
        self.model = self._prepare_model(model) if model is not None else self._load_model(cfg.model)
        self.train_split, self.eval_split = self._load_data()

        needs_ref = LOSS_TYPES[cfg.loss_type].needs_reference
        self.reference = cfg.reference if needs_ref else "none"
        self.temperature, self.softcap = _logit_transform(self.model)
        self.loss_fn = FusedLinearDPOLoss(
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            label_smoothing=cfg.label_smoothing,
            reference_free=needs_ref and cfg.reference == "none",
            temperature=self.temperature,
            softcap=self.softcap,
            backend=cfg.backend,
        )
        self.ref_model = None
        if self.reference == "model":
            self.ref_model = self._load_model(cfg.ref_model, trainable=False)
        if cfg.lora_r:
            self.model = self._add_lora(self.model)
        if cfg.strategy != "none":
            self.model = wrap_model(self.model, cfg.strategy, self.dist)
        self.eval_bins = self._plan_bins(self.eval_split.tokens, None) if self.eval_split else []
        if self.reference == "precompute":
            source: list[nn.Module] = []  # the reference model, loaded on the first cache miss only
            for split in filter(None, (self.train_split, self.eval_split)):
                self._precompute_reference(split, source)

        self.total_steps = cfg.max_steps or sum(len(self._epoch_plan(e)) for e in range(cfg.epochs))
        self.optimizer = self._build_optimizer()
        warmup = cfg.warmup_steps or round(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: _warmup_cosine(s, warmup=warmup, total=self.total_steps, min_ratio=cfg.min_lr_ratio),
        )
        self.step = self.epoch = self.step_in_epoch = self.num_tokens = 0
        if cfg.resume:
            self._resume_latest()
        self._writer = self._open_tensorboard() if self._is_main else None

    # ------------------------------------------------------------------ set-up

    def _join_job(self, rank: int | None, world_size: int | None) -> DistState:
        """Joins the torchrun job (or describes one process) and checks it against the config and args."""
        cfg = self.config
        state = init_distributed(backend="gloo" if cfg.device == "cpu" else None)
        if (rank is not None and rank != state.rank) or (
            world_size is not None and world_size != state.world_size
        ):
            raise ValueError(
                f"rank={rank}, world_size={world_size}: expected this process's place in the job, rank "
                f"{state.rank} of {state.world_size} (launch several ranks with torchrun)"
            )
        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        if state.world_size > 1 and cfg.strategy == "none":
            raise ValueError(
                f"strategy: expected ddp or fsdp2 with {state.world_size} ranks, got 'none' (each rank would "
                "train its own copy)"
            )
        if cfg.strategy != "none" and not grouped:
            raise ValueError(
                f"strategy: {cfg.strategy!r} needs a process group; launch with torchrun "
                f"(torchrun --nproc_per_node=K -m fastdpo train --strategy {cfg.strategy} ...) or use 'none'"
            )
        return state

    def _load_model(self, path: str, *, trainable: bool = True) -> nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_DTYPES[self.config.param_dtype],
            use_safetensors=True,
            trust_remote_code=self.config.trust_remote_code,
        )
        return self._prepare_model(model, trainable=trainable)

    def _prepare_model(self, model: nn.Module, *, trainable: bool = True) -> nn.Module:
        # FSDP2 moves the policy to the device one sharded unit at a time, so it stays where it is.
        if not (trainable and self.config.strategy == "fsdp2"):
            model = model.to(self.device)
        model.config.use_cache = False
        if self.config.disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        if not trainable:
            model.eval().requires_grad_(False)
        elif self.config.gradient_checkpointing:
            # Non-reentrant checkpointing saves each layer's input through autograd's saved-tensor hooks,
            # which is what lets offload_activations move those inputs to CPU.
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        return model

    def _add_lora(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    def _load_data(self) -> tuple[_Split, _Split | None]:
        cfg = self.config
        train, held_out = self._tokenize(cfg.data, cfg.split), None
        if cfg.eval_data or cfg.eval_split:
            held_out = self._tokenize(cfg.eval_data or cfg.data, cfg.eval_split or cfg.split)
        elif cfg.eval_fraction:
            order = np.random.default_rng(cfg.seed).permutation(len(train))
            num_eval = max(1, round(cfg.eval_fraction * len(train)))
            if num_eval >= len(train):
                raise ValueError(
                    f"eval_fraction: {cfg.eval_fraction} of {len(train)} pairs leaves none to train on"
                )
            train, held_out = train.select(np.sort(order[num_eval:])), train.select(np.sort(order[:num_eval]))
        return self._split("train", train), None if held_out is None else self._split("eval", held_out)

    def _tokenize(self, source: str, split: str) -> Any:
        cfg = self.config
        raw, report = load_preference_data(source, split=split, skip_invalid=cfg.skip_invalid)
        logger.info("%s [%s]: %s", source, split, report)
        data, report = tokenize_preferences(
            raw,
            self.tokenizer,
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            truncation_mode=cfg.truncation_mode,
            cache_dir=self.cache_dir,
        )
        logger.info("%s [%s] tokenized: %s", source, split, report)
        if len(data) == 0:
            raise ValueError(f"{source} [{split}]: no usable preference pairs after tokenization ({report})")
        return data

    def _split(self, name: str, data: Any) -> _Split:
        columns = data.with_format("arrow")
        lens = [
            pc.list_value_length(columns[k]).to_numpy() for k in ("prompt_ids", "chosen_ids", "rejected_ids")
        ]
        tokens = pair_num_tokens(*lens, shared_prompt=self.config.shared_prompt)
        digest = hashlib.sha256()
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            digest.update(np.ascontiguousarray(pc.list_value_length(columns[k]).to_numpy()).tobytes())
            digest.update(np.ascontiguousarray(pc.list_flatten(columns[k]).to_numpy()).tobytes())
        return _Split(name, data, tokens, digest.hexdigest())

    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": self.config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.999), eps=1e-8)

    def _open_tensorboard(self) -> Any:
        if not self.config.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed; logging to metrics.jsonl only")
            return None
        return SummaryWriter(self.out_dir / "tb")

    # ------------------------------------------------------------------ planning

    def _plan_bins(self, tokens: np.ndarray, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Pair indices of each bin; ``rng`` shuffles ties and the bin order (None: a fixed plan)."""
        perm = rng.permutation(tokens.size) if rng is not None else np.arange(tokens.size)
        offsets, order = plan_bins(tokens[perm], self.config.tokens_per_step)
        bins = [perm[order[a:b]] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        if rng is not None:
            bins = [bins[i] for i in rng.permutation(len(bins))]
        return bins

    def _epoch_plan(self, epoch: int) -> list[list[np.ndarray]]:
        """The epoch's optimizer steps, each a list of bins (of all ranks), deterministic in (seed, epoch)."""
        tokens = self.train_split.tokens
        budget = self.config.tokens_per_optimizer_step or self.config.tokens_per_step
        steps: list[list[np.ndarray]] = []
        current: list[np.ndarray] = []
        used = 0
        for b in self._plan_bins(tokens, np.random.default_rng([self.config.seed, epoch])):
            size = int(tokens[b].sum())
            if current and used + size > budget and len(current) >= self.world_size:
                steps.append(current)
                current, used = [], 0
            current.append(b)
            used += size
        steps.append(current)
        return steps

    # ------------------------------------------------------------------ distributed plumbing

    @property
    def _is_main(self) -> bool:
        return self.dist.is_main

    def _shard(self, bins: Sequence[np.ndarray], tokens: np.ndarray) -> list[tuple[np.ndarray, bool]]:
        """This rank's ``(pair indices, real)`` micro-batches of ``bins``, as many on every rank.

        ``shard_bins`` balances tokens over ranks; a padding micro-batch (``real`` False) reruns a bin so
        that the collectives of all ranks match, and must not count (loss times 0, weight 0).
        """
        plan = shard_bins([int(tokens[b].sum()) for b in bins], self.dist)
        return [(bins[i], True) if i >= 0 else (bins[0], False) for i in plan]

    def _global_means(self, sums: torch.Tensor, pairs: int) -> dict[str, float]:
        """Means over the pairs of all ranks of ``METRIC_NAMES`` from this rank's ``pairs`` and their sums."""
        local = (sums / pairs).tolist() if pairs else [0.0] * len(METRIC_NAMES)
        means = gather_metrics(dict(zip(METRIC_NAMES, local, strict=True)), pairs)
        return {k: means[k] for k in METRIC_NAMES}

    def _agree(self, ok: bool, what: str) -> None:
        """Waits for every rank; raises on every rank if ``what`` failed on another one."""
        if self.world_size == 1:
            return
        failed = all_reduce_sum(int(not ok))
        if failed and ok:
            raise RuntimeError(f"{what} failed on {failed} other rank(s); see their errors")

    def _hidden(self, model: nn.Module, batch: PackedBatch, *, offload: bool = False) -> torch.Tensor:
        """Final hidden states ``[N, D]`` of ``batch`` (the decoder call runs the DDP / FSDP2 forward)."""
        with self._compute(offload=offload):
            return packed_hidden_states(unwrap_model(model), batch, attn_backend=self.config.attn_backend)

    def _release(self, model: nn.Module) -> None:
        """Frees FSDP2's gathered root unit after no-grad forwards, which no post-backward reshards."""
        if self.config.strategy == "fsdp2" and model is self.model:
            model.reshard()

    # ------------------------------------------------------------------ forward

    @contextmanager
    def _compute(self, *, offload: bool = False) -> Iterator[None]:
        with ExitStack() as stack:
            if self.compute_dtype != torch.float32:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.compute_dtype))
            if offload:
                stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda"))
            yield

    def _batch(self, split: _Split, indices: np.ndarray) -> PackedBatch:
        return pack_pairs(split.pairs(indices), shared_prompt=self.config.shared_prompt).to(self.device)

    def _reference_kwargs(self, split: _Split, indices: np.ndarray, batch: PackedBatch) -> dict[str, Any]:
        if self.reference == "none":
            return {}
        if self.reference == "precompute":
            idx = torch.from_numpy(indices)
            return {
                "ref_chosen_logps": split.ref_chosen[idx].to(self.device),
                "ref_rejected_logps": split.ref_rejected[idx].to(self.device),
            }
        model = self.ref_model if self.reference == "model" else self.model
        was_training = model.training
        model.eval()
        try:
            with (
                torch.no_grad(),
                reference_context(unwrap_model(model)) if self.reference == "adapter" else nullcontext(),
            ):
                hidden = self._hidden(model, batch)
                with unsharded_lm_head(model) as (weight, bias):
                    return {
                        "ref_hidden": hidden,
                        "ref_weight": weight.detach(),
                        "ref_bias": None if bias is None else bias.detach(),
                    }
        finally:
            model.train(was_training)

    def _loss(self, split: _Split, indices: np.ndarray, batch: PackedBatch) -> PreferenceLossOutput:
        ref = self._reference_kwargs(split, indices, batch)
        offload = self.config.offload_activations and torch.is_grad_enabled()
        hidden = self._hidden(self.model, batch, offload=offload)
        with unsharded_lm_head(self.model) as (weight, bias), self._compute():
            return self.loss_fn(
                hidden,
                weight,
                batch.labels,
                bias,
                seq_index=batch.seq_index,
                num_pairs=batch.num_pairs,
                **ref,
            )

    @staticmethod
    def _pair_sums(out: PreferenceLossOutput, num_pairs: int) -> torch.Tensor:
        """Sums over the batch's pairs of each of ``METRIC_NAMES``."""
        c, r = out.chosen_rewards, out.rejected_rewards
        return torch.stack(
            [
                out.loss.detach().float() * num_pairs,
                c.sum(),
                r.sum(),
                (c > r).float().sum(),
                (c - r).sum(),
                out.chosen_logps.sum(),
                out.rejected_logps.sum(),
            ]
        )

    # ------------------------------------------------------------------ reference pass

    def _precompute_reference(self, split: _Split, source: list[nn.Module]) -> None:
        """Fills ``split.ref_chosen / ref_rejected`` from the disk cache, or by one no-grad pass.

        The pass runs ``ref_model`` if set (loaded into ``source`` once), else the policy before any update.
        Each rank scores its share of the bins into a zero table and the tables are summed over ranks.
        An injected policy without ``ref_model`` bypasses the cache: nothing on disk names its weights.
        """
        cfg = self.config
        key = {
            "version": _REF_CACHE_VERSION,
            "model": _model_identity(cfg.ref_model or cfg.model),
            "data": split.digest,
            "compute_dtype": str(self.compute_dtype),
            "param_dtype": cfg.param_dtype,
            "shared_prompt": cfg.shared_prompt,
            "tokens_per_step": cfg.tokens_per_step,
            "attn_backend": cfg.attn_backend,
            "backend": cfg.backend,
            "device": self.device.type,
        }
        cacheable = bool(cfg.ref_model) or not self._injected_model
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        path = self.cache_dir / f"ref-logps-{digest}.safetensors"
        n = len(split.data)
        cached = load_file(path) if cacheable and path.exists() else None
        hit = cached is not None and cached["chosen"].shape == (n,)
        # Every rank must take the same branch: the pass below is collective under DDP / FSDP2.
        if all_reduce_sum(int(hit)) == self.world_size:
            split.ref_chosen, split.ref_rejected = cached["chosen"], cached["rejected"]
            logger.info("%s reference log-probs: read from %s", split.name, path)
            return
        if not source:
            source.append(self._load_model(cfg.ref_model, trainable=False) if cfg.ref_model else self.model)
        model = source[0]
        # The eval plan is the one evaluate() uses, so before any update the policy scores it identically.
        bins = self.eval_bins if split is self.eval_split else self._plan_bins(split.tokens, None)
        chosen, rejected = torch.zeros(n), torch.zeros(n)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for b, real in tqdm(
                self._shard(bins, split.tokens),
                desc=f"reference log-probs ({split.name})",
                disable=not (cfg.progress and self._is_main),
            ):
                batch = self._batch(split, b)
                hidden = self._hidden(model, batch)
                with unsharded_lm_head(model) as (weight, bias), self._compute():
                    c, r = sequence_logps(
                        hidden,
                        weight,
                        batch.labels,
                        bias,
                        seq_index=batch.seq_index,
                        num_pairs=batch.num_pairs,
                        temperature=self.temperature,
                        softcap=self.softcap,
                        backend=cfg.backend,
                    )
                if real:
                    idx = torch.from_numpy(b)
                    chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
        self._release(model)
        model.train(was_training)
        # Each pair was scored on exactly one rank and is 0 elsewhere, so the sum is exact.
        chosen, rejected = all_reduce_sum(chosen), all_reduce_sum(rejected)
        split.ref_chosen, split.ref_rejected = chosen, rejected
        if self._is_main and cacheable:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file({"chosen": chosen, "rejected": rejected}, tmp, metadata={"key": json.dumps(key)})
            os.replace(tmp, path)
            logger.info("%s reference log-probs: computed, cached at %s", split.name, path)

    # ------------------------------------------------------------------ training

    def train(self, *, stop_after: int | None = None) -> dict[str, dict[str, float]]:
        """Runs the remaining optimizer steps, evaluating, logging and checkpointing on the way.

        Args:
            stop_after: Return right after this global step, as if the job were killed there (no final
                evaluation or export); the next ``Trainer`` with ``resume=True`` carries on.

        Returns:
            ``{"train": last logged train metrics, "eval": last eval metrics}``; ``eval`` only with eval
            pairs, ``train`` only once a step was logged.
        """
        cfg = self.config
        if self._is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        result: dict[str, dict[str, float]] = {}
        pending: list[dict[str, float]] = []
        evaluated_at = saved_at = -1
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="dpo",
            dynamic_ncols=True,
            disable=not (cfg.progress and self._is_main),
        )
        self.model.train()
        while self.step < self.total_steps:
            plan = self._epoch_plan(self.epoch)
            while self.step_in_epoch < len(plan) and self.step < self.total_steps:
                metrics = self._step_or_explain(plan[self.step_in_epoch])
                self.step += 1
                self.step_in_epoch += 1
                metrics["epoch"] = self.epoch + self.step_in_epoch / len(plan)
                pending.append(metrics)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{metrics['loss']:.4f}",
                    acc=f"{metrics['rewards/accuracies']:.2f}",
                    tok_s=f"{metrics['tokens_per_second']:.0f}",
                )
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    result["train"] = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
                    self._log("train", result["train"])
                    pending = []
                if self.eval_split is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    result["eval"] = self._log_eval()
                    evaluated_at = self.step
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
                    saved_at = self.step
                if stop_after is not None and self.step >= stop_after:
                    bar.close()
                    self._flush()
                    return result
            if self.step_in_epoch >= len(plan):
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
        bar.close()
        if self.eval_split is not None and evaluated_at != self.step:
            result["eval"] = self._log_eval()
        if cfg.save_every and saved_at != self.step and self.step > 0:
            self.save()
        if cfg.save_model:
            self._export(self.out_dir / "final")
        self._flush()
        return result

    def _flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

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
        tokens = self.train_split.tokens
        step_pairs = sum(len(b) for b in bins)
        step_tokens = sum(int(tokens[b].sum()) for b in bins)
        sums = torch.zeros(len(METRIC_NAMES), device=self.device)
        local_pairs = 0
        plan = self._shard(bins, tokens)
        for k, (b, real) in enumerate(plan):
            with gradient_sync(self.model, enabled=k == len(plan) - 1):
                batch = self._batch(self.train_split, b)
                out = self._loss(self.train_split, b, batch)
                # Weighting each micro-batch mean by its share of the step's pairs makes the accumulated
                # gradient that of the mean over all pairs of the step, however they were binned; the
                # world_size factor undoes DDP's and FSDP2's averaging over ranks.
                share = batch.num_pairs * self.world_size / step_pairs if real else 0.0
                (out.loss * share).backward()
            if real:
                sums += self._pair_sums(out, batch.num_pairs)
                local_pairs += batch.num_pairs
        metrics = self._global_means(sums, local_pairs)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf"))
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.num_tokens += step_tokens
        elapsed = time.perf_counter() - start
        metrics.update(
            grad_norm=float(grad_norm),
            learning_rate=lr,
            num_tokens=float(self.num_tokens),
            tokens_per_second=step_tokens / elapsed,
        )
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Metrics (``METRIC_NAMES``) over every held-out pair, in eval mode and without gradients."""
        if self.eval_split is None:
            raise ValueError("evaluate: no eval pairs; set eval_data, eval_split or eval_fraction")
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(len(METRIC_NAMES), device=self.device)
        local_pairs = 0
        for b, real in self._shard(self.eval_bins, self.eval_split.tokens):
            batch = self._batch(self.eval_split, b)
            out = self._loss(self.eval_split, b, batch)
            if real:
                sums += self._pair_sums(out, batch.num_pairs)
                local_pairs += batch.num_pairs
        self._release(self.model)
        self.model.train(was_training)
        return self._global_means(sums, local_pairs)

    def _log_eval(self) -> dict[str, float]:
        metrics = self.evaluate()
        self._log("eval", metrics)
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("loss", "rewards/accuracies", "rewards/margins"))
        logger.info("step %d eval: %s", self.step, shown)
        return metrics

    def _log(self, split: str, metrics: Mapping[str, float]) -> None:
        if not self._is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, "split": split, **metrics}) + "\n")
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(f"{split}/{name}", value, self.step)

    # ------------------------------------------------------------------ checkpoints

    def _plan_identity(self) -> dict[str, Any]:
        return {**{k: getattr(self.config, k) for k in _PLAN_KEYS}, "data": self.train_split.digest}

    def save(self) -> Path:
        """Writes an atomic checkpoint of the current step into ``output_dir``; every rank calls it.

        Under fsdp2 every rank writes its shards (``save_sharded``); otherwise rank 0 writes the whole
        state (``save_checkpoint``) while the others wait for it.
        """
        cfg = self.config
        data_state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}
        extra = {"plan": self._plan_identity(), "num_tokens": self.num_tokens}
        if cfg.strategy == "fsdp2":
            extra.update(data_state=data_state, scheduler=self.scheduler.state_dict())
            return save_sharded(
                self.out_dir, self.step, self.model, self.optimizer, extra, keep_last=cfg.keep_last
            )
        path, ok = None, False
        if self._is_main:
            try:
                path = save_checkpoint(
                    self.out_dir,
                    self.step,
                    model=unwrap_model(self.model),
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    data_state=data_state,
                    extra=extra,
                    keep_last=cfg.keep_last,
                )
                ok = True
            finally:
                self._agree(ok, "saving the checkpoint on rank 0")
        else:
            self._agree(True, "saving the checkpoint on rank 0")
        return path or latest_checkpoint(self.out_dir)

    def _resume_latest(self) -> None:
        """Restores the newest checkpoint in ``output_dir``, if there is one (same on every rank)."""
        if self.config.strategy == "fsdp2":
            path = latest_sharded(self.out_dir)
            if path is None:
                return
            step, extra = load_sharded(path, self.model, self.optimizer)
            self.scheduler.load_state_dict(extra["scheduler"])
            state = {"step": step, "data_state": extra["data_state"], "extra": extra}
        else:
            path = latest_checkpoint(self.out_dir)
            if path is None:
                return
            state = load_checkpoint(
                path, model=unwrap_model(self.model), optimizer=self.optimizer, scheduler=self.scheduler
            )
        saved, now = (state["extra"] or {}).get("plan", {}), self._plan_identity()
        changed = [k for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(
                f"cannot resume {path}: {changed} differ from the checkpoint's run (saved "
                f"{ {k: saved.get(k) for k in changed} }), so its data position would point at other pairs; "
                "expected the same data and plan options, or use a new output_dir / resume=false"
            )
        self.step = state["step"]
        self.epoch = state["data_state"]["epoch"]
        self.step_in_epoch = state["data_state"]["step_in_epoch"]
        self.num_tokens = state["extra"]["num_tokens"]
        logger.info("resumed from %s at step %d", path, self.step)

    def _export(self, out_dir: Path) -> None:
        """Writes the trained model and tokenizer as a ``from_pretrained`` folder; every rank calls it.

        Under fsdp2 the sharded checkpoint of the current step (written now if missing) is consolidated
        on rank 0; otherwise rank 0 saves its replica (LoRA adapters merged).
        """
        ckpt = None
        if self.config.strategy == "fsdp2":
            ckpt = latest_sharded(self.out_dir)
            if ckpt is None or ckpt.name != f"sharded-{self.step:08d}":
                ckpt = self.save()
        ok = False
        try:
            if self._is_main:
                if ckpt is not None:
                    consolidate(ckpt, out_dir, unwrap_model(self.model).config)
                    self.tokenizer.save_pretrained(out_dir)
                else:
                    save_final(unwrap_model(self.model), out_dir, self.tokenizer)
                logger.info("final model: %s", out_dir)
            ok = True
        finally:
            self._agree(ok, "exporting the final model on rank 0")


def train(config: TrainConfig) -> dict[str, dict[str, float]]:
    """Runs ``fastdpo train``: ``Trainer(config).train()``."""
    return Trainer(config).train()


def _warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR factor of optimizer step ``step`` (0-based): linear warmup to 1, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """``(temperature, softcap)`` that make the fused head compute the model's own logits.

    Gemma-2 style ``final_logit_softcapping`` c: ``c * tanh(logits / c)``; Cohere style ``logit_scale``
    s: ``logits * s``, i.e. temperature ``1 / s``.
    """
    config = getattr(model, "config", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    if scale is not None and not scale > 0:
        raise ValueError(f"model config: expected logit_scale > 0, got {scale!r}")
    return (1.0 / float(scale) if scale is not None else 1.0), (None if softcap is None else float(softcap))


def _model_identity(name: str) -> dict[str, Any]:
    """What identifies a model's weights for the reference cache: file names, sizes and mtimes."""
    path = Path(name)
    if not path.is_dir():
        return {"name": name}
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".safetensors"))
    return {
        "path": str(path.resolve()),
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }
