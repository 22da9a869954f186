"""``TrainConfig``: every option of a ``fastdpo train`` run, coerced from YAML / command-line strings and
validated, each error naming the option and what it expects."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fastdpo.distributed import STRATEGIES
from fastdpo.errors import finite_float
from fastdpo.losses import LOSS_TYPES
from fastdpo.losses.kto import KTO_LOSS_TYPES
from fastdpo.modeling import ATTN_BACKENDS

__all__ = [
    "AUTO_TILE",
    "AUTO_TOKENS",
    "DTYPES",
    "REFERENCE_MODES",
    "TrainConfig",
    "read_yaml",
    "resume_changes",
]

REFERENCE_MODES = ("precompute", "model", "adapter", "none")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# How each option bears on resuming a checkpoint. Identity options fix what the checkpoint's weights and
# data position mean (the models, LoRA's shape, the reference, the packing plan): a checkpoint never
# resumes under other values. The data options (data, split, tokenizer, lengths, ...) are compared
# through the token ids they produce instead, so a moved file still resumes. Free options change how the
# run executes or reports, not what it computes. Every other option (loss and optimization
# hyperparameters, compute dtype, run length) may change only with allow_config_change.
RESUME_IDENTITY = (
    "model",
    "ref_model",
    "param_dtype",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "reference",
    "seed",
    "shared_prompt",
    "tokens_per_step",
    "tokens_per_optimizer_step",
)
_RESUME_BY_TOKENS = (
    "tokenizer",
    "data",
    "split",
    "eval_fraction",
    "skip_invalid",
    "max_length",
    "max_prompt_length",
    "truncation_mode",
)
_RESUME_FREE = (
    "trust_remote_code",
    "device",
    "attn_backend",
    "backend",
    "strategy",
    "gradient_checkpointing",
    "offload_activations",
    "offload_checkpoints",
    "tiled_mlp",
    "lean_norms",
    "tile_tokens",
    "fused_adamw",
    "eval_data",
    "eval_split",
    "cache_dir",
    "max_bad_steps",
    "output_dir",
    "log_every",
    "eval_every",
    "save_every",
    "save_every_minutes",
    "keep_last",
    "resume",
    "allow_config_change",
    "save_model",
    "tensorboard",
    "progress",
)


def _opt(default: Any, help: str) -> Any:
    """A config field with its ``--help`` text; list defaults are copied per instance."""
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# tokens_per_step: auto, resolved when the run starts (fastdpo.planner.api.auto_tokens_per_step).
AUTO_TOKENS = 0
# tile_tokens: auto, resolved when the run starts (fastdpo.planner.api.auto_tile_tokens_from_plan).
AUTO_TILE = -1


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
    offload_checkpoints: bool = _opt(
        False,
        "with gradient_checkpointing: keep only each decoder layer's checkpointed input in (pinned) host "
        "memory, copied back one layer ahead in the backward on a side stream",
    )
    tiled_mlp: bool = _opt(
        False, "run each decoder layer's MLP over tiles of tile_tokens tokens, recomputed tile by tile"
    )
    lean_norms: bool = _opt(
        False,
        "run every RMSNorm over tiles of tile_tokens tokens, recomputed tile by tile, so its fp32 upcast "
        "never covers the whole sequence",
    )
    tile_tokens: int = _opt(
        0,
        "tokens a tile of tiled_mlp / lean_norms; 0: ceil(N / hidden_size) tiles of whole 64s (ALST's rule); "
        "auto: the largest tile, up to 16x that one, whose planned peak is no higher (fastdpo plan)",
    )
    fused_adamw: bool = _opt(
        True, "AdamW(fused=True) where the installed torch has the fused kernel for the device, else foreach"
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
    tokens_per_step: int = _opt(
        8192,
        "token budget of one packed micro-batch (at least 2 * max_length); auto (or 0), on CUDA: the largest "
        "that fastdpo plan fits in the GPU's free memory, with its margin",
    )
    tokens_per_optimizer_step: int = _opt(
        0, "token budget of one optimizer step over all micro-batches (gradient accumulation); 0: one bin"
    )
    cache_dir: str | None = _opt(
        None, "tokenization and reference log-prob cache; default: <output_dir>/cache"
    )
    # Loss
    beta: float = _opt(0.1, "DPO beta")
    loss_type: str = _opt(
        "sigmoid",
        f"one of {list(LOSS_TYPES)} on preference pairs, or {list(KTO_LOSS_TYPES)} on unpaired "
        "prompt/completion/label rows",
    )
    label_smoothing: float = _opt(0.0, "label smoothing of the robust / exo_pair / aot losses")
    desirable_weight: float = _opt(1.0, "KTO: weight of a desirable example's loss")
    undesirable_weight: float = _opt(1.0, "KTO: weight of an undesirable example's loss")
    reference: str = _opt("precompute", f"reference log-probs: one of {list(REFERENCE_MODES)}")
    # Optimization
    lr: float = _opt(1e-6, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay of matrices (biases and norms get none)")
    warmup_ratio: float = _opt(0.1, "fraction of the steps with linear warmup")
    warmup_steps: int = _opt(0, "warmup steps; overrides warmup_ratio when > 0")
    min_lr_ratio: float = _opt(0.0, "the cosine decays to lr * min_lr_ratio")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm; 0 disables clipping")
    max_bad_steps: int = _opt(
        3, "stop the run after this many optimizer steps in a row skipped for a non-finite loss or grad norm"
    )
    max_steps: int = _opt(0, "optimizer steps; 0: run `epochs` epochs")
    epochs: int = _opt(1, "passes over the training pairs when max_steps is 0")
    seed: int = _opt(42, "seed of the data order, LoRA init and global RNGs")
    # Run
    output_dir: str = _opt("runs/fastdpo", "checkpoints, metrics.jsonl, TensorBoard logs and the final model")
    log_every: int = _opt(10, "log train metrics (averaged over the interval) every N steps")
    eval_every: int = _opt(0, "evaluate every N steps; 0: only at the end")
    save_every: int = _opt(500, "checkpoint every N steps; 0: never")
    save_every_minutes: float = _opt(
        0.0, "also checkpoint after a step ending this many minutes after the last save; 0: never"
    )
    keep_last: int = _opt(2, "checkpoints to keep")
    resume: bool = _opt(True, "continue from the latest checkpoint in output_dir")
    allow_config_change: bool = _opt(
        False,
        "on resume, apply options that differ from the checkpoint's (lr, beta, max_steps, ...) instead of "
        "refusing; the LR schedule is rebuilt from the new options",
    )
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
        check(bool(self.output_dir.strip()), "output_dir", "a folder path (not empty)")
        check(self.param_dtype in DTYPES, "param_dtype", f"one of {list(DTYPES)}")
        check(self.dtype in ("auto", *DTYPES), "dtype", f"one of {['auto', *DTYPES]}")
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
        check(
            not self.offload_checkpoints or self.gradient_checkpointing,
            "offload_checkpoints",
            "false without gradient_checkpointing (it offloads the checkpointed layer inputs)",
        )
        check(
            not (self.offload_checkpoints and self.offload_activations),
            "offload_checkpoints",
            "false with offload_activations, which already moves every saved tensor to CPU",
        )
        check(self.tile_tokens >= AUTO_TILE, "tile_tokens", "auto or an int >= 0 (0: ALST's rule)")
        check(
            not (self.tiled_mlp or self.lean_norms) or self.lora_dropout == 0,
            "lora_dropout",
            "0 with tiled_mlp or lean_norms (a tile recomputed in the backward would draw another mask)",
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
            self.tokens_per_step == AUTO_TOKENS or self.tokens_per_step >= 2 * self.max_length,
            "tokens_per_step",
            f"auto or an int >= 2 * max_length = {2 * self.max_length}, so that every pair fits a bin",
        )
        check(
            self.tokens_per_optimizer_step == 0
            or self.tokens_per_step == AUTO_TOKENS
            or self.tokens_per_optimizer_step >= self.tokens_per_step,
            "tokens_per_optimizer_step",
            f"0 or an int >= tokens_per_step = {self.tokens_per_step}",
        )
        check(self.beta > 0, "beta", "a float > 0")
        check(
            self.loss_type in LOSS_TYPES or self.loss_type in KTO_LOSS_TYPES,
            "loss_type",
            f"one of {[*LOSS_TYPES, *KTO_LOSS_TYPES]}",
        )
        check(self.desirable_weight > 0, "desirable_weight", "a float > 0")
        check(self.undesirable_weight > 0, "undesirable_weight", "a float > 0")
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
        check(self.max_bad_steps >= 1, "max_bad_steps", "an int >= 1")
        check(self.save_every_minutes >= 0, "save_every_minutes", "a float >= 0")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``; strings (command line, YAML's ``1e-5``) are parsed."""
    if (
        name in ("tokens_per_step", "tile_tokens")
        and isinstance(value, str)
        and value.strip().lower() == "auto"
    ):
        return AUTO_TOKENS if name == "tokens_per_step" else AUTO_TILE
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
        if hint is float:
            return finite_float(name, value)
        if not isinstance(value, int) and not (math.isfinite(value) and value == int(value)):
            raise ValueError(f"{name}: expected an int, got {value!r}")
        return int(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a string, got {type(value).__name__} {value!r}")
    return value


def resume_changes(
    saved: Mapping[str, Any], config: TrainConfig
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """How ``config`` differs from ``saved``, a checkpoint's ``TrainConfig.to_dict()``.

    Returns:
        ``(identity, changeable)``: each option name -> ``(saved value, new value)``; ``identity`` holds
        the ``RESUME_IDENTITY`` options, ``changeable`` those that ``allow_config_change`` may apply. Data
        options, free options and options the checkpoint does not record are left out.
    """
    now = config.to_dict()
    skipped = set(_RESUME_BY_TOKENS) | set(_RESUME_FREE)
    differ = {k: (saved[k], now[k]) for k in now if k in saved and k not in skipped and saved[k] != now[k]}
    identity = {k: v for k, v in differ.items() if k in RESUME_IDENTITY}
    return identity, {k: v for k, v in differ.items() if k not in identity}


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key twice in one mapping, which it would let the later one win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ValueError(f"duplicate key {key!r} at line {line} (first at line {seen[key]})")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parses a YAML file (a leading UTF-8 BOM allowed); a key repeated in a mapping is an error.

    Raises:
        ValueError: Unreadable, not YAML, or a duplicate key, naming the file (and the key and its line).
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  (a SafeLoader subclass)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as e:
        raise ValueError(f"--config {path}: cannot read it as YAML ({e})") from None
