"""Model identity, bounded memory per row and the lock in ``Trainer.train`` (issue 24), through the command
in a real process: the cases run in ``test_hardening``'s driver subprocess, one training process at a time.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import test_hardening
from test_faults import _case, _options, _run_driver
from test_hardening import _error_line
from test_trainer import assets  # noqa: F401  (a fixture: tiny Llama, tokenizer, 96 addition pairs)


@pytest.fixture(scope="module")
def identity_runs(assets, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("identity")
    model = root / "model"  # a copy, since its weights get replaced
    shutil.copytree(assets / "model", model)
    big = root / "big.jsonl"
    row = {
        "prompt": [{"role": "user", "content": "1+1="}],
        "chosen": [{"role": "assistant", "content": "2" * 10_000_000}],
        "rejected": [{"role": "assistant", "content": "3"}],
    }
    big.write_bytes((assets / "pairs.jsonl").read_bytes() + (json.dumps(row) + "\n").encode())
    cases = {
        "swap": ("swap", _options(assets, root / "swap", model=str(model), max_steps=2, save_every=1)),
        "big row": (
            "big row",
            _options(assets, root / "big", big_data=str(big), max_steps=1, save_every=0, save_model=False),
        ),
    }
    return _run_driver(cases, test_hardening.__file__)


def _log(result: dict, name: str) -> str:
    return Path(result["logs"][name]).read_text()


def test_a_resume_with_changed_data_is_refused_before_the_model_loads(identity_runs):
    result = _case(identity_runs, "swap")
    assert result["codes"][:2] == [0, 2], _log(result, "data")[-3000:]
    assert "Loading weights" in _log(result, "first")
    log = _log(result, "data")
    assert "data (tokenized training pairs)" in _error_line(log) and "Loading weights" not in log
    assert result["ref_files"][1] == result["ref_files"][0], "a refused resume leaves no new cache file"


def test_weights_replaced_in_place_are_a_changed_model(identity_runs):
    result = _case(identity_runs, "swap")
    assert result["same_size_and_mtime"]
    assert result["codes"][2] == 2, _log(result, "swapped")[-3000:]
    log = _log(result, "swapped")
    line = _error_line(log)
    assert (
        "model content ('model.safetensors sha256" in line and "allow_config_change" not in line.split(";")[0]
    )
    assert "Loading weights" not in log and result["ref_files"][2] == result["ref_files"][0]
    # A new run on the same cache does not reuse the reference log-probs of the old weights.
    assert result["codes"][3] == 0, _log(result, "fresh")[-3000:]
    assert "computed, cached at" in _log(result, "fresh")
    assert len(result["ref_files"][3]) == len(result["ref_files"][0]) + 1


def test_a_resume_with_replaced_weights_is_refused_even_with_allow_config_change(assets, tmp_path):  # noqa: F811
    from fastdpo.errors import UserError
    from fastdpo.model_identity import model_identity
    from fastdpo.train.checkpoints import check_resume
    from fastdpo.train.config import TrainConfig

    config = TrainConfig(model=str(assets / "model"), data="d.jsonl", allow_config_change=True)
    identity = model_identity(config.model, tmp_path)
    other = {**identity, "files": {**identity["files"], "model.safetensors": {"size": 1, "sha256": "0" * 64}}}
    extra = {"config": config.to_dict(), "plan": {}, "model_identity": other}
    with pytest.raises(UserError, match=r"model content \('model.safetensors sha256"):
        check_resume(tmp_path / "checkpoint-00000001", extra, config, {}, identity)


def test_model_identity_hashes_once_per_file_version_and_names_the_hub_revision(
    assets,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    from fastdpo import model_identity as mi

    folder = tmp_path / "model"
    shutil.copytree(assets / "model", folder)
    hashed = []
    digest = mi._sha256
    monkeypatch.setattr(mi, "_sha256", lambda path: hashed.append(path.name) or digest(path))
    first = mi.model_identity(str(folder), tmp_path / "cache")
    assert mi.model_identity(str(folder), tmp_path / "cache") == first
    assert hashed.count("model.safetensors") == 1, "a rerun reads the cached hash"
    weights = folder / "model.safetensors"
    stat, data = weights.stat(), bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert mi.model_identity(str(folder), tmp_path / "cache") != first
    # A hub id: the commit of its snapshot in the local cache.
    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    assert mi.model_identity("org/tiny", None) == {"revision": "ab" * 20}


def test_a_10_mb_row_is_cut_before_tokenizing_with_bounded_memory(identity_runs):
    result = _case(identity_runs, "big row")
    assert result["codes"] == [0, 0], result["log_text"][-3000:]
    base, big = result["maxrss_kb"]
    assert big - base < 200 * 1024, f"peak RSS grew by {(big - base) / 1024:.0f} MiB for one 10 MB row"
    assert "1 cut before tokenizing" in result["log_text"]


def test_cut_rows_keep_exactly_the_tokens_of_full_tokenization(assets, monkeypatch):  # noqa: F811
    import datasets
    from transformers import AutoTokenizer

    from fastdpo import data_tokenize
    from fastdpo.data import load_preference_data
    from fastdpo.data_tokenize import tokenize_preferences

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    long, short = "1+2=3 " * 400, "4+5=9"
    text_rows = [
        {"prompt": p, "chosen": c, "rejected": r}
        for p, c, r in [(long, "7", "8"), ("1=", long, short), ("2=", short, long + "1"), ("3=", "5", "6")]
    ]
    chat_rows = [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in text_rows
    ]
    for rows in (text_rows, chat_rows):
        data = load_preference_data(rows)[0]
        for mode, max_prompt_length in (("keep_end", 8), ("keep_start", 8), ("keep_end", None)):
            options = dict(max_length=24, max_prompt_length=max_prompt_length, truncation_mode=mode)
            cut, report = tokenize_preferences(data, tokenizer, **options)
            with monkeypatch.context() as m:
                m.setattr(data_tokenize, "char_budget", lambda *args, **kwargs: None)
                full, full_report = tokenize_preferences(data, tokenizer, **options)
            assert cut.to_list() == full.to_list(), (mode, max_prompt_length)
            assert report.rows_cut == 3 and full_report.rows_cut == 0
            assert isinstance(cut, datasets.Dataset) and report.rows_kept == full_report.rows_kept


def test_trainer_train_takes_the_output_dir_lock(assets, tmp_path):  # noqa: F811
    import subprocess

    from fastdpo.errors import UserError
    from fastdpo.train import TrainConfig, Trainer

    config = TrainConfig(
        **{**_options(assets, tmp_path / "out", max_steps=1, save_every=0), "save_model": False}
    )
    trainer = Trainer(config)
    (tmp_path / "out").mkdir(exist_ok=True)
    holder = (
        "import fcntl, json, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid()}).encode()); "
        "print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder, str(tmp_path / "out" / ".fastdpo.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another fastdpo run \(.*PID {proc.pid}"):
            trainer.train()
    finally:
        proc.kill()
        proc.wait()
    assert trainer.step == 0
    assert trainer.train()["steps"] == {"applied": 1.0, "skipped": 0.0}, "free again once the holder is gone"
