"""The benchmark scripts' CPU reduced modes run end to end and check every provider before timing it."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 300) -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_bench_logprobs_cpu_mode(tmp_path):
    path = tmp_path / "head.csv"
    text = _run(
        "bench_logprobs.py", "--hidden", "32", "--vocab", "300", "--tokens", "64", "--reps", "1",
        "--providers", "naive,trl,torch-chunked,fastdpo,fastdpo-chunked,mm4", "--csv", str(path),
        "--plot", str(tmp_path / "head.png"),
    )  # fmt: skip
    assert "CPU reduced mode" in text
    rows = {r["provider"]: r for r in csv.DictReader(path.open())}
    assert set(rows) == {"naive", "trl", "torch-chunked", "fastdpo", "fastdpo-chunked", "mm4"}
    for name in ("naive", "trl", "torch-chunked", "fastdpo", "fastdpo-chunked"):
        assert float(rows[name]["logp_err"]) < 1e-4 and float(rows[name]["dh_err"]) < 1e-4
    assert (tmp_path / "head.png").stat().st_size > 0


def test_bench_logprobs_cpu_memory_mode(tmp_path):
    path = tmp_path / "mem.csv"
    _run(
        "bench_logprobs.py", "--cpu-memory", "--tokens", "64", "--hidden", "16", "--vocab", "300",
        "--providers", "naive,torch-chunked,fastdpo-chunked", "--csv", str(path),
    )  # fmt: skip
    rows = {r["provider"]: r for r in csv.DictReader(path.open())}
    assert set(rows) == {"naive", "torch-chunked", "fastdpo-chunked"}
    for r in rows.values():
        assert float(r["logp_err"]) < 1e-4 and float(r["dh_err"]) < 1e-4
        assert float(r["fwd_bwd_ms"]) > 0
    assert float(rows["fastdpo-chunked"]["fwd_bwd_ms_over_naive"]) > 0
    assert rows["fastdpo-chunked"]["extra_peak_rss_mb_over_torch-chunked"]


def test_roofline_model_and_measured_csv(tmp_path):
    path = tmp_path / "head.csv"
    path.write_text(
        "provider,tokens,hidden,vocab,fwd_ms,bwd_ms,fwd_bwd_ms\n"
        "fastdpo-nofilter,4096,1024,32768,1.0,2.0,3.0\nmm4,4096,1024,32768,,,1.5\nnaive,999,1024,32768,1,1,1\n"
    )
    text = _run("roofline.py", "--custom", "4096,1024,32768", "--gpu", "a100", "--csv", str(path))
    lines = [x for x in text.splitlines() if x.startswith("| ")]
    table = {tuple(c.strip() for c in x.strip("|").split("|")[:2]): x for x in lines[1:]}
    assert {impl for impl, _ in table} == {"floor", "fused", "chunked", "trl", "naive"}
    assert "Modeled on A100" in text
    floor = float(table[("floor", "fwd+bwd")].split("|")[6])
    assert abs(floor - 1e3 * 8 * 4096 * 1024 * 32768 / 312e12) < 0.06
    assert "| 3.0 |" in table[("fused", "fwd+bwd")] and "not measured" in table[("naive", "fwd")]


def test_static_report_help():
    text = _run("static_report.py", "--help")
    assert "--custom" in text and "--gate" in text


def test_bench_logprobs_rejects_unknown_provider():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_logprobs.py"), "--providers", "nope"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode != 0 and "unknown providers" in out.stderr


def test_bench_loss_cpu_mode(tmp_path):
    path = tmp_path / "loss.csv"
    _run(
        "bench_loss.py", "--pairs", "2", "--seq", "24", "--hidden", "16", "--vocab", "200", "--reps", "1",
        "--providers", "naive,trl,fastdpo", "--csv", str(path),
    )  # fmt: skip
    rows = {r["provider"]: r for r in csv.DictReader(path.open())}
    for name in ("naive", "trl", "fastdpo"):
        assert float(rows[name]["loss_err"]) < 1e-5


def test_bench_packing_small(tmp_path):
    _run("bench_packing.py", "--pairs", "2000", "--repeats", "1", "--csv", str(tmp_path / "pack.csv"))
    assert (tmp_path / "pack.csv").exists()


@pytest.mark.slow
def test_bench_trainer_tiny(tmp_path):
    path = tmp_path / "trainer.csv"
    _run("bench_trainer.py", "--tiny", "--mode", "throughput", "--csv", str(path), timeout=600)
    rows = list(csv.DictReader(path.open()))
    assert {r["provider"] for r in rows} == {"fastdpo", "trl"}
    assert all(r["status"] == "ok" for r in rows), rows


@pytest.mark.slow
def test_bench_trainer_max_context_uses_the_long_context_settings(tmp_path):
    """max-context runs fastdpo with configs/llama3-8b-long.yaml's memory settings and, with --plan, puts
    that configuration's planned peak beside it."""
    path = tmp_path / "ctx.csv"
    cmd = (
        "bench_trainer.py",
        "--tiny",
        "--mode",
        "max-context",
        "--tokens",
        "512",
        "--plan",
        "--csv",
        str(path),
    )
    _run(*cmd, timeout=600)
    rows = {r["provider"]: r for r in csv.DictReader(path.open())}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["fastdpo"]["long_context"] == "True" and float(rows["fastdpo"]["planned_gb"]) > 0
    assert rows["trl"]["long_context"] == "False"


@pytest.mark.slow
def test_bench_trainer_mechanisms_runs_each_variant(tmp_path):
    path = tmp_path / "mech.csv"
    _run(
        "bench_trainer.py",
        "--tiny",
        "--mode",
        "mechanisms",
        "--tokens",
        "256",
        "--csv",
        str(path),
        timeout=600,
    )
    rows = list(csv.DictReader(path.open()))
    variants = ["checkpointing", "+ offload_checkpoints", "+ tiled_mlp", "+ lean_norms", "+ all three"]
    assert [r["variant"] for r in rows] == variants
    assert all(r["status"] == "ok" and float(r["step_s"]) > 0 for r in rows), rows


def test_bench_loss_kto_cpu_mode(tmp_path):
    path = tmp_path / "loss_kto.csv"
    _run(
        "bench_loss.py", "--loss", "kto", "--pairs", "2", "--seq", "24", "--hidden", "16", "--vocab", "200",
        "--reps", "1", "--providers", "naive,trl,liger,fastdpo", "--csv", str(path),
    )  # fmt: skip
    rows = {r["provider"]: r for r in csv.DictReader(path.open())}
    for name in ("naive", "trl", "fastdpo"):
        assert rows[name]["loss"] == "kto"
        assert float(rows[name]["loss_err"]) < 1e-5 and float(rows[name]["dh_err"]) < 1e-5


def test_bench_loss_stats_cpu_mode(tmp_path):
    path = tmp_path / "loss_stats.csv"
    _run(
        "bench_loss.py", "--stats", "--pairs", "2", "--seq", "24", "--hidden", "16", "--vocab", "200",
        "--reps", "3", "--csv", str(path),
    )  # fmt: skip
    (row,) = list(csv.DictReader(path.open()))
    for key in ("fwd_ms", "fwd_stats_ms", "step_stats_ms", "step_old_extra_pass_ms"):
        assert float(row[key]) > 0, key
    float(row["stats_fwd_overhead_pct"]), float(row["step_saved_ms"])  # present and numeric


def test_plan_figures_setups_plan_and_fit_a_small_model():
    """plan_figures' three setups on a small Llama: the options lower fastdpo's peak and put the
    checkpoints on the host; TRL's plan has none of them; a fit stays within its budget."""
    from transformers import AutoConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import plan_figures as pf
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    shape = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4)
    model_config = AutoConfig.for_model("llama", vocab_size=2048, num_key_value_heads=2, **shape)
    config = pf.base_config(1024 + 512)
    plans = {setup: pf.planner(setup, config, model_config).measure(8192) for setup in pf.SETUPS}
    ckpt, long, trl = (plans[s] for s in pf.SETUPS)
    assert long.peak_bytes < ckpt.peak_bytes and long.host_bytes > 0 == ckpt.host_bytes == trl.host_bytes
    planner = pf.planner(pf.SETUPS[1], config, model_config)
    budget = ckpt.peak_bytes
    best = pf.fit_tokens(planner, 2 * config.max_length, budget)
    assert (
        best >= 8192 and planner.measure(best).peak_bytes <= budget < planner.measure(best + 1024).peak_bytes
    )
