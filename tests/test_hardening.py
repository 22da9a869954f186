"""Hardening of ``fastdpo train`` (issue 24): the output_dir lock, an honest end of a bad run, config and
path checks, early one-line errors and data warnings, each through the command in a real process.

As in ``test_faults``, one driver subprocess imports torch and fastdpo once and forks one training process
at a time (one thread), so that startup is paid once for the whole file.
"""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
from test_faults import (
    _case,
    _child,
    _cli,
    _driver_main,
    _options,
    _run_driver,
    _slow_cli,
    _wait,
    _write_config,
)
from test_trainer import assets  # noqa: F401  (a fixture: tiny Llama, tokenizer, 96 addition pairs)

# ---------------------------------------------------------------------- the driver (runs in a subprocess)


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


def _safetensors_full_cli(config: Path, from_step: int) -> int:
    """The command on a full disk as safetensors' Rust writer reports it: a ``SafetensorError``, not an
    ``OSError``, from checkpoint ``from_step`` on."""
    import safetensors
    import safetensors.torch

    save_file = safetensors.torch.save_file

    def save_until_full(tensors, filename, metadata=None):
        match = re.search(r"checkpoint-(\d{8})", str(filename))
        if match and int(match.group(1)) >= from_step:
            Path(filename).write_bytes(b"\0" * 64)
            message = 'IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            raise safetensors.SafetensorError(f"Error while serializing: {message}")
        return save_file(tensors, filename, metadata=metadata)

    safetensors.torch.save_file = save_until_full
    return _cli(config)


def _drive(case: str, options: dict) -> dict:
    out = Path(options["output_dir"])
    log = out.parent / f"{out.name}.log"
    result: dict = {"log": str(log)}
    if case == "run":
        flags = options.pop("flags", [])
        result["codes"] = [_wait(_child(log, _cli, _write_config(options, "run"), *flags))]
    elif case == "lock":
        # A real run holds the lock while it trains (each step slowed by 0.5 s); a second one fails at once.
        metrics = out / "metrics.jsonl"
        holder = _child(out.parent / f"{out.name}-holder.log", _slow_cli, _write_config(options, "first"))
        deadline = time.monotonic() + 60
        while not (metrics.is_file() and '"step": 1' in metrics.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        result["holder"] = holder
        result["codes"] = [_wait(_child(log, _cli, _write_config(options, "second"))), _wait(holder)]
        # A lock file naming a process that died (this host, a PID no longer alive) is taken over.
        dead = _child(log, lambda: 0)
        _wait(dead)
        stale = {"host": socket.gethostname(), "pid": dead, "started": "2026-01-01T00:00:00+00:00"}
        (out / ".fastdpo.lock").write_text(json.dumps(stale))
        result["dead"] = dead
        result["codes"].append(_wait(_child(log, _cli, _write_config(options, "stale"))))
        result["lock_after"] = (out / ".fastdpo.lock").read_text()
    elif case == "safetensors full":
        result["codes"] = [_wait(_child(log, _safetensors_full_cli, _write_config(options, "full"), 3))]
    elif case == "cache":
        # A first run fills the caches; then its reference entry gets another key (same file name, valid
        # sha256), and a second run; then a byte of each entry is flipped, and a third run.
        from safetensors import safe_open
        from safetensors.torch import save_file

        cache = Path(options["cache_dir"])
        result["codes"] = [_wait(_child(log, _cli, _write_config(options, "fill")))]
        (ref,) = cache.glob("ref-logps-*.safetensors")
        with safe_open(ref, framework="pt") as f:
            metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata["key"] = json.dumps({**json.loads(metadata["key"]), "model": "another"})
        save_file(tensors, ref, metadata=metadata)
        result["codes"].append(_wait(_child(log, _cli, _write_config(options, "rekeyed"))))
        (arrow,) = cache.glob("tokenized-*/data/*.arrow")
        for path in (ref, arrow):
            data = bytearray(path.read_bytes())
            data[-9] ^= 0xFF
            path.write_bytes(bytes(data))
        result["codes"].append(_wait(_child(log, _cli, _write_config(options, "flipped"))))
        result["entries"] = [str(ref), str(arrow.parent.parent)]
    elif case == "norms":
        norms = options.pop("norms")
        result["codes"] = [_wait(_child(log, _patched_norm_cli, _write_config(options, "norms"), norms))]
    elif case == "swap":
        _drive_swap(options, result)
    elif case == "big row":
        # The same one-step run without and with a 10 MB row: the peak RSS of each training process.
        result["codes"], result["maxrss_kb"] = [], []
        for name, data in (("base", options["data"]), ("big", options.pop("big_data"))):
            pid = _child(log, _cli, _write_config({**options, "data": data}, name))
            _, status, usage = os.wait4(pid, 0)
            result["codes"].append(os.waitstatus_to_exitcode(status))
            result["maxrss_kb"].append(usage.ru_maxrss)
    else:
        raise ValueError(f"unknown case {case!r}")
    if out.is_dir():
        result["files"] = sorted(p.name for p in out.iterdir())
    if (out / "latest").is_file():
        result["latest"] = (out / "latest").read_text().strip()
    return result


def _drive_swap(options: dict, result: dict) -> None:
    """A run with checkpoints; its data changed and the run resumed; its model's weights replaced in place
    by another model's (same architecture and size, the mtime put back as ``cp -p`` would) and the same
    command rerun; then a new run on the same cache. Each refused resume must leave no new cache file."""
    from fastdpo.demo import build_model, build_tokenizer

    out, cache = Path(options["output_dir"]), Path(options["cache_dir"])
    logs = {name: out.parent / f"{out.name}-{name}.log" for name in ("first", "data", "swapped", "fresh")}
    result["logs"] = {name: str(path) for name, path in logs.items()}
    result["codes"], result["ref_files"] = [], []

    def run(name: str, **overrides) -> None:
        config = _write_config({**options, **overrides}, name)
        result["codes"].append(_wait(_child(logs[name], _cli, config)))
        result["ref_files"].append(sorted(p.name for p in cache.glob("ref-logps-*")))

    run("first")
    fewer = out.parent / "fewer.jsonl"
    fewer.write_text("".join(Path(options["data"]).read_text().splitlines(keepends=True)[:90]))
    run("data", data=str(fewer))
    weights = Path(options["model"]) / "model.safetensors"
    before = weights.stat()
    other = out.parent / "other-model"
    build_model(build_tokenizer(), hidden_size=32, num_layers=2, seed=4321).save_pretrained(other)
    shutil.copyfile(other / "model.safetensors", weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    result["same_size_and_mtime"] = (weights.stat().st_size, weights.stat().st_mtime_ns) == (
        before.st_size,
        before.st_mtime_ns,
    )
    run("swapped")
    run("fresh", output_dir=str(out.parent / f"{out.name}-fresh"))


# ---------------------------------------------------------------------- the tests (run by pytest)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("hardening")
    rows = (assets / "pairs.jsonl").read_bytes()
    bom_data = root / "bom.jsonl"
    bom_data.write_bytes(codecs.BOM_UTF8 + rows)
    bad_data = root / "bad.jsonl"
    bad_data.write_bytes(rows + b'{"prompt": "1 + 1 = ?"}\n')
    empty = root / "empty.jsonl"
    empty.write_bytes(b"\n")
    invalid = root / "invalid.jsonl"
    invalid.write_text('{"prompt": "1 + 1 = ?"}\n' * 3)
    single = root / "single.jsonl"
    single.write_text(json.dumps({"prompt": "1 + 1 = ?", "completion": "2", "label": True}) + "\n")
    duplicated = root / "duplicated.jsonl"
    duplicated.write_bytes(rows + b"".join(rows.splitlines(keepends=True)[:5]))
    short = root / "short-model"  # max_position_embeddings 64, under the case's max_length 80
    shutil.copytree(assets / "model", short)
    model_config = json.loads((short / "config.json").read_text())
    assert model_config["max_position_embeddings"] == 64

    def options(name: str, **overrides) -> dict:
        return _options(assets, root / name, **{"max_steps": 3, "save_model": True, **overrides})

    cases = {
        "lock": ("lock", options("lock", max_steps=8, save_every=0, save_model=False)),
        "probe": ("run", options("probe", lr=1e30, max_grad_norm=0.0, save_every=0)),
        "bad end": (
            "norms",
            options("bad-end", max_steps=4, save_every=1, keep_last=1, norms={"3": "nan", "4": "nan"}),
        ),
        "none applied": ("norms", options("none", max_steps=2, save_every=0, norms={"1": "nan", "2": "nan"})),
        "zero": ("norms", options("zero", max_steps=4, save_every=0, norms={"2": 0, "3": 0, "4": 0})),
        "good": ("run", options("good", max_steps=2, save_every=0)),
        "bom": ("run", options("bom", data=str(bom_data), max_steps=1, save_every=0, save_model=False)),
        "failed": ("run", options("failed", data=str(bad_data), save_every=0)),
        "empty": ("run", options("empty", data=str(empty))),
        "all invalid": ("run", options("invalid", data=str(invalid), skip_invalid=True)),
        "kto single": ("run", options("kto", data=str(single), loss_type="kto")),
        "safetensors full": ("safetensors full", options("st-full", max_steps=4, save_every=2)),
        "cache": ("cache", options("cache", cache_dir=str(root / "cache-case"), max_steps=1, save_every=0)),
        "warnings": (
            "run",
            options(
                "warnings",
                model=str(short),
                data=str(duplicated),
                max_length=80,
                max_prompt_length=4,
                tokens_per_step=160,
                tokens_per_optimizer_step=320,
                max_steps=1,
                save_every=0,
                save_model=False,
            ),
        ),
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


def test_a_run_that_applied_no_step_exits_2(runs):
    result = _case(runs, "none applied")
    assert result["codes"] == [2], result["log_text"][-3000:]
    line = _error_line(result["log_text"])
    assert "no step was applied (0 applied, 2 skipped" in line and "start over" in line
    assert "final" not in result["files"]


def test_a_bad_streak_keeps_the_last_good_checkpoint_whatever_keep_last(runs):
    result = _case(runs, "bad end")
    assert result["codes"] == [2], result["log_text"][-3000:]
    line = _error_line(result["log_text"])
    assert "2 applied, 2 skipped" in line and str(result["out"] / "checkpoint-00000002") in line
    checkpoints = [n for n in result["files"] if n.startswith("checkpoint-")]
    # No checkpoint is written during a bad streak, so the good one stays the resume point.
    assert checkpoints == ["checkpoint-00000002"] and result["latest"] == "checkpoint-00000002"
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


def test_a_utf8_bom_opens_yaml_json_and_jsonl_files(runs, tmp_path):
    from fastdpo.cli import load_config
    from fastdpo.data_sources import source_rows

    result = _case(runs, "bom")
    assert result["codes"] == [0], result["log_text"][-3000:]
    row = {"prompt": "1 + 1 = ?", "chosen": "2", "rejected": "3"}
    for suffix, text in ((".json", json.dumps([row])), (".jsonl", json.dumps(row) + "\n")):
        path = tmp_path / f"bom{suffix}"
        path.write_bytes(codecs.BOM_UTF8 + text.encode())
        assert [r for _, r in source_rows(path, "train")] == [row]
    config = tmp_path / "bom.yaml"
    config.write_bytes(codecs.BOM_UTF8 + b"model: m\ndata: d.jsonl\nlr: 0.001\n")
    assert load_config(config).lr == 0.001


def test_a_duplicate_yaml_key_is_a_one_line_error_naming_it(tmp_path, capsys):
    from fastdpo.cli import main

    config = tmp_path / "dup.yaml"
    config.write_text("model: m\ndata: d.jsonl\nlr: 0.001\nbeta: 0.1\nlr: 0.002\n")
    assert main(["train", "-c", str(config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "duplicate key 'lr' at line 5" in line and str(config) in line


def test_an_empty_output_dir_is_an_error(tmp_path, capsys):
    from fastdpo.cli import main

    assert main(["train", "--model", "m", "--data", "d.jsonl", "--output-dir", ""]) == 2
    assert "output_dir: expected a folder path (not empty)" in capsys.readouterr().err


def test_a_failed_run_removes_the_empty_output_dir_it_created(runs):
    result = _case(runs, "failed")
    assert result["codes"] == [2], result["log_text"][-3000:]
    assert "line 97" in _error_line(result["log_text"])
    assert not result["out"].exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no rows (the data is empty)"),
        ("all invalid", "all 3 rows are invalid"),
        ("kto single", "1 usable example, but loss_type kto needs at least 2"),
    ],
)
def test_unusable_data_is_a_one_line_error_before_the_model_loads(runs, case, message):
    result = _case(runs, case)
    assert result["codes"] == [2], result["log_text"][-3000:]
    assert message in _error_line(result["log_text"])
    assert "Loading weights" not in result["log_text"]


def _model_copy(assets, tmp_path, edit) -> Path:  # noqa: F811
    folder = tmp_path / "model"
    shutil.copytree(assets / "model", folder)
    edit(folder)
    return folder


def test_pickled_weights_remote_code_and_an_uncached_hub_id_offline_are_refused_up_front(
    assets,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,  # noqa: F811
):
    from fastdpo.cli import main

    def pickled(folder: Path) -> None:
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")

    def remote_code(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MyModel"}
        (folder / "config.json").write_text(json.dumps(config))

    base = ["train", "--data", str(assets / "pairs.jsonl"), "--output-dir", str(tmp_path / "out")]
    expected = {
        pickled: "holds only pickled weights (pytorch_model.bin)",
        remote_code: "needs its own Python code (config.json auto_map: AutoModelForCausalLM)",
    }
    for edit, message in expected.items():
        folder = _model_copy(assets, tmp_path / edit.__name__, edit)
        assert main([*base, "--model", str(folder)]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line and str(folder) in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*base, "--model", "fastdpo-tests/no-such-model"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "fastdpo-tests/no-such-model is a hub id that is not in the local cache" in line
    assert not (tmp_path / "out").exists()


def test_a_full_disk_reported_by_safetensors_is_a_one_line_error(runs):
    result = _case(runs, "safetensors full")
    assert result["codes"] == [2], result["log_text"][-3000:]
    line = _error_line(result["log_text"])
    assert "No space left on device" in line and "checkpoint-00000004" in line
    assert [n for n in result["files"] if n.startswith("checkpoint-")] == ["checkpoint-00000002"]


def test_warnings_for_max_length_truncation_and_duplicate_rows(runs):
    result = _case(runs, "warnings")
    assert result["codes"] == [0], result["log_text"][-3000:]
    log = result["log_text"]
    assert "max_length 80 is over the model's max_position_embeddings 64" in log
    assert re.search(r"(\d+) of \1 rows were truncated to max_length 80", log)
    assert "5 duplicate rows" in log


def test_a_reused_cache_entry_is_checked_against_its_key_and_sha256(runs):
    result = _case(runs, "cache")
    assert result["codes"] == [0, 0, 0], result["log_text"][-3000:]
    ref, tokenized = result["entries"]
    fill, rekeyed, flipped = result["log_text"].split("final model:")[:3]
    assert "recomputing" not in fill
    (line,) = [x for x in rekeyed.splitlines() if "recomputing" in x]
    assert f"reference log-prob cache {ref}: its key (model, data, options) differs" in line
    warnings = [x for x in flipped.splitlines() if "recomputing" in x]
    assert len(warnings) == 2, warnings
    assert f"tokenization cache {tokenized}: its files do not match their recorded sha256" in warnings[0]
    assert f"reference log-prob cache {ref}: its contents do not match their recorded sha256" in warnings[1]


if __name__ == "__main__":
    _driver_main(_drive)
