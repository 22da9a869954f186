"""What ``fastdpo train`` checks before any model loads: the device, the model, tokenizer and reference
folders (or hub ids), the data paths and that the output folders can be written.

Each problem is a one-line ``UserError`` naming the option and what was expected, so a run never fails
on one of them minutes later, after loading a model.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

from fastdpo.data_sources import check_data_path
from fastdpo.errors import UserError
from fastdpo.train.config import TrainConfig

__all__ = ["check_run", "check_writable_dir"]

# Weight files that only unpickling reads (transformers' and PyTorch's own formats).
_PICKLED = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")


def check_run(config: TrainConfig) -> None:
    """Checks what ``train(config)`` needs from outside before any model loads.

    The device exists, the model, tokenizer and reference model name existing folders (or hub ids, cached
    ones under ``HF_HUB_OFFLINE``) with safetensors weights and no code of their own unless
    ``trust_remote_code``, the data files exist and have a supported type, and the output and cache
    folders can be created and written.

    Raises:
        UserError: What is missing or wrong, naming the option.
    """
    _check_device(config.device)
    for option in ("model", "ref_model", "tokenizer"):
        if getattr(config, option):
            _check_model_path(option, getattr(config, option), config.trust_remote_code)
    for option in ("data", "eval_data"):
        if getattr(config, option):
            try:
                check_data_path(getattr(config, option))
            except (OSError, UserError) as e:
                raise UserError(f"{option}: {e}") from None
    for option in ("output_dir", "cache_dir"):
        if getattr(config, option):
            check_writable_dir(option, getattr(config, option))


def _check_device(device: str) -> None:
    """Asks torch whether the CUDA device exists without creating a CUDA context."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return
    if index and not index.isdigit():
        raise UserError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UserError(
            f"device: {device!r} needs a CUDA GPU, but torch sees none (torch {torch.__version__}, "
            f"CUDA build {torch.version.cuda}); use --device cpu or --device auto"
        )
    count = torch.cuda.device_count()
    if int(index or 0) >= count:
        raise UserError(
            f"device: {device!r}, but torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )


def _looks_like_path(name: str) -> bool:
    """True for a name that cannot be a hub id (``name`` or ``org/name``), or whose folder part exists."""
    if name.startswith((".", "~", os.sep)) or (os.altsep and os.altsep in name):
        return True
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or ".." in name or "--" in name:
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def _check_model_path(option: str, name: str, trust_remote_code: bool) -> None:
    path = Path(name)
    if not path.exists():
        if _looks_like_path(name):
            raise UserError(
                f"{option}: {name}: no such folder (expected a save_pretrained folder or a hub id)"
            )
        _check_offline(option, name)
        return  # a hub id, resolved (or not) by transformers
    if not path.is_dir():
        raise UserError(f"{option}: {name} is a file; expected a save_pretrained folder or a hub id")
    # AutoTokenizer reads any of these; AutoModelForCausalLM needs config.json.
    wanted = (
        ("tokenizer_config.json", "tokenizer.json", "config.json")
        if option == "tokenizer"
        else ("config.json",)
    )
    if not any((path / file).is_file() for file in wanted):
        raise UserError(f"{option}: {name} has no {' or '.join(wanted)}; expected a save_pretrained folder")
    if option != "tokenizer" and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for pattern in _PICKLED for p in path.glob(pattern))
        if pickled:
            raise UserError(
                f"{option}: {name} holds only pickled weights ({', '.join(pickled[:3])}), which fastdpo "
                "never loads (unpickling runs arbitrary code); expected model.safetensors: convert them "
                "once with save_pretrained(safe_serialization=True) in a process you trust"
            )
    if not trust_remote_code:
        _check_no_remote_code(option, name, path)


def _check_no_remote_code(option: str, name: str, path: Path) -> None:
    """Refuses a folder whose config names its own Python classes (``auto_map``): that code is not run."""
    for file in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((path / file).read_text(encoding="utf-8-sig")).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # transformers reports a missing or garbled file itself
        if auto_map:
            raise UserError(
                f"{option}: {name} needs its own Python code ({file} auto_map: {', '.join(auto_map)}), which "
                "is not run unless trust_remote_code is set; expected a model transformers supports, or "
                "trust_remote_code: true (--trust-remote-code) if you trust that code"
            )


def _check_offline(option: str, name: str) -> None:
    """Under ``HF_HUB_OFFLINE`` a hub id must already be in the local cache: nothing can be downloaded."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() not in ("1", "ON", "YES", "TRUE"):
        return
    from huggingface_hub import try_to_load_from_cache

    files = ("tokenizer_config.json", "config.json") if option == "tokenizer" else ("config.json",)
    if not any(isinstance(try_to_load_from_cache(name, file), str) for file in files):
        raise UserError(
            f"{option}: {name} is a hub id that is not in the local cache, and HF_HUB_OFFLINE=1 forbids "
            "downloading it; expected a local folder or a cached id, or unset HF_HUB_OFFLINE"
        )


def check_writable_dir(option: str, name: str) -> None:
    """Creates the folder and a scratch file in it, so that a run never fails on it after loading a model."""
    try:
        Path(name).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=name).close()
    except OSError as e:
        raise UserError(f"{option}: cannot create or write the folder {name} ({e.strerror or e})") from None
