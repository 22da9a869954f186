"""Fault injection on ``fastdpo train``: kill -9, SIGTERM / SIGINT, corrupted checkpoints, a truncated data
file, a full disk and a diverging run, each in real processes.

Every test starts one driver subprocess (this file run as a script, one thread). The driver imports torch
and fastdpo once and forks one training process at a time, each running the ``fastdpo train`` command's
``main`` on a YAML config, so that startup is paid once per test. A reference run, uninterrupted, gives
the final weights and metrics every faulted run must reproduce bit for bit.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import yaml
from test_trainer import assets  # noqa: F401  (a fixture: tiny Llama, tokenizer, 96 addition pairs)

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "num_tokens")
MAX_STEPS = 8
KILL_SEEDS = 20
DRIVER_TIMEOUT_S = 290


# ---------------------------------------------------------------------- the driver (runs in a subprocess)


def _child(log: Path, run, *args) -> int:
    """Forks a process running ``run(*args)`` with stdout and stderr appended to ``log``; returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = run(*args)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int) -> int:
    """The exit status of child ``pid``; minus the signal number if a signal killed it."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _until(ready, pid: int, what: str, timeout_s: float = 60.0) -> None:
    """Polls ``ready()``; past ``timeout_s`` kills child ``pid`` and raises (a hang fails only its case)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _wait(pid)
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.005)


def _cli(config: Path, *flags: str) -> int:
    from fastdpo.cli import main

    return main(["train", "-c", str(config), *flags])


def _slow_cli(config: Path) -> int:
    """The command with every step starting by a 0.5 s sleep, so that signals land inside a step (no effect
    on the math)."""
    from fastdpo.train.loop import Trainer

    step = Trainer._train_step

    def slow_step(self, bins):
        time.sleep(0.5)
        return step(self, bins)

    Trainer._train_step = slow_step
    return _cli(config)


def _full_disk_cli(config: Path, from_step: int) -> int:
    """The command on a disk that fills up: checkpoint tensor writes from ``from_step`` on raise ENOSPC."""
    import safetensors.torch

    save_file = safetensors.torch.save_file

    def save_until_full(tensors, filename, metadata=None):
        match = re.search(r"checkpoint-(\d{8})", str(filename))
        if match and int(match.group(1)) >= from_step:
            Path(filename).write_bytes(b"\0" * 64)  # a partial file, as a real full disk leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return save_file(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = save_until_full
    return _cli(config)


def _diverging_cli(config: Path) -> int:
    """The command with lr = inf set past the config's checks: the first update makes the weights inf."""
    from fastdpo import cli

    load_config = cli.load_config

    def with_infinite_lr(*args, **kwargs):
        loaded = load_config(*args, **kwargs)
        loaded.lr = float("inf")
        return loaded

    cli.load_config = with_infinite_lr
    return _cli(config)


def _resumed_step(config: Path) -> int:
    """Builds the trainer (resuming) and prints the step it resumed at."""
    from fastdpo.train import TrainConfig, Trainer

    print(f"resumed at step {Trainer(TrainConfig.from_dict(yaml.safe_load(config.read_text()))).step}")
    return 0


def _write_config(options: dict, name: str) -> Path:
    out = Path(options["output_dir"])
    path = out.parent / f"{out.name}-{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(options))
    return path


def _drive(case: str, options: dict) -> dict:
    out = Path(options["output_dir"])
    log = out.parent / f"{out.name}.log"
    result: dict = {"log": str(log)}
    if case == "run":
        result["codes"] = [_wait(_child(log, _cli, _write_config(options, "run")))]
    elif case == "kill9":
        # One process per seed, killed at a uniform time over a whole run's duration (steps, checkpoint and
        # pointer writes, the export), resuming the previous one's run; a run that ends before its kill is
        # complete, and the next seed starts a new one. The last run is then finished.
        start = time.monotonic()
        assert (
            _wait(_child(log, _cli, _write_config({**options, "output_dir": str(out / "timing")}, "0"))) == 0
        )
        duration = time.monotonic() - start
        result["kills"], result["runs"] = [], [str(out / "run-0")]
        for seed in range(KILL_SEEDS):
            config = _write_config({**options, "output_dir": result["runs"][-1]}, "kill9")
            pid = _child(log, _cli, config)
            time.sleep(random.Random(seed).uniform(0.0, duration))
            os.kill(pid, signal.SIGKILL)
            result["kills"].append(_wait(pid))
            if result["kills"][-1] == 0:
                result["runs"].append(str(out / f"run-{len(result['runs'])}"))
        config = _write_config({**options, "output_dir": result["runs"][-1]}, "kill9")
        result["codes"] = [_wait(_child(log, _cli, config))]
    elif case in ("SIGTERM", "SIGINT", "SIGINT twice"):
        pid = _child(log, _slow_cli, _write_config(options, "signal"))
        metrics = out / "metrics.jsonl"
        _until(
            lambda: metrics.is_file() and '"step": 2' in metrics.read_text(), pid, "step 2 in metrics.jsonl"
        )
        time.sleep(0.1)  # into step 3's sleep: the second SIGINT of "twice" comes well before it ends
        os.kill(pid, signal.SIGTERM if case == "SIGTERM" else signal.SIGINT)
        if case == "SIGINT twice":
            _until(lambda: "SIGINT received" in log.read_text(), pid, "warning of the first SIGINT")
            os.kill(pid, signal.SIGINT)
        result["codes"] = [_wait(pid)]
        result["checkpoints"] = sorted(p.name for p in out.glob("checkpoint-*"))
        result["codes"].append(_wait(_child(log, _cli, _write_config(options, "resume"))))
    elif case == "corrupt":
        # Checkpoints 1, 2, 3; then, for each file of checkpoint 3, a copy of the run with that file's
        # middle byte flipped (same size) is resumed.
        assert _wait(_child(log, _cli, _write_config(options, "corrupt"))) == 0
        result["resumed"] = {}
        for file in sorted((out / "checkpoint-00000003").iterdir()):
            copy = out.parent / f"{out.name}-{file.name}"
            shutil.copytree(out, copy)
            data = bytearray((copy / file.relative_to(out)).read_bytes())
            data[len(data) // 2] ^= 0xFF
            (copy / file.relative_to(out)).write_bytes(bytes(data))
            file_log = out.parent / f"{copy.name}.log"
            config = _write_config({**options, "output_dir": str(copy)}, "resume")
            code = _wait(_child(file_log, _resumed_step, config))
            result["resumed"][file.name] = {"code": code, "log": file_log.read_text()}
    elif case == "disk full":
        result["codes"] = [_wait(_child(log, _full_disk_cli, _write_config(options, "full"), 4))]
        result["after_full"] = sorted(p.name for p in out.iterdir())
        resumed_log = out.parent / f"{out.name}-resumed.log"
        result["resumed"] = _wait(_child(resumed_log, _resumed_step, _write_config(options, "resume")))
        result["resumed_log"] = resumed_log.read_text()
        result["codes"].append(_wait(_child(log, _cli, _write_config(options, "resume"))))
    elif case == "diverge":
        result["codes"] = [_wait(_child(log, _diverging_cli, _write_config(options, "diverge")))]
    else:
        raise ValueError(f"unknown case {case!r}")
    return result


# ---------------------------------------------------------------------- the tests (run by pytest)


def _options(root: Path, out: Path, **overrides) -> dict:
    options = dict(
        model=str(root / "model"),
        data=str(root / "pairs.jsonl"),
        output_dir=str(out),
        cache_dir=str(out.parent / "cache"),
        beta=0.3,
        max_length=32,
        tokens_per_step=128,
        tokens_per_optimizer_step=256,
        max_steps=MAX_STEPS,
        lr=1e-2,
        warmup_steps=1,
        save_every=2,
        keep_last=2,
        log_every=1,
        save_model=True,
        tensorboard=False,
        progress=False,
        device="cpu",
        backend="torch",
        seed=11,
    )
    return {**options, **overrides}


def _run_driver(cases: dict[str, tuple[str, dict]], script: str = __file__) -> dict[str, dict]:
    """Runs ``{label: (case, options)}`` in one driver subprocess (``script``), one case after another."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "always",
    }
    try:
        proc = subprocess.run(
            [sys.executable, script, json.dumps(cases)],
            capture_output=True,
            text=True,
            env=env,
            timeout=DRIVER_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the fault driver ran past {DRIVER_TIMEOUT_S} s", pytrace=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for result in results.values():
        result["log_text"] = Path(result["log"]).read_text() if Path(result["log"]).is_file() else ""
    return results


def _case(runs: dict, label: str) -> dict:
    """The result of case ``label``; fails the test if the driver could not run the case."""
    assert "error" not in runs[label], runs[label].get("error")
    return runs[label]


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


def _train_lines(out: Path) -> list[tuple]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], *(r[k] for k in METRICS)) for r in records if r["split"] == "train"]


def _assert_same_run(out: Path, reference: Path) -> None:
    """Bitwise the reference's final weights, and its train metrics with no step logged twice."""
    import torch

    want, got = _weights(reference), _weights(out)
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "final weights differ from the reference"
    assert _train_lines(out) == _train_lines(reference)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):  # noqa: F811
    """Every faulted run, and the reference, in one driver subprocess (startup is most of a case's time)."""
    root = tmp_path_factory.mktemp("faults")
    truncated = root / "truncated.jsonl"
    rows = (assets / "pairs.jsonl").read_bytes().splitlines(keepends=True)
    last = json.dumps(
        {"prompt": "7 + 5 = ? é", "chosen": "12 ✓", "rejected": "13"}, ensure_ascii=False
    ).encode()
    truncated.write_bytes(b"".join(rows) + last[: last.index("✓".encode()) + 1])  # cut inside a character

    def options(name: str, **overrides) -> dict:
        return _options(assets, root / name, **overrides)

    cases = {
        "reference": ("run", options("reference")),
        "kill9": ("kill9", options("kill9", save_every=1)),
        "SIGTERM": ("SIGTERM", options("SIGTERM", save_every=0)),
        "SIGINT": ("SIGINT", options("SIGINT", save_every=0)),
        "SIGINT twice": ("SIGINT twice", options("twice", save_every=0)),
        "corrupt": ("corrupt", options("corrupt", max_steps=3, save_every=1, keep_last=3)),
        "truncated": ("run", options("truncated", data=str(truncated))),
        "skip truncated": ("run", options("skipping", data=str(truncated), skip_invalid=True)),
        "disk full": ("disk full", options("full")),
        "lr inf": ("run", options("inf", lr="inf")),
        "diverge": ("diverge", options("diverge", save_every=100)),
    }
    results = _run_driver(cases)
    for label, (_, opts) in cases.items():
        results[label]["out"] = Path(opts["output_dir"])
    results["truncated"]["data"] = truncated
    results["truncated"]["line"] = len(rows) + 1
    reference = _case(results, "reference")
    assert reference["codes"] == [0], reference["log_text"][-3000:]
    assert [line[0] for line in _train_lines(reference["out"])] == list(range(1, MAX_STEPS + 1))
    return results


def test_kill_9_at_random_points_resumes_bitwise(runs):
    result = _case(runs, "kill9")
    assert result["codes"] == [0], result["log_text"][-3000:]
    assert result["kills"].count(-signal.SIGKILL) >= KILL_SEEDS // 2, result["kills"]
    for run in result["runs"]:
        _assert_same_run(Path(run), _case(runs, "reference")["out"])


@pytest.mark.parametrize(("case", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_a_checkpoint_exits_with_its_code_and_the_run_resumes(runs, case, code):
    result = _case(runs, case)
    assert result["codes"] == [code, 0], result["log_text"][-3000:]
    (saved,) = result["checkpoints"]  # save_every=0: the signal's checkpoint is the only one
    assert 2 <= int(saved.split("-")[1]) < MAX_STEPS
    assert (
        f"{case} received" in result["log_text"] and "rerun the same command to resume" in result["log_text"]
    )
    _assert_same_run(result["out"], _case(runs, "reference")["out"])


def test_a_second_sigint_aborts_at_once(runs):
    result = _case(runs, "SIGINT twice")
    assert result["codes"] == [130, 0] and "KeyboardInterrupt" in result["log_text"], result["log_text"][
        -3000:
    ]
    assert "rerun the same command to resume" not in result["log_text"].split("KeyboardInterrupt")[0]
    _assert_same_run(result["out"], _case(runs, "reference")["out"])


def test_each_corrupted_checkpoint_file_is_skipped_for_the_previous_checkpoint(runs):
    resumed_runs = _case(runs, "corrupt")["resumed"]
    assert len(resumed_runs) >= 5, "model, optimizer, scheduler, rng, meta and more"
    for name, resumed in resumed_runs.items():
        assert resumed["code"] == 0 and "resumed at step 2" in resumed["log"], (name, resumed["log"][-2000:])
        (warning,) = [line for line in resumed["log"].splitlines() if "skipping checkpoint" in line]
        assert "checkpoint-00000003" in warning and name in warning, (name, warning)


def test_a_truncated_data_file_is_reported_with_its_line(runs):
    result = _case(runs, "truncated")
    assert result["codes"] == [2], result["log_text"][-3000:]
    log = result["log_text"]
    assert f"{result['data']} line {result['line']}" in log and "Traceback" not in log
    skipping = _case(runs, "skip truncated")
    assert skipping["codes"] == [0], skipping["log_text"][-3000:]
    _assert_same_run(skipping["out"], _case(runs, "reference")["out"])


def test_a_full_disk_keeps_the_previous_checkpoint(runs):
    result = _case(runs, "disk full")
    assert result["codes"][0] == 2, result["log_text"][-3000:]
    log = result["log_text"]
    assert (
        "fastdpo train: error:" in log and "No space left on device" in log and "checkpoint-00000004" in log
    )
    assert "Traceback" not in log
    assert [n for n in result["after_full"] if "checkpoint" in n] == ["checkpoint-00000002"]
    assert result["resumed"] == 0 and "resumed at step 2" in result["resumed_log"]
    assert "skipping" not in result["resumed_log"]
    assert result["codes"][1] == 0
    _assert_same_run(result["out"], _case(runs, "reference")["out"])


def test_a_diverging_run_skips_steps_then_stops_without_exporting(runs):
    refused = _case(runs, "lr inf")
    assert refused["codes"] == [2] and "lr: expected a finite float" in refused["log_text"]
    result = _case(runs, "diverge")
    assert result["codes"] == [2], result["log_text"][-3000:]
    assert "3 optimizer steps in a row had a non-finite loss" in result["log_text"]
    records = [json.loads(x) for x in (result["out"] / "metrics.jsonl").read_text().splitlines()]
    expected = [(1, "train"), (2, "skipped"), (3, "skipped"), (4, "skipped")]
    assert [(r["step"], r["split"]) for r in records] == expected
    assert not (result["out"] / "final").exists()


def _driver_main(drive) -> None:  # noqa: ANN001
    """The driver subprocess: runs each ``{label: (case, options)}`` of argv[1] through ``drive`` and prints
    the results as one JSON line (a case that raises is recorded, so only its own test fails)."""
    import torch

    torch.set_num_threads(1)
    results = {}
    for label, (case, options) in json.loads(sys.argv[1]).items():
        try:
            results[label] = drive(case, options)
        except Exception:
            results[label] = {"log": "", "error": traceback.format_exc()}
    print(json.dumps(results))


if __name__ == "__main__":
    _driver_main(_drive)
