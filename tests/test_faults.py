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
DRIVER_TIMEOUT_S = 240


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


def _cli(config: Path, *flags: str) -> int:
    from fastdpo.cli import main

    return main(["train", "-c", str(config), *flags])


def _slow_cli(config: Path) -> int:
    """The command with every step 0.2 s longer, so that a signal lands mid-run (no effect on the math)."""
    from fastdpo.train.loop import Trainer

    step = Trainer._train_step

    def slow_step(self, bins):
        time.sleep(0.2)
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
    path.write_text(yaml.safe_dump(options))
    return path


def _drive(case: str, options: dict) -> dict:
    out = Path(options["output_dir"])
    log = out.parent / f"{out.name}.log"
    result: dict = {"log": str(log)}
    if case == "run":
        result["codes"] = [_wait(_child(log, _cli, _write_config(options, "run")))]
    elif case == "kill9":
        # One killed process per seed, at a uniform time over a whole run's duration (steps, checkpoint and
        # pointer writes, the export), each resumed by the next; the last one runs to the end.
        config = _write_config(options, "kill9")
        start = time.monotonic()
        assert _wait(_child(log, _cli, config)) == 0
        duration = time.monotonic() - start
        shutil.rmtree(out)
        result["kills"] = []
        for seed in range(KILL_SEEDS):
            pid = _child(log, _cli, config)
            time.sleep(random.Random(seed).uniform(0.0, duration))
            os.kill(pid, signal.SIGKILL)
            result["kills"].append(_wait(pid))
        result["codes"] = [_wait(_child(log, _cli, config))]
    elif case in ("SIGTERM", "SIGINT", "SIGINT twice"):
        pid = _child(log, _slow_cli, _write_config(options, "signal"))
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and '"step": 2' in metrics.read_text()):
            time.sleep(0.01)
        os.kill(pid, signal.SIGTERM if case == "SIGTERM" else signal.SIGINT)
        if case == "SIGINT twice":
            while "SIGINT received" not in log.read_text():
                time.sleep(0.005)
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


def _options(assets, out: Path, **overrides) -> dict:
    options = dict(
        model=str(assets / "model"),
        data=str(assets / "pairs.jsonl"),
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


def _run_driver(case: str, options: dict) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "always",
    }
    proc = subprocess.run(
        [sys.executable, __file__, case, json.dumps(options)],
        capture_output=True,
        text=True,
        env=env,
        timeout=DRIVER_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log_text"] = Path(result["log"]).read_text()
    return result


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
def reference(assets, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("faults") / "reference"
    result = _run_driver("run", _options(assets, out))
    assert result["codes"] == [0], result["log_text"][-3000:]
    assert [line[0] for line in _train_lines(out)] == list(range(1, MAX_STEPS + 1))
    return out


def test_kill_9_at_random_points_resumes_bitwise(assets, reference):  # noqa: F811
    out = reference.parent / "kill9"
    result = _run_driver("kill9", _options(assets, out, save_every=1))
    assert result["codes"] == [0], result["log_text"][-3000:]
    assert result["kills"].count(-signal.SIGKILL) >= KILL_SEEDS // 2, result["kills"]
    _assert_same_run(out, reference)


@pytest.mark.parametrize(("case", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_a_checkpoint_exits_with_its_code_and_the_run_resumes(assets, reference, case, code):  # noqa: F811
    out = reference.parent / case
    result = _run_driver(case, _options(assets, out, save_every=0))
    assert result["codes"] == [code, 0], result["log_text"][-3000:]
    (saved,) = result["checkpoints"]  # save_every=0: the signal's checkpoint is the only one
    assert 2 <= int(saved.split("-")[1]) < MAX_STEPS
    assert (
        f"{case} received" in result["log_text"] and "rerun the same command to resume" in result["log_text"]
    )
    _assert_same_run(out, reference)


def test_a_second_sigint_aborts_at_once(assets, reference):  # noqa: F811
    out = reference.parent / "twice"
    result = _run_driver("SIGINT twice", _options(assets, out, save_every=0))
    assert result["codes"][0] == 130 and "KeyboardInterrupt" in result["log_text"]
    assert "rerun the same command to resume" not in result["log_text"].split("KeyboardInterrupt")[0]
    _assert_same_run(out, reference)


def test_each_corrupted_checkpoint_file_is_skipped_for_the_previous_checkpoint(assets, reference):  # noqa: F811
    out = reference.parent / "corrupt"
    result = _run_driver("corrupt", _options(assets, out, max_steps=3, save_every=1, keep_last=3))
    assert len(result["resumed"]) >= 5, "model, optimizer, scheduler, rng, meta and more"
    for name, resumed in result["resumed"].items():
        assert resumed["code"] == 0 and "resumed at step 2" in resumed["log"], (name, resumed["log"][-2000:])
        (warning,) = [line for line in resumed["log"].splitlines() if "skipping checkpoint" in line]
        assert "checkpoint-00000003" in warning and name in warning, (name, warning)


def test_a_truncated_data_file_is_reported_with_its_line(assets, reference):  # noqa: F811
    data = reference.parent / "truncated.jsonl"
    rows = (assets / "pairs.jsonl").read_bytes().splitlines(keepends=True)
    last = json.dumps({"prompt": "7 + 5 = ? é", "chosen": "12 ✓", "rejected": "13"}, ensure_ascii=False)
    cut = last.encode()[: last.encode().index("✓".encode()) + 1]  # inside a multi-byte character
    data.write_bytes(b"".join(rows) + cut)
    out = reference.parent / "truncated"
    result = _run_driver("run", _options(assets, out, data=str(data)))
    assert result["codes"] == [2], result["log_text"][-3000:]
    assert f"{data}" in result["log_text"] and f"line {len(rows) + 1}" in result["log_text"]
    assert "Traceback" not in result["log_text"]
    skipping = _run_driver(
        "run", _options(assets, reference.parent / "skipping", data=str(data), skip_invalid=True)
    )
    assert skipping["codes"] == [0], skipping["log_text"][-3000:]
    _assert_same_run(reference.parent / "skipping", reference)


def test_a_full_disk_keeps_the_previous_checkpoint(assets, reference):  # noqa: F811
    out = reference.parent / "full"
    result = _run_driver("disk full", _options(assets, out))
    assert result["codes"][0] == 2, result["log_text"][-3000:]
    message = result["log_text"]
    assert "fastdpo train: error:" in message and "No space left on device" in message
    assert "checkpoint-00000004" in message and "Traceback" not in message.split("fastdpo train: error:")[0]
    assert [n for n in result["after_full"] if "checkpoint" in n] == ["checkpoint-00000002"]
    assert result["resumed"] == 0 and "resumed at step 2" in result["resumed_log"]
    assert "skipping" not in result["resumed_log"]
    assert result["codes"][1] == 0
    _assert_same_run(out, reference)


def test_a_diverging_run_skips_steps_then_stops_without_exporting(assets, reference):  # noqa: F811
    out = reference.parent / "diverge"
    refused = _run_driver("run", _options(assets, reference.parent / "inf", lr="inf"))
    assert refused["codes"] == [2] and "lr: expected a finite float" in refused["log_text"]
    result = _run_driver("diverge", _options(assets, out, save_every=100))
    assert result["codes"] == [2], result["log_text"][-3000:]
    assert "3 optimizer steps in a row had a non-finite loss" in result["log_text"]
    skipped = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in skipped] == [
        (1, "train"),
        (2, "skipped"),
        (3, "skipped"),
        (4, "skipped"),
    ]
    assert not (out / "final").exists()


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    print(json.dumps(_drive(sys.argv[1], json.loads(sys.argv[2]))))
