"""Hardening of ``fastdpo train`` (issue 24): the output_dir lock, an honest end of a bad run, config and
path checks, early one-line errors and data warnings, each through the command in a real process.

As in ``test_faults``, one driver subprocess imports torch and fastdpo once and forks one training process
at a time (one thread), so that startup is paid once for the whole file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest
from test_faults import _case, _child, _cli, _options, _run_driver, _wait, _write_config
from test_trainer import assets  # noqa: F401  (a fixture: tiny Llama, tokenizer, 96 addition pairs)

# ---------------------------------------------------------------------- the driver (runs in a subprocess)


def _hold_lock(out: Path, ready: Path) -> int:
    """Holds ``out``'s run lock until SIGTERM, as a running ``fastdpo train`` does."""
    from fastdpo.train.runlock import RunLock

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    with RunLock(out):
        ready.write_text("held")
        signal.sigwait({signal.SIGTERM})
    return 0


def _patched_norm_cli(config: Path, norms: dict) -> int:
    """The command with the gradient norm of the steps in ``norms`` (1-based) replaced by theirs."""
    from fastdpo.train import loop

    clip, calls = loop.clip_gradients, []

    def clip_gradients(model, max_norm):
        calls.append(None)
        norm = clip(model, max_norm)
        return float(norms.get(str(len(calls)), norm))

    loop.clip_gradients = clip_gradients
    return _cli(config)


def _drive(case: str, options: dict) -> dict:
    out = Path(options["output_dir"])
    log = out.parent / f"{out.name}.log"
    result: dict = {"log": str(log)}
    if case == "run":
        flags = options.pop("flags", [])
        result["codes"] = [_wait(_child(log, _cli, _write_config(options, "run"), *flags))]
    elif case == "lock":
        ready = out.parent / f"{out.name}.ready"
        holder = _child(out.parent / f"{out.name}-holder.log", _hold_lock, out, ready)
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        result["holder"] = holder
        result["codes"] = [_wait(_child(log, _cli, _write_config(options, "second")))]
        os.kill(holder, signal.SIGTERM)
        result["codes"].append(_wait(holder))
        # A lock file naming a process that died (this host, a PID no longer alive) is taken over.
        dead = _child(log, lambda: 0)
        _wait(dead)
        stale = {"host": socket.gethostname(), "pid": dead, "started": "2026-01-01T00:00:00+00:00"}
        (out / ".fastdpo.lock").write_text(json.dumps(stale))
        result["dead"] = dead
        result["codes"].append(_wait(_child(log, _cli, _write_config(options, "stale"))))
        result["lock_after"] = (out / ".fastdpo.lock").read_text()
    elif case == "norms":
        norms = options.pop("norms")
        result["codes"] = [_wait(_child(log, _patched_norm_cli, _write_config(options, "norms"), norms))]
    else:
        raise ValueError(f"unknown case {case!r}")
    if out.is_dir():
        result["files"] = sorted(p.name for p in out.iterdir())
    return result


# ---------------------------------------------------------------------- the tests (run by pytest)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("hardening")

    def options(name: str, **overrides) -> dict:
        return _options(assets, root / name, **{"max_steps": 3, "save_model": True, **overrides})

    cases = {
        "lock": ("lock", options("lock", max_steps=1, save_every=0, save_model=False)),
        "probe": ("run", options("probe", lr=1e30, max_grad_norm=0.0, save_every=0)),
        "bad end": (
            "norms",
            options("bad-end", max_steps=4, save_every=1, keep_last=1, norms={"3": "nan", "4": "nan"}),
        ),
        "zero": ("norms", options("zero", max_steps=4, save_every=0, norms={"2": 0, "3": 0, "4": 0})),
        "good": ("run", options("good", max_steps=2, save_every=0)),
    }
    results = _run_driver(cases, __file__)
    for label, (_, opts) in cases.items():
        results[label]["out"] = Path(opts["output_dir"])
    return results


def _error_line(log: str) -> str:
    (line,) = [x for x in log.splitlines() if x.startswith("fastdpo train: error:")]
    assert "Traceback" not in log, log[-3000:]
    return line


def test_a_second_run_on_a_locked_output_dir_fails_and_a_stale_lock_is_taken_over(runs):
    result = _case(runs, "lock")
    assert result["codes"] == [2, 0, 0], result["log_text"][-3000:]
    line = _error_line(result["log_text"].split("taking over")[0])
    assert str(result["out"]) in line and f"PID {result['holder']}" in line and socket.gethostname() in line
    assert "started 20" in line
    (warning,) = [x for x in result["log_text"].splitlines() if "taking over the stale lock" in x]
    assert f"PID {result['dead']}" in warning
    assert result["lock_after"] == "", "a clean end empties the lock file"


def test_a_run_ending_on_skipped_steps_exits_2_and_exports_nothing(runs):
    result = _case(runs, "probe")  # --lr 1e30 --max-grad-norm 0 --max-steps 3
    assert result["codes"] == [2], result["log_text"][-3000:]
    line = _error_line(result["log_text"])
    assert "last step (3) was skipped" in line and "nothing was exported" in line
    assert "final" not in result["files"]


def test_a_bad_streak_keeps_the_last_good_checkpoint_whatever_keep_last(runs):
    result = _case(runs, "bad end")
    assert result["codes"] == [2], result["log_text"][-3000:]
    line = _error_line(result["log_text"])
    assert "2 applied, 2 skipped" in line and str(result["out"] / "checkpoint-00000002") in line
    checkpoints = [n for n in result["files"] if n.startswith("checkpoint-")]
    assert checkpoints == ["checkpoint-00000002", "checkpoint-00000004"]  # keep_last=1 kept step 2
    assert "final" not in result["files"]


def test_gradient_norms_of_zero_in_a_row_stop_the_run(runs):
    result = _case(runs, "zero")
    assert result["codes"] == [2], result["log_text"][-3000:]
    line = _error_line(result["log_text"])
    assert "3 optimizer steps in a row had a gradient norm of exactly 0" in line and "no-ops" in line
    assert "final" not in result["files"]


def test_the_summary_reports_applied_and_skipped_steps(runs):
    result = _case(runs, "good")
    assert result["codes"] == [0], result["log_text"][-3000:]
    assert "steps: 2 applied, 0 skipped" in result["log_text"]


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    results = {}
    for label, (case, options) in json.loads(sys.argv[1]).items():
        try:
            results[label] = _drive(case, options)
        except Exception:  # recorded, so that the other cases still run and only this one's test fails
            import traceback

            results[label] = {"log": "", "error": traceback.format_exc()}
    print(json.dumps(results))
