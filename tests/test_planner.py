"""fastdpo plan: the planned (meta) step equals the same step run on real CPU tensors; CLI, JSON, --fit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdpo.memtrack import LiveBytes, host_allocation
from fastdpo.planner.api import GIB, margin_bytes, parse_bytes, plan_memory
from fastdpo.planner.step import StepPlanner, fit_tokens, synthetic_split
from fastdpo.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "model_type": "llama",
    "vocab_size": 1003,
    "hidden_size": 48,
    "intermediate_size": 136,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8192,
}


def _model_config(**overrides):
    from transformers import AutoConfig

    config = AutoConfig.for_model(**{**TINY, **overrides})
    config._attn_implementation = "sdpa"
    return config


def _config(**overrides) -> TrainConfig:
    options = dict(
        model="tiny", data="-", output_dir="unused", device="cpu", max_length=96, max_prompt_length=40,
        tokens_per_step=700, lora_r=4, gradient_checkpointing=True, reference="precompute",
        attn_backend="packed",
    )  # fmt: skip
    return TrainConfig.from_dict({**options, **overrides})


def test_live_bytes_counts_new_storages_not_views_or_parameters():
    weight = torch.nn.Parameter(torch.randn(16, 8))
    with LiveBytes(exclude=[weight]) as tracker:
        x = torch.randn(32, 8)  # 1 KiB
        view = x[:16]
        y = x @ weight.T  # 2 KiB
        del view
        with host_allocation():
            torch.empty(100)
    assert tracker.device_bytes == x.nbytes + y.nbytes
    assert tracker.peak.bytes == x.nbytes + y.nbytes
    assert tracker.host_peak == 400
    del y
    assert sum(a.nbytes for a in tracker.live()) == x.nbytes


def test_synthetic_split_fills_the_budget():
    for shared in (False, True):
        split = synthetic_split(_config(tokens_per_step=1000, shared_prompt=shared))
        assert 990 <= int(split.tokens.sum()) <= 1000
        batch = split.pack(torch.arange(len(split.lengths)).numpy(), shared_prompt=shared)
        assert batch.num_tokens == int(split.tokens.sum())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tokens_per_step": 1500, "max_length": 200, "max_prompt_length": 120, "shared_prompt": True},
        {"lora_r": 0, "reference": "none", "loss_type": "simpo", "tokens_per_step": 900},
        {"gradient_checkpointing": False, "reference": "adapter", "max_grad_norm": 1.0},
    ],
)
def test_plan_equals_the_real_cpu_step(overrides):
    """The meta-device plan for the CPU is the live-bytes peak of the same step on real CPU tensors."""
    config, model_config = _config(**overrides), _model_config()
    torch.manual_seed(0)
    real = StepPlanner(config, model_config, torch.device("cpu"), "cpu").measure(config.tokens_per_step)
    planned = StepPlanner(config, model_config, torch.device("meta"), "cpu").measure(config.tokens_per_step)
    assert planned.tokens == real.tokens
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.02)
    assert planned.where["phase"] == real.where["phase"]
    for part in ("weights", "trainable params", "optimizer state"):
        assert planned.breakdown.get(part) == real.breakdown.get(part), part


def test_plan_equals_the_real_cpu_step_on_the_triton_backend():
    """Tiny shapes through the interpreted Triton kernels (fp32: the interpreter's bf16 dot is not usable)."""
    config = _config(backend="triton", tokens_per_step=300, max_length=64, max_prompt_length=24)
    model_config = _model_config(vocab_size=257, num_hidden_layers=1)
    real = StepPlanner(config, model_config, torch.device("cpu"), "cpu").measure(config.tokens_per_step)
    planned = StepPlanner(config, model_config, torch.device("meta"), "cpu").measure(config.tokens_per_step)
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.02)


def test_checkpointing_moves_the_plan():
    """A change that moves memory shows in the plan by itself: here gradient checkpointing."""
    model_config = _model_config()
    with_ckpt = plan_memory(_config(tokens_per_step=2000), model_config=model_config, device="cpu")
    without = plan_memory(
        _config(tokens_per_step=2000, gradient_checkpointing=False), model_config=model_config, device="cpu"
    )
    assert with_ckpt.peak_bytes < without.peak_bytes
    assert with_ckpt.breakdown["checkpointed activations"] < without.breakdown["checkpointed activations"]


def test_fit_finds_the_largest_step_within_the_budget():
    class Linear:  # peak = 1000 bytes per token
        def measure(self, tokens):
            return type("M", (), {"peak_bytes": 1000 * tokens})()

    assert fit_tokens(Linear(), 2048, 10_000_000) == 9216
    assert fit_tokens(Linear(), 2048, 1_000_000) == 0


@pytest.mark.parametrize(
    "peak",
    [
        lambda t: 5_000_000 + 90 * t,  # weights plus a per-token cost: the planner's usual shape
        lambda t: 5_000_000 + 90 * t + t * t // 50_000,  # convex (attention without flash)
        lambda t: 5_000_000 + 2_000_000 * (t // 40_000),  # steps (tile counts)
        lambda t: 5_000_000 + 60 * t + (3_000_000 if t > 300_000 else 0),  # a jump past the line
        lambda t: 5_000_000 + int(40_000 * t**0.5),  # concave
    ],
)
def test_fit_equals_the_exhaustive_search_in_few_plans(peak):
    """The line-guided search ends on the same step as trying every size, planning a few sizes only."""
    calls = []

    class Planner:
        def measure(self, tokens):
            calls.append(tokens)
            return type("M", (), {"peak_bytes": peak(tokens)})()

    for budget in (40_000_000, 60_000_000, 7_500_000):
        calls.clear()
        expected = max((t for t in range(8192, 2_000_000, 1024) if peak(t) <= budget), default=0)
        assert fit_tokens(Planner(), 8192, budget) == expected
        assert len(calls) == len(set(calls)) <= 16


def test_parse_bytes_and_margin():
    assert parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("24G") == 24 * GIB
    assert margin_bytes(80 * GIB, "cuda") == GIB + 4 * GIB
    assert margin_bytes(80 * GIB, "cpu") == 0
    for bad in ("eighty", "80XB", "-1GiB", "0"):
        with pytest.raises(ValueError, match="gpu-memory"):
            parse_bytes(bad)


def test_cli_plan_json_fit_and_trl(tmp_path):
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps(TINY))
    cmd = [
        sys.executable, "-m", "fastdpo", "plan", "--model", str(config_json), "--max-length", "96",
        "--max-prompt-length", "40", "--tokens-per-step", "512", "--lora-r", "4",
        "--gradient-checkpointing", "--gpu-memory", "1.2GiB", "--fit", "--compare-trl", "--json",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    assert run.returncode == 0, run.stderr[-3000:]
    plan = json.loads(run.stdout)
    assert plan["peak_bytes"] > sum(plan["breakdown"][k] for k in ("weights", "trainable params"))
    assert plan["peak_bytes"] == sum(plan["breakdown"].values())
    assert plan["max_tokens_per_step"] >= 512 and plan["host_bytes"] == 0
    assert plan["trl"]["peak_bytes"] > 0 and plan["trl"]["max_tokens_per_step"] > 0
    table = subprocess.run(cmd[:-1], cwd=ROOT, capture_output=True, text=True, env=_env())
    assert "peak device memory" in table.stdout and "planned (meta-device run)" in table.stdout


def test_trl_plan_has_none_of_fastdpos_memory_options():
    """Stock TRL is planned as stock TRL runs, whichever of fastdpo's mechanisms the config turns on."""
    from fastdpo.planner.trl import NOT_IN_TRL, TRLStepPlanner

    plain = TRLStepPlanner(_config(), _model_config(), "cuda").measure(700)
    every = _config(**dict.fromkeys(set(NOT_IN_TRL) - {"offload_activations"}, True))
    planned = TRLStepPlanner(every, _model_config(), "cuda").measure(700)
    assert (planned.peak_bytes, planned.host_bytes) == (plain.peak_bytes, 0)


def test_cli_plan_errors_are_one_line(tmp_path):
    cmd = [sys.executable, "-m", "fastdpo", "plan", "--model", str(tmp_path / "missing"), "--fit"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "fastdpo plan: error:" in run.stderr


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"OMP_NUM_THREADS": "1"}
