"""Checkpoints: exact resume, atomicity under crashes and kills, tied weights, mismatches, final export."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import fastdpo.checkpoint.local as ck
from fastdpo.checkpoint import (
    CheckpointError,
    io,
    latest_checkpoint,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    save_final,
)

VOCAB = 64


def _config(*, tie: bool = False, layers: int = 2, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )


def _llama(seed: int, **kwargs) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(_config(**kwargs))


def _lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + 0.5 * step)


def _optim(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda)


def _train_step(model: nn.Module, optimizer, scheduler) -> torch.Tensor:
    """One step whose batch, dropout masks and loss noise come from all three global RNGs."""
    model.train()
    length = random.randint(8, 16)
    batch = torch.randint(0, VOCAB, (2, length))
    scale = 1.0 + float(np.random.rand())
    loss = model(input_ids=batch, labels=batch).loss * scale * (1.0 + 0.01 * torch.randn(()))
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint-*"))


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))


def test_exact_resume_bit_for_bit(tmp_path: Path) -> None:
    _seed_all(0)
    model = _llama(0)
    optimizer, scheduler = _optim(model)
    for _ in range(3):
        _train_step(model, optimizer, scheduler)
    data_state = {"epoch": 0, "batches_seen": 3, "order": (3, 1, 2)}
    extra = {"best": 1.5, "history": torch.arange(3.0)}
    path = save_checkpoint(
        tmp_path, 3, model=model, optimizer=optimizer, scheduler=scheduler, data_state=data_state, extra=extra
    )
    continued = torch.stack([_train_step(model, optimizer, scheduler) for _ in range(3)])
    continued_params = _params(model)

    def resume(restore_rng: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
        _seed_all(1234)
        fresh = _llama(1)
        fresh_opt, fresh_sched = _optim(fresh)
        info = load_checkpoint(
            latest_checkpoint(tmp_path),
            model=fresh,
            optimizer=fresh_opt,
            scheduler=fresh_sched,
            restore_rng=restore_rng,
        )
        losses = torch.stack([_train_step(fresh, fresh_opt, fresh_sched) for _ in range(3)])
        assert fresh_sched.last_epoch == scheduler.last_epoch
        assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        assert fresh_opt.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]
        return losses, _params(fresh), info

    assert latest_checkpoint(tmp_path) == path
    losses, params, info = resume(restore_rng=True)
    assert torch.equal(losses, continued)
    _assert_same_params(params, continued_params)
    assert info["step"] == 3
    assert info["data_state"] == data_state
    assert isinstance(info["data_state"]["order"], tuple)
    assert info["extra"]["best"] == 1.5
    assert torch.equal(info["extra"]["history"], extra["history"])

    # The comparison above can fail: without the RNG states the resumed run draws other batches.
    losses, _, _ = resume(restore_rng=False)
    assert not torch.equal(losses, continued)


def test_layout_is_pickle_free_and_keys_are_flat(tmp_path: Path) -> None:
    model = _llama(0, tie=True)
    optimizer, scheduler = _optim(model)
    _train_step(model, optimizer, scheduler)
    # Wrappers are looked through: keys carry no "module." prefix.
    path = save_checkpoint(
        tmp_path, 1, model=nn.DataParallel(model), optimizer=optimizer, scheduler=scheduler
    )
    assert path == tmp_path / "checkpoint-00000001"
    assert (tmp_path / "latest").read_text().strip() == path.name
    names = sorted(os.listdir(path))
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 1 and meta["version"] == ck.FORMAT_VERSION
    assert set(meta["files"]) | {"meta.json"} == set(names)

    weights = safetensors.torch.load_file(path / "model.safetensors")
    assert "model.embed_tokens.weight" in weights and "lm_head.weight" not in weights
    assert meta["model"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert not any(k.startswith("module.") for k in weights)

    opt_tensors = safetensors.torch.load_file(path / "optimizer.safetensors")
    state = optimizer.state_dict()["state"]
    for idx, entry in state.items():
        for name, value in entry.items():
            assert torch.equal(opt_tensors[f"state.{idx}.{name}"], value)
    assert not list(tmp_path.glob(".tmp-*"))


def test_rng_states_restored(tmp_path: Path) -> None:
    _seed_all(7)
    model = _linear()
    path = save_checkpoint(tmp_path, 0, model=model)
    expected = (random.random(), np.random.rand(3), torch.rand(3))
    _seed_all(8)
    load_checkpoint(path, model=model)
    got = (random.random(), np.random.rand(3), torch.rand(3))
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_state_trees_round_trip(tmp_path: Path) -> None:
    base = torch.randn(6)
    extra = {
        "ints": {1: "a", (2, 3): [4, (5, 6)]},
        "floats": [math.inf, -0.0, 0.1 + 0.2],
        "arrays": {"u32": np.arange(5, dtype=np.uint32), "f64": np.random.rand(2, 3)},
        "numpy_scalar": np.int64(9),
        "__tensor__": "a key that looks like a tag",
        "same_tensor_twice": [base, base],
        "views": [base[:3], base[3:]],
        "none": None,
    }
    path = save_checkpoint(tmp_path, 0, model=_linear(), extra=extra, data_state={"pos": 12})
    info = load_checkpoint(path, model=_linear())
    got = info["extra"]
    assert got["ints"] == {1: "a", (2, 3): [4, (5, 6)]}
    assert got["floats"][0] == math.inf and math.copysign(1.0, got["floats"][1]) < 0
    assert got["floats"][2] == 0.1 + 0.2
    assert got["arrays"]["u32"].dtype == np.uint32 and np.array_equal(got["arrays"]["u32"], np.arange(5))
    assert np.array_equal(got["arrays"]["f64"], extra["arrays"]["f64"])
    assert got["numpy_scalar"] == 9
    assert got["__tensor__"] == "a key that looks like a tag"
    assert all(torch.equal(t, base) for t in got["same_tensor_twice"])
    assert torch.equal(torch.cat(got["views"]), base)
    assert got["none"] is None
    assert info["data_state"] == {"pos": 12}

    with pytest.raises(TypeError, match="extra.*object"):
        save_checkpoint(tmp_path, 1, model=_linear(), extra={"bad": object()})
    assert latest_checkpoint(tmp_path) == path


def test_crash_mid_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _linear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    first = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer)
    saved = _params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_write = io.write_tensors
    calls = []

    def failing_write(path, tensors, metadata):
        calls.append(path.name)
        real_write(path, tensors, metadata)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(io, "write_tensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer)
    assert calls == ["model.safetensors", "optimizer.safetensors"]
    assert latest_checkpoint(tmp_path) == first
    assert (tmp_path / "latest").read_text().strip() == first.name
    assert not (tmp_path / "checkpoint-00000002").exists()
    assert not list(tmp_path.glob(".tmp-*"))  # a plain exception cleans its temp folder

    fresh = _linear(1)
    load_checkpoint(latest_checkpoint(tmp_path), model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()))
    _assert_same_params(_params(fresh), saved)


class _Killed(BaseException):
    """Stands for a kill: like SIGKILL it is not caught by the save's cleanup."""


def _kill(*args, **kwargs) -> None:
    raise _Killed


def test_kill_before_meta_leaves_stale_temp_that_next_save_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _linear()
    first = save_checkpoint(tmp_path, 1, model=model, data_state={"pos": 1})
    real_write = io.write_json

    def killed_at_meta(path, obj):
        if path.name == "meta.json":
            raise _Killed
        real_write(path, obj)

    monkeypatch.setattr(io, "write_json", killed_at_meta)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, 2, model=model, data_state={"pos": 2})
    monkeypatch.undo()

    stale = list(tmp_path.glob(".tmp-checkpoint-00000002-*"))
    assert len(stale) == 1 and (stale[0] / "model.safetensors").is_file()
    assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first, model=_linear(1))["data_state"] == {"pos": 1}

    third = save_checkpoint(tmp_path, 3, model=model, keep_last=2)
    assert not list(tmp_path.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path) == third
    assert _checkpoint_names(tmp_path) == [first.name, third.name]


def test_crash_before_latest_pointer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _linear()
    first = save_checkpoint(tmp_path, 1, model=model)
    monkeypatch.setattr(io, "write_pointer", _kill)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, 2, model=model)
    monkeypatch.undo()
    # The new folder is complete but the pointer still names the previous one, which stays valid.
    assert (tmp_path / "checkpoint-00000002" / "meta.json").is_file()
    assert latest_checkpoint(tmp_path) == first
    # Without a usable pointer the newest complete checkpoint is chosen.
    (tmp_path / "latest").write_text("checkpoint-00000099\n")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000002"
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000002"


def test_kill_while_resaving_same_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _linear()
    first = save_checkpoint(tmp_path, 1, model=model, data_state={"version": "old"})
    real_replace = os.replace
    calls = []

    def killed_between_moves(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise _Killed
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", killed_between_moves)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, 1, model=model, data_state={"version": "new"})
    monkeypatch.undo()
    assert calls[1] == first.name and not first.exists()
    moved = latest_checkpoint(tmp_path)
    assert moved is not None and moved.name.startswith(".trash-checkpoint-00000001-")
    assert load_checkpoint(moved, model=_linear(1))["data_state"] == {"version": "old"}

    # A second kill before the new folder is complete must not lose the moved-aside one.
    monkeypatch.setattr(io, "write_json", _kill)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, 1, model=model, data_state={"version": "new"})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == moved

    again = save_checkpoint(tmp_path, 1, model=model, data_state={"version": "new"})
    assert not list(tmp_path.glob(".t*"))
    assert latest_checkpoint(tmp_path) == again
    assert load_checkpoint(again, model=_linear(1))["data_state"] == {"version": "new"}


def test_sigkill_mid_save_in_subprocess(tmp_path: Path) -> None:
    if not hasattr(signal, "SIGKILL"):
        pytest.skip("needs POSIX signals")
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        from torch import nn
        import fastdpo.checkpoint as ck
        from fastdpo.checkpoint import io

        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        optimizer = torch.optim.AdamW(model.parameters())
        ck.save_checkpoint({str(tmp_path)!r}, 1, model=model, optimizer=optimizer)
        real_write = io.write_tensors

        def write_then_die(path, tensors, metadata):
            real_write(path, tensors, metadata)
            os.kill(os.getpid(), signal.SIGKILL)

        io.write_tensors = write_then_die
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ck.save_checkpoint({str(tmp_path)!r}, 2, model=model, optimizer=optimizer)
        sys.exit(3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"
    assert list(tmp_path.glob(".tmp-checkpoint-00000002-*"))
    fresh = _linear(5)
    load_checkpoint(tmp_path / "checkpoint-00000001", model=fresh)
    _assert_same_params(_params(fresh), _params(_linear(0)))
    save_checkpoint(tmp_path, 2, model=fresh)
    assert not list(tmp_path.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000002"


def test_keep_last_and_resave(tmp_path: Path) -> None:
    model = _linear()
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model=model, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-00000003",
        "checkpoint-00000004",
    ]

    # Resuming from step 3 and saving it again replaces the folder in place.
    with torch.no_grad():
        model[0].bias.fill_(7.0)
    again = save_checkpoint(tmp_path, 3, model=model, keep_last=2)
    assert latest_checkpoint(tmp_path) == again
    fresh = _linear(1)
    load_checkpoint(again, model=fresh)
    assert torch.equal(fresh[0].bias, torch.full((3,), 7.0))
    # A checkpoint from the abandoned later timeline (step 4) is neither pruned nor chosen.
    assert (tmp_path / "checkpoint-00000004").is_dir()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-00000003",
        "checkpoint-00000004",
    ]

    for step in range(5, 8):
        save_checkpoint(tmp_path, step, model=model, keep_last=None)
    assert len(list(tmp_path.glob("checkpoint-*"))) == 5
    save_checkpoint(tmp_path, 8, model=model, keep_last=1)
    assert _checkpoint_names(tmp_path) == ["checkpoint-00000008"]

    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 9, model=model, keep_last=0)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, model=model)
    with pytest.raises(TypeError, match="model"):
        save_checkpoint(tmp_path, 9, model={"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="model_weights"):
        save_checkpoint(tmp_path, 9, model=model, model_weights="some")
    assert latest_checkpoint(tmp_path / "missing") is None


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    _seed_all(3)
    model = _llama(0, tie=True)
    optimizer, scheduler = _optim(model)
    _train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler)

    fresh = _llama(1, tie=True)
    fresh_opt, fresh_sched = _optim(fresh)
    assert not torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    _assert_same_params(_params(fresh), _params(model))
    model.eval()
    fresh.eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_mismatched_model_raises(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, model=_llama(0))
    with pytest.raises(
        ValueError, match=r"shape mismatches.*model\.embed_tokens\.weight: checkpoint \(64, 32\)"
    ):
        load_checkpoint(path, model=_llama(0, hidden=48))
    with pytest.raises(ValueError, match=r"missing keys.*model\.layers\.2\.mlp\.down_proj\.weight"):
        load_checkpoint(path, model=_llama(0, layers=3))
    deeper = save_checkpoint(tmp_path / "deep", 1, model=_llama(0, layers=3))
    with pytest.raises(ValueError, match=r"unexpected keys.*model\.layers\.2\.self_attn\.q_proj\.weight"):
        load_checkpoint(deeper, model=_llama(0))
    with pytest.raises(ValueError, match=r"dtype mismatches.*torch\.float32 vs model torch\.float64"):
        load_checkpoint(path, model=_llama(0).double())
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(path, model=_llama(0), optimizer=torch.optim.SGD(_linear().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="latest_checkpoint"):
        load_checkpoint(tmp_path, model=_llama(0))
    (path / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="not a complete"):
        load_checkpoint(path, model=_llama(0))
    with pytest.warns(UserWarning, match="skipping checkpoint.*model.safetensors has 9 bytes"):
        with pytest.raises(ValueError, match=f"no valid fastdpo-checkpoint in {tmp_path}"):
            latest_checkpoint(tmp_path)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")


@pytest.mark.parametrize("tie", [False, True])
def test_save_final_loads_with_from_pretrained(tmp_path: Path, tie: bool) -> None:
    from transformers import AutoTokenizer

    _seed_all(4)
    model = _llama(0, tie=tie)
    optimizer, scheduler = _optim(model)
    _train_step(model, optimizer, scheduler)
    out = tmp_path / "final"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a previous export is replaced
    assert save_final(model, out, tokenizer=_tokenizer()) == out
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".trash-*"))
    assert list(out.glob("*.safetensors"))

    # Same attention implementation as the trained model, so the logits can be compared bit for bit.
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    _assert_same_params(_params(loaded), _params(model))
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AutoTokenizer.from_pretrained(out)("w1 w5 w7")["input_ids"] == [1, 5, 7]

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing to replace"):
        save_final(model, other)
    assert (other / "keep.txt").read_text() == "x"


def _lora(seed: int, rank: int = 4):
    peft = pytest.importorskip("peft")
    base = _llama(0)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(base, config)


def test_peft_lora_round_trip_and_merged_final(tmp_path: Path) -> None:
    _seed_all(5)
    model = _lora(10)
    optimizer, scheduler = _optim(model)
    for _ in range(2):
        _train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, scheduler=scheduler)
    stored = safetensors.torch.load_file(path / "model.safetensors")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(stored) == trainable and all("lora_" in k for k in stored)
    continued = torch.stack([_train_step(model, optimizer, scheduler) for _ in range(2)])

    _seed_all(99)
    fresh = _lora(11)
    fresh_opt, fresh_sched = _optim(fresh)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched)
    resumed = torch.stack([_train_step(fresh, fresh_opt, fresh_sched) for _ in range(2)])
    assert torch.equal(resumed, continued)
    _assert_same_params(_params(fresh), _params(model))

    full = save_checkpoint(tmp_path / "full", 4, model=model, model_weights="full")
    assert len(safetensors.torch.load_file(full / "model.safetensors")) == len(model.state_dict())

    out = save_final(model, tmp_path / "final")
    assert hasattr(model, "peft_config") and any("lora_A" in n for n, _ in model.named_parameters())
    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(loaded) is LlamaForCausalLM
    assert not any("lora" in k for k in loaded.state_dict())
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits.double()
        got = loaded(ids).logits.double()
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match=r"shape mismatches.*lora_A"):
        load_checkpoint(path, model=_lora(0, rank=8))


# --------------------------------------------------------------------------------------------------
# Verification, fallback, disk full, no pickle
# --------------------------------------------------------------------------------------------------


def _two_checkpoints(run_dir: Path) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Checkpoints at steps 1 and 2 holding every kind of file; returns step 1's weights and the model."""
    model = _linear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda)
    extra = {"history": torch.arange(3.0), "note": "x"}
    states = []
    for step in (1, 2):
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        states.append(_params(model))
        save_checkpoint(
            run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
            data_state={"pos": step}, extra=extra,
        )  # fmt: skip
    return states[0], model


def _flip(path: Path, offset: int) -> None:
    """Same-size corruption: inverts the byte at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _corruptions(folder: Path) -> list[tuple[str, int, str]]:
    """``(file, offset, where)``: the middle of each JSON, and of each safetensors header and tensor data."""
    cases = []
    for path in sorted(folder.iterdir()):
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            header = int.from_bytes(path.read_bytes()[:8], "little")
            cases.append((path.name, 8 + header // 2, "header"))
            cases.append((path.name, 8 + header + (size - 8 - header) // 2, "tensor data"))
        else:
            cases.append((path.name, size // 2, "json"))
    return cases


def test_same_size_corruption_of_any_file_is_skipped_with_a_warning(tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    first_weights, _ = _two_checkpoints(pristine)
    cases = _corruptions(pristine / "checkpoint-00000002")
    assert {name for name, _, _ in cases} == {
        "meta.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
        "rng.json", "rng.safetensors", "data_state.json", "extra.json", "extra.safetensors",
    }  # fmt: skip
    for i, (name, offset, where) in enumerate(cases):
        run = tmp_path / f"case{i}"
        shutil.copytree(pristine, run)
        bad = run / "checkpoint-00000002"
        _flip(bad / name, offset)
        with pytest.warns(
            UserWarning, match=rf"skipping checkpoint {re.escape(str(bad))}: {re.escape(name)}"
        ):
            assert resume_point(run) == (run / "checkpoint-00000001", "local"), (name, where)
        with pytest.warns(UserWarning, match=re.escape(name)):
            assert latest_checkpoint(run) == run / "checkpoint-00000001"
        with pytest.raises(
            CheckpointError, match=rf"{re.escape(str(bad))} is not a complete.*{re.escape(name)}"
        ):
            load_checkpoint(bad, model=_linear(1))
        fresh = _linear(1)
        assert load_checkpoint(run / "checkpoint-00000001", model=fresh)["data_state"] == {"pos": 1}
        _assert_same_params(_params(fresh), first_weights)


def test_no_valid_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    _two_checkpoints(tmp_path)
    _flip(tmp_path / "checkpoint-00000002" / "model.safetensors", 3)  # the header's length
    (tmp_path / "checkpoint-00000001" / "optimizer.json").write_text("{" * 10 + " " * 1000)
    with pytest.warns(UserWarning, match="skipping"):
        with pytest.raises(CheckpointError) as err:
            resume_point(tmp_path)
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert str(tmp_path) in message and "every checkpoint failed a check" in message
    assert "checkpoint-00000002: model.safetensors" in message
    assert "checkpoint-00000001: optimizer.json" in message
    assert resume_point(tmp_path / "empty") is None
    with pytest.raises(ValueError, match="kind must be"):
        resume_point(tmp_path, "zip")


def test_old_format_and_garbled_metadata_are_skipped(tmp_path: Path) -> None:
    _two_checkpoints(tmp_path)
    meta_path = tmp_path / "checkpoint-00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "step": 7}))
    with pytest.warns(UserWarning, match="meta.json does not match its checksum"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"
    meta_path.write_text(json.dumps({**meta, "version": 1}))
    with pytest.warns(UserWarning, match="version 1; expected 'fastdpo-checkpoint' version 2"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"
    meta_path.write_text("[]")
    with pytest.warns(UserWarning, match="holds list, not an object"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"
    outside = {**meta, "files": {**meta["files"], "../checkpoint-00000001/meta.json": {"size": 1}}}
    meta_path.write_text(json.dumps({**outside, "checksum": io._checksum(outside)}))
    with pytest.warns(UserWarning, match="outside the checkpoint folder"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"
    (tmp_path / "latest").write_bytes(b"\xff\xfe")  # a garbled pointer: newest valid first
    with pytest.warns(UserWarning, match="outside"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000001"


@pytest.mark.parametrize("failing", ["write_tensors", "write_json", "write_pointer"])
def test_disk_full_mid_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    first_weights, model = _two_checkpoints(tmp_path)
    real = getattr(io, failing)

    def disk_full(*args, **kwargs):
        if failing == "write_pointer":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kwargs)
        target = args[0]  # left half-written, as a full disk does
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(io, failing, disk_full)
    with pytest.raises(OSError, match=r"could not save checkpoint .*checkpoint-00000003 \(No space") as err:
        save_checkpoint(tmp_path, 3, model=model)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert "latest still names the previous checkpoint" in str(err.value)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-00000002"
    assert not list(tmp_path.glob(".tmp-checkpoint-*"))
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-00000002"
    assert resume_point(tmp_path) == (tmp_path / "checkpoint-00000002", "local")
    assert load_checkpoint(tmp_path / "checkpoint-00000002", model=_linear(1))["step"] == 2


class _Payload:
    """Unpickling it creates ``marker``: a stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_payload_never_runs(tmp_path: Path) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control)))  # the payload works: a load path that unpickles fails
    assert control.exists()

    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(marker))
    pristine = tmp_path / "pristine"
    _two_checkpoints(pristine)
    names = sorted(p.name for p in (pristine / "checkpoint-00000002").iterdir())
    planted = [*names, "model.pt", "optimizer.pt", "pytorch_model.bin", ".metadata", "training_args.bin"]
    for i, name in enumerate(planted):
        run = tmp_path / f"case{i}"
        shutil.copytree(pristine, run)
        (run / "checkpoint-00000002" / name).write_bytes(payload)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            point = resume_point(run)
        expected = "checkpoint-00000001" if name in names else "checkpoint-00000002"
        assert point == (run / expected, "local"), name
        load_checkpoint(point[0], model=_linear(1), restore_rng=False)
        try:
            load_checkpoint(run / "checkpoint-00000002", model=_linear(1), restore_rng=False)
        except CheckpointError:
            assert name in names
        assert not marker.exists(), f"unpickled a payload planted in {name}"
