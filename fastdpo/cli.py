"""The ``fastdpo`` command: ``train`` (YAML config plus overrides), ``plan``, ``demo`` and ``bench``.

``fastdpo train --config run.yaml --lr 5e-7 --set beta=0.05`` builds a ``TrainConfig`` from the dataclass
defaults, then the YAML file, then the ``--<option>`` flags, then the ``--set key=value`` pairs (later wins),
and runs the packed trainer. Every ``TrainConfig`` field is a flag; ``fastdpo train --help`` lists them all.

Errors: before any model loads, ``train`` checks the data paths, the model, tokenizer and reference paths,
the device and that the output folder can be written. Problems the user can fix print one line,
``fastdpo <command>: error: <message>``, and exit with status 2, as argparse's usage errors do: a
``fastdpo.errors.UserError`` raised anywhere, and a ``ValueError``, ``TypeError`` or ``OSError`` raised by
those checks or by reading the config. Anything else is a bug and keeps its traceback (status 1);
``--debug`` prints the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import re
import sys
import traceback
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch.distributed as dist
import yaml

from fastdpo.errors import UserError
from fastdpo.longctx import default_alloc_conf
from fastdpo.preflight import check_run, check_writable_dir
from fastdpo.train import TrainConfig, train
from fastdpo.train.config import read_yaml
from fastdpo.train.runlock import removed_if_left_empty

__all__ = ["build_parser", "check_run", "load_config", "main"]

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
_DEBUG_HELP = "show the full traceback of an error the user can fix (bad data, path or option)"
# A value such as -1e-3 or -inf: argparse takes only -1 and -.5 for values, the rest for options.
_NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf(inity)?|-nan", re.IGNORECASE)


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
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    # Accepted after the command name too; SUPPRESS keeps a subcommand from resetting a leading --debug.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,plan,demo,bench}")

    train = commands.add_parser(
        "train",
        parents=[debug],
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

    plan = commands.add_parser(
        "plan",
        parents=[debug],
        usage="fastdpo plan [-h] [-c YAML] [--gpu-memory SIZE] [--fit] [--compare-trl] [--json] "
        "[--OPTION VALUE ...]",
        help="the memory one training step of a config needs, planned on the meta device; what fits",
        description="Runs one optimizer step of `fastdpo train` with the same options on the meta device "
        "(the model from its config.json only, never its weights) and prints its peak device memory, where "
        "it falls and what holds it. --device cuda (the default for auto) or cpu is the device planned for.",
    )
    plan.add_argument("-c", "--config", metavar="YAML", help="YAML file of TrainConfig options")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="the card's memory, e.g. 80GiB or 80GB (default: the local GPU's)",
    )
    plan.add_argument(
        "--fit", action="store_true", help="find the largest tokens_per_step that fits, with the margin"
    )
    plan.add_argument(
        "--compare-trl", action="store_true", help="also plan stock TRL 1.16 DPOTrainer's compute path"
    )
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    _add_config_flags(plan)

    demo = commands.add_parser(
        "demo",
        parents=[debug],
        help="SFT then DPO a tiny model on addition, on CPU in a few minutes",
        description="Builds a small Llama and tokenizer locally, SFTs it on sloppy addition data, runs DPO "
        "through the packed trainer and reports held-out reward accuracy before and after.",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the problems, init and training (default: 0)"
    )
    demo.add_argument("--sft-steps", type=_positive_int, default=1200, help="SFT steps (default: 1200)")
    demo.add_argument("--dpo-steps", type=_positive_int, default=60, help="DPO steps (default: 60)")
    demo.add_argument(
        "--loss",
        choices=("dpo", "kto"),
        default="dpo",
        help="dpo: preference pairs; kto: unpaired thumbs-up/down answers, KTO through the same trainer, "
        "--dpo-steps steps (default: dpo)",
    )
    demo.add_argument(
        "--workdir",
        help="keep the SFT model, the data and the run (final model in dpo/final or kto/final) here "
        "(default: a new runs/demo-<time>-<id> folder)",
    )

    bench = commands.add_parser(
        "bench",
        parents=[debug],
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
    for sub in (train, plan, demo, bench):
        sub.set_defaults(command_parser=sub)
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
        ValueError: Unreadable YAML, a duplicate key, a non-mapping file, a malformed override, or an
            invalid option.
    """
    values: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml(path)
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
    """Entry point of the ``fastdpo`` command; returns the exit status (2 for an error the user can fix)."""
    parser = build_parser()
    argv = _join_negative_values(list(sys.argv[1:] if argv is None else argv))
    # An optional positional would swallow the value of a passed-through option (--reps 2), so a bare
    # `fastdpo bench ...` gets its default name here instead (after any leading --debug).
    at = next((i for i, arg in enumerate(argv) if arg != "--debug"), len(argv)) + 1
    named = at < len(argv) and argv[at] in (*_BENCHMARKS, "all", "-h", "--help")
    if argv[at - 1 : at] == ["bench"] and not named:
        argv.insert(at, "all")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "bench":
        args.command_parser.error(_unrecognized(args.command_parser, extra))
    # Under torchrun only rank 0 reports; the other ranks show warnings and errors.
    main_rank = os.environ.get("RANK", "0") in ("", "0")
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s")
    try:
        if args.command == "train":
            return _train(args, main_rank)
        if args.command == "plan":
            return _plan(args)
        if args.command == "demo":
            return _demo(args)
        return _bench(args, extra)
    except UserError as e:
        return _fail(args, e)


def _train(args: argparse.Namespace, main_rank: bool) -> int:
    # Before anything touches CUDA: the caching allocator reads its config once, at initialization.
    default_alloc_conf(os.environ)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = load_config(args.config, flags=flags, overrides=args.overrides)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
    except (ValueError, TypeError, OSError) as e:
        return _fail(args, e)
    with removed_if_left_empty(config.output_dir, enabled=main_rank):
        try:
            check_run(config)
        except (ValueError, TypeError, OSError) as e:
            raise UserError(str(e)) from e
        results = train(config)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    steps = results.pop("steps", {})
    for split, metrics in results.items() if main_rank else ():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith(("loss", "rewards/")))
        print(f"{split}: {shown}")
    if main_rank and steps:
        print(f"steps: {steps['applied']:.0f} applied, {steps['skipped']:.0f} skipped")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from fastdpo.planner.command import run_plan

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    try:
        # The planner reads no data: a config without any is planned all the same.
        config = load_config(args.config, flags={"data": "-", **flags}, overrides=args.overrides)
        return run_plan(
            config, gpu_memory=args.gpu_memory, fit=args.fit, compare_trl=args.compare_trl, as_json=args.json
        )
    except (ValueError, TypeError, OSError) as e:
        return _fail(args, e)


def _demo(args: argparse.Namespace) -> int:
    from fastdpo.demo import run_demo

    if args.workdir is not None:
        check_writable_dir("--workdir", args.workdir)
    run_demo(
        seed=args.seed,
        sft_steps=args.sft_steps,
        dpo_steps=args.dpo_steps,
        workdir=args.workdir,
        loss=args.loss,
    )
    return 0


def _bench(args: argparse.Namespace, extra: list[str]) -> int:
    names = _BENCHMARKS if args.name == "all" else (args.name,)
    try:
        runs = [(_bench_module(name), _bench_argv(name, args, extra)) for name in names]
    except (ValueError, OSError) as e:
        return _fail(args, e)
    # The scripts save their CSV and plot straight into this folder.
    check_writable_dir("--out", args.out)
    for name, (module, bench_argv) in zip(names, runs, strict=True):
        print(f"fastdpo bench {name}: bench_{name}.main({bench_argv})", flush=True)
        module.main(bench_argv)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` -> ``--lr=-1e-3``, so that a negative number after an option is its value."""
    out: list[str] = []
    for arg in argv:
        if out and _NEGATIVE_NUMBER.fullmatch(arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def _unrecognized(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """argparse's message for unknown arguments, with the closest option of ``parser`` for each."""
    # argparse keeps the option strings only in its private action list.
    options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    shown = []
    for arg in extra:
        close = difflib.get_close_matches(arg.partition("=")[0], options, n=1) if arg.startswith("--") else []
        shown.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    return f"unrecognized arguments: {' '.join(shown)}"


def _fail(args: argparse.Namespace, error: BaseException) -> int:
    if args.debug:
        traceback.print_exception(error)
    print(f"fastdpo {args.command}: error: {error}", file=sys.stderr)
    return 2
