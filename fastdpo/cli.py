"""The ``fastdpo`` command: ``train`` (YAML config plus overrides), ``demo`` and ``bench``.

``fastdpo train --config run.yaml --lr 5e-7 --set beta=0.05`` builds a ``TrainConfig`` from the dataclass
defaults, then the YAML file, then the ``--<option>`` flags, then the ``--set key=value`` pairs (later wins),
and runs the packed trainer. Every ``TrainConfig`` field is a flag; ``fastdpo train --help`` lists them all.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.distributed as dist
import yaml

from fastdpo.trainer import TrainConfig, train

__all__ = ["build_parser", "load_config", "main"]

# Help sections of ``fastdpo train --help``: title and the first field of each, in field order.
_SECTIONS = (
    ("model", "model"),
    ("LoRA", "lora_r"),
    ("data", "data"),
    ("loss", "beta"),
    ("optimization", "lr"),
    ("run", "output_dir"),
)
_BENCHMARKS = ("logprobs", "loss")


def _metavar(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return "A,B,..."
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return {int: "INT", float: "FLOAT"}.get(args[0] if args else hint, "STR")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, help from the field's metadata; unset flags leave no attribute."""
    hints = typing.get_type_hints(TrainConfig)
    starts = {first: title for title, first in _SECTIONS}
    group: Any = parser
    for f in dataclasses.fields(TrainConfig):
        if f.name in starts:
            group = parser.add_argument_group(f"{starts[f.name]} options")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = ",".join(default) if isinstance(default, list) else default
        help_text = (
            f.metadata["help"]
            if "default:" in f.metadata["help"]
            else f"{f.metadata['help']} (default: {shown!r})"
        )
        help_text = help_text.replace("%", "%%")
        if hints[f.name] is bool:
            kind: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {"metavar": _metavar(hints[f.name])}
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kind)


def build_parser() -> argparse.ArgumentParser:
    """The ``fastdpo`` argument parser with its ``train``, ``demo`` and ``bench`` subcommands."""
    parser = argparse.ArgumentParser(prog="fastdpo", description="Fast, memory-lean DPO: train, demo, bench.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,demo,bench}")

    train = commands.add_parser(
        "train",
        usage="fastdpo train [-h] [-c YAML] [--set KEY=VALUE ...] [--print-config] [--OPTION VALUE ...]",
        help="packed DPO training from a YAML config and overrides",
        description="Packed DPO training. Options come from the dataclass defaults, then --config, then the "
        "--<option> flags, then --set (later wins).",
    )
    train.add_argument("-c", "--config", metavar="YAML", help="YAML file of TrainConfig options")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one option, e.g. --set lr=5e-7 (repeatable; applied last)",
    )
    train.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    _add_config_flags(train)

    demo = commands.add_parser(
        "demo",
        help="SFT then DPO a tiny model on addition, on CPU in a few minutes",
        description="Builds a small Llama and tokenizer locally, SFTs it on sloppy addition data, runs DPO "
        "through the packed trainer and reports held-out reward accuracy before and after.",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the problems, init and training (default: 0)"
    )
    demo.add_argument("--sft-steps", type=int, default=1200, help="SFT steps (default: 1200)")
    demo.add_argument("--dpo-steps", type=int, default=60, help="DPO steps (default: 60)")
    demo.add_argument(
        "--workdir", help="keep the SFT model, the pairs and the DPO run here (default: a temp dir)"
    )

    bench = commands.add_parser(
        "bench",
        help="run benchmarks/bench_logprobs.py or bench_loss.py",
        usage="fastdpo bench [-h] [{logprobs,loss,all}] [--model-config JSON] [--hidden D --vocab V] "
        "[--tokens N ...] [script options ...]",
        description="Runs the benchmark scripts of a source checkout; other arguments are passed through to "
        "them (see python benchmarks/bench_<name>.py --help). Without CUDA they run a reduced CPU mode.",
    )
    bench.add_argument("name", choices=[*_BENCHMARKS, "all"], help="which benchmark (default: all)")
    bench.add_argument(
        "--model-config", metavar="JSON", help="take hidden and vocab sizes from a config.json"
    )
    bench.add_argument("--hidden", type=int, help="hidden size D")
    bench.add_argument("--vocab", type=int, help="vocabulary size V")
    bench.add_argument(
        "--tokens",
        type=int,
        action="append",
        help="tokens N (logprobs: repeatable; loss: tokens per sequence)",
    )
    bench.add_argument(
        "--out", default="bench-results", help="folder for the CSVs and the plot (default: bench-results)"
    )
    return parser


def load_config(
    path: str | Path | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> TrainConfig:
    """Builds a ``TrainConfig``: defaults, then the YAML file, then ``flags``, then ``KEY=VALUE`` overrides.

    Args:
        path: YAML file holding a mapping of option names to values, or None.
        flags: Options by name (e.g. from the command line), or None.
        overrides: ``"key=value"`` strings; keys may use ``-`` for ``_``.

    Returns:
        The validated config.

    Raises:
        ValueError: Unreadable YAML, a non-mapping file, a malformed override, or an invalid option.
    """
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ValueError(f"--config {path}: cannot read it as YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(
                f"--config {path}: expected a mapping of option names to values, got {type(loaded).__name__}"
            )
        values.update(loaded or {})
    values.update(flags or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=5e-7")
        values[key.strip().replace("-", "_")] = value.strip()
    return TrainConfig.from_dict(values)


def _bench_module(name: str) -> ModuleType:
    """Imports ``benchmarks/bench_<name>.py`` from the source checkout holding this package, or the cwd."""
    candidates = [Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    for folder in candidates:
        path = folder / f"bench_{name}.py"
        if path.is_file():
            if (
                str(folder) not in sys.path
            ):  # the scripts import their shared helpers from benchmarks/common.py
                sys.path.insert(0, str(folder))
            spec = importlib.util.spec_from_file_location(f"fastdpo_bench_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(
        f"bench_{name}.py not found in {' or '.join(map(str, candidates))}; fastdpo bench runs the scripts "
        "of a source checkout, so run it from the repository (or an editable install)"
    )


def _bench_argv(name: str, args: argparse.Namespace, extra: list[str]) -> list[str]:
    hidden, vocab, softcap = args.hidden, args.vocab, None
    if args.model_config:
        config = json.loads(Path(args.model_config).read_text(encoding="utf-8"))
        config = config.get("text_config", config) if "hidden_size" not in config else config
        if "hidden_size" not in config or "vocab_size" not in config:
            raise ValueError(f"--model-config {args.model_config}: expected hidden_size and vocab_size in it")
        hidden, vocab = hidden or config["hidden_size"], vocab or config["vocab_size"]
        softcap = config.get("final_logit_softcapping")
    if (hidden is None) != (vocab is None):
        raise ValueError("--hidden and --vocab go together (or come from --model-config)")
    argv = [] if hidden is None else ["--hidden", str(hidden), "--vocab", str(vocab)]
    if name == "logprobs":
        argv += [a for n in args.tokens or [] for a in ("--tokens", str(n))]
        argv += ["--softcap", str(softcap)] if softcap else []
    elif args.tokens:
        if len(args.tokens) > 1:
            raise ValueError(f"bench loss takes one --tokens (tokens per sequence), got {args.tokens}")
        argv += ["--seq", str(args.tokens[0])]
    out = Path(args.out)
    argv += ["--csv", str(out / f"{name}.csv")]
    argv += ["--plot", str(out / f"{name}.png")] if name == "logprobs" else []
    return argv + extra


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastdpo`` command; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # An optional positional would swallow the value of a passed-through option (--reps 2), so a bare
    # `fastdpo bench ...` gets its default name here instead.
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1] not in (*_BENCHMARKS, "all", "-h", "--help")):
        argv.insert(1, "all")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Under torchrun only rank 0 reports; the other ranks show warnings and errors.
    main_rank = os.environ.get("RANK", "0") in ("", "0")
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s")
    if args.command == "train":
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        flags = {k: v for k, v in vars(args).items() if k in names}
        try:
            config = load_config(args.config, flags=flags, overrides=args.overrides)
        except (ValueError, TypeError) as e:
            return _fail("train", e)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        results = train(config)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for split, metrics in results.items() if main_rank else ():
            shown = ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("loss", "rewards/"))
            )
            print(f"{split}: {shown}")
    elif args.command == "demo":
        from fastdpo.demo import run_demo

        run_demo(seed=args.seed, sft_steps=args.sft_steps, dpo_steps=args.dpo_steps, workdir=args.workdir)
    else:
        names = _BENCHMARKS if args.name == "all" else (args.name,)
        try:
            runs = [(_bench_module(name), _bench_argv(name, args, extra)) for name in names]
        except (ValueError, FileNotFoundError) as e:
            return _fail("bench", e)
        for name, (module, bench_argv) in zip(names, runs, strict=True):
            print(f"fastdpo bench {name}: bench_{name}.main({bench_argv})", flush=True)
            module.main(bench_argv)
    return 0


def _fail(command: str, error: Exception) -> int:
    print(f"fastdpo {command}: error: {error}", file=sys.stderr)
    return 2
