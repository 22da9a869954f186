"""The ``fastdpo`` command: help, YAML + override parsing, config errors, train and bench delegation."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastdpo import cli
from fastdpo.demo import addition_pairs, build_model, build_tokenizer, demo_train_config, run_demo
from fastdpo.errors import UserError
from fastdpo.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_help_documents_every_option():
    out = subprocess.run(
        [sys.executable, "-m", "fastdpo", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in out, flag
        assert f.metadata["help"].split()[0] in out, f.name
    for word in ("--config", "--set", "--print-config"):
        assert word in out
    top = subprocess.run(
        [sys.executable, "-m", "fastdpo", "--help"], capture_output=True, text=True, check=True
    )
    assert all(command in top.stdout for command in ("train", "demo", "bench"))


def test_yaml_then_flags_then_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: m\ndata: d.jsonl\nlr: 1e-5\nbeta: 0.2\nmax_length: 64\nlora_target_modules: [q_proj]\n"
        "gradient_checkpointing: yes\n"
    )
    config = cli.load_config(
        path,
        flags={"beta": "0.3", "tokens_per_step": "256", "shared_prompt": False},
        overrides=["beta=0.4", "max-length=100", "lora_target_modules=a, b", "eval_data=none", "seed= 5"],
    )
    assert config.lr == 1e-5 and isinstance(config.lr, float)
    assert config.beta == 0.4
    assert config.max_length == 100 and config.tokens_per_step == 256
    assert config.lora_target_modules == ["a", "b"]
    assert config.eval_data is None and config.seed == 5
    assert config.gradient_checkpointing is True and config.shared_prompt is False


def test_print_config_round_trips(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": "d.jsonl", "epochs": 2}))
    assert cli.main(["train", "-c", str(path), "--lr", "3e-6", "--no-shared-prompt", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = TrainConfig(model="m", data="d.jsonl", epochs=2, lr=3e-6, shared_prompt=False)
    assert TrainConfig.from_dict(printed) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "betta=0.2"], "'betta' (did you mean 'beta'?)"),
        (["--set", "beta"], "expected KEY=VALUE"),
        (["--max-length", "abc"], "max_length: expected int"),
        (["--tokens-per-step", "100"], "tokens_per_step: expected auto or an int >= 2 * max_length"),
        (["--reference", "model"], "ref_model"),
        (["--reference", "adapter"], "lora_r"),
        (["--loss-type", "dpo"], "loss_type"),
        (["--eval-fraction", "0.1", "--eval-data", "x.jsonl"], "eval_fraction: expected 0 when eval_data"),
        (["--set", "resume=maybe"], "resume: expected true or false"),
        (["--beta", "0"], "beta: expected a float > 0"),
        (["--lora-target-modules", ""], None),
    ],
)
def test_bad_config_errors(argv, message, capsys):
    base = ["train", "--model", "m", "--data", "d.jsonl", "--print-config"]
    code = cli.main(base + argv)
    err = capsys.readouterr().err
    if message is None:
        assert code == 0
        return
    assert code == 2
    assert message in err, err


def test_config_type_errors():
    with pytest.raises(TypeError, match="epochs: expected int"):
        TrainConfig(model="m", data="d", epochs=True)
    with pytest.raises(ValueError, match="max_steps: expected an int"):
        TrainConfig(model="m", data="d", max_steps=2.5)
    with pytest.raises(ValueError, match="model: expected a model folder"):
        TrainConfig(data="d")
    with pytest.raises(TypeError, match="expected a mapping"):
        TrainConfig.from_dict(["model"])


def test_yaml_must_be_a_mapping(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("- model\n- data\n")
    assert cli.main(["train", "-c", str(path)]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_unknown_argument_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--model", "m", "--data", "d", "--no-such-flag", "1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--foo"], "fastdpo train: error: unrecognized arguments: --foo"),
        (["train", "--betta", "0.2"], "unrecognized arguments: --betta (did you mean --beta?) 0.2"),
        (["train", "--max-lenght=64"], "--max-lenght=64 (did you mean --max-length?)"),
        (["demo", "--sft-stepz", "3"], "fastdpo demo: error: unrecognized arguments: --sft-stepz (did you"),
        (["demo", "--dpo-steps", "0"], "argument --dpo-steps: expected an int >= 1, got 0"),
    ],
)
def test_subcommand_errors_show_the_subcommands_usage(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("fastdpo.demo.run_demo", lambda **kw: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"usage: fastdpo {argv[0]} "), err
    assert message in err, err


def test_negative_numbers_are_values(capsys):
    base = ["train", "--model", "m", "--data", "d.jsonl", "--print-config"]
    assert cli.main([*base, "--seed", "-3", "--max-grad-norm", "-0.0"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == -3 and printed["max_grad_norm"] == 0.0
    for value in ("-1e-3", "-.5", "-2E+1", "-inf"):
        assert cli.main([*base, "--lr", value]) == 2
        err = capsys.readouterr().err
        # A negative value reaches the config check (-inf is caught as non-finite first).
        assert err.startswith("fastdpo train: error: lr: expected a ") and ", got -" in err, err
    assert cli.main([*base, "--lr=-1e-3"]) == 2
    assert "lr: expected a float > 0, got -0.001" in capsys.readouterr().err


def test_unknown_yaml_key_suggests_the_closest(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("model: m\ndata: d.jsonl\nwarmup_ration: 0.1\n")
    assert cli.main(["train", "-c", str(tmp_path / "run.yaml"), "--print-config"]) == 2
    assert "'warmup_ration' (did you mean 'warmup_ratio'?)" in capsys.readouterr().err


@pytest.fixture
def run_files(tmp_path, monkeypatch):
    """A model folder, a data file and a `train` that fails the test if a run gets that far."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "pairs.jsonl").write_text(json.dumps(addition_pairs([(1, 2)])[0]) + "\n")
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_dir").mkdir()

    def no_training(config):
        raise AssertionError("the checks before loading a model let a bad run through")

    monkeypatch.setattr(cli, "train", no_training)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--data", "missing.jsonl"], "data: missing.jsonl: no such file or directory"),
        (["--data", "a_file"], "data: a_file: unsupported file type ''"),
        (
            ["--eval-data", "model"],
            "eval_data: model: expected a directory written by datasets' save_to_disk",
        ),
        (["--model", "./missing"], "model: ./missing: no such folder"),
        (["--model", "model/sub"], "model: model/sub: no such folder"),
        (["--model", "~/not/a/hub/id"], "model: ~/not/a/hub/id: no such folder"),
        (["--model", "a_file"], "model: a_file is a file"),
        (["--model", "."], "model: . has no config.json"),
        (["--ref-model", "../missing", "--reference", "model"], "ref_model: ../missing: no such folder"),
        (
            ["--tokenizer", "a_dir"],
            "tokenizer: a_dir has no tokenizer_config.json or tokenizer.json or config.json",
        ),
        (["--output-dir", "a_file/run"], "output_dir: cannot create or write the folder a_file/run"),
        (["--cache-dir", "a_file"], "cache_dir: cannot create or write the folder a_file"),
        (["--device", "cuda:x"], "device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ],
)
def test_paths_are_checked_before_any_model_loads(run_files, flags, message, capsys):
    argv = ["train", "--model", "model", "--data", "pairs.jsonl", "--output-dir", "out", *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"fastdpo train: error: {err.partition('error: ')[2]}" and err.count("\n") == 1, err
    assert message in err, err
    assert cli.main([*argv, "--debug"]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_cuda_device_is_checked_without_a_gpu(run_files, monkeypatch, capsys):
    argv = ["train", "--model", "model", "--data", "pairs.jsonl", "--output-dir", "out", "--device"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([*argv, "cuda"]) == 2
    assert "device: 'cuda' needs a CUDA GPU, but torch sees none" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cli.main([*argv, "cuda:2"]) == 2
    assert "device: 'cuda:2', but torch sees 2 CUDA device(s), cuda:0 to cuda:1" in capsys.readouterr().err
    assert not torch.cuda.is_initialized()


def test_a_hub_id_is_left_to_transformers(run_files, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "train", lambda config: seen.append(config.model) or {})
    assert cli.main(["train", "--model", "org/model-7b", "--data", "pairs.jsonl", "--output-dir", "out"]) == 0
    assert seen == ["org/model-7b"] and (run_files / "out").is_dir()


def test_user_errors_during_the_run_exit_2_and_bugs_keep_the_traceback(run_files, monkeypatch, capsys):
    argv = ["train", "--model", "model", "--data", "pairs.jsonl"]

    def diverged(config):
        raise UserError("loss: non-finite for 3 steps in a row")

    monkeypatch.setattr(cli, "train", diverged)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "fastdpo train: error: loss: non-finite for 3 steps in a row\n"
    assert cli.main(["--debug", *argv]) == 2
    assert "Traceback" in capsys.readouterr().err

    def bug(config):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr(cli, "train", bug)
    with pytest.raises(ValueError, match="internal shape mismatch"):
        cli.main(argv)


def test_command_line_errors_are_one_line_and_exit_2(tmp_path):
    argv = [sys.executable, "-m", "fastdpo", "train", "--model", "./no-such-model", "--data", "d.jsonl"]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert (
        run.stderr == "fastdpo train: error: model: ./no-such-model: no such folder (expected a "
        "save_pretrained folder or a hub id)\n"
    )
    assert not (tmp_path / "runs").exists()


def test_train_command_runs_the_trainer(tmp_path, capsys):
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=16, num_layers=1).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = addition_pairs([(a, b) for a in range(6) for b in range(6)])
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": str(tmp_path / "model"), "data": str(tmp_path / "pairs.jsonl"), "max_length": 32}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    argv = [
        "train",
        "-c",
        str(tmp_path / "run.yaml"),
        "--output-dir",
        str(tmp_path / "out"),
        "--max-steps",
        "2",
    ]
    argv += ["--tokens-per-step", "256", "--no-progress", "--no-tensorboard", "--set", "eval_fraction=0.25"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "train: loss" in out and "eval: loss" in out and "rewards/accuracies" in out
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["max_steps"] == 2


def test_bench_maps_shapes_and_delegates(tmp_path, monkeypatch, capsys):
    calls = []

    class FakeBench:
        def __init__(self, name):
            self.name = name

        def main(self, argv):
            calls.append((self.name, argv))

    monkeypatch.setattr(cli, "_bench_module", FakeBench)
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"text_config": {"hidden_size": 3584, "vocab_size": 256000, "final_logit_softcapping": 30.0}}
        )
    )
    out = tmp_path / "res"
    argv = ["bench", "--model-config", str(config), "--tokens", "4096", "--out", str(out), "--reps", "2"]
    assert cli.main(argv) == 0
    assert out.is_dir(), "the scripts save their CSV and plot into --out, which must exist"
    shape = ["--hidden", "3584", "--vocab", "256000"]
    assert calls == [
        (
            "logprobs",
            [*shape, "--tokens", "4096", "--softcap", "30.0", "--csv", f"{out}/logprobs.csv"]
            + ["--plot", f"{out}/logprobs.png", "--reps", "2"],
        ),
        ("loss", [*shape, "--seq", "4096", "--csv", f"{out}/loss.csv", "--reps", "2"]),
    ]
    assert cli.main(["bench", "logprobs", "--hidden", "64"]) == 2
    assert "--hidden and --vocab go together" in capsys.readouterr().err
    assert cli.main(["bench", "loss", "--tokens", "1", "--tokens", "2"]) == 2
    capsys.readouterr()
    assert cli.main(["bench", "loss", "--out", str(config)]) == 2
    assert "fastdpo bench: error: --out: cannot create or write the folder" in capsys.readouterr().err
    calls.clear()
    assert cli.main(["--debug", "bench", "--out", str(out), "--reps", "3"]) == 0
    assert [name for name, _ in calls] == ["logprobs", "loss"] and calls[1][1][-2:] == ["--reps", "3"]


def test_bench_runs_the_real_script(capsys, tmp_path):
    argv = ["bench", "loss", "--hidden", "32", "--vocab", "128", "--tokens", "16", "--reps", "1"]
    assert (
        cli.main(argv + ["--out", str(tmp_path), "--providers", "naive,fastdpo", "--dtype", "float32"]) == 0
    )
    out = capsys.readouterr().out
    assert "provider=naive" in out and "provider=fastdpo" in out
    assert (tmp_path / "loss.csv").read_text().startswith("provider,")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config = cli.load_config(path)
    assert isinstance(config, TrainConfig)


def test_demo_yaml_is_the_demos_train_config():
    assert cli.load_config(CONFIGS / "demo.yaml") == demo_train_config("runs/demo")


def test_demo_keeps_the_final_model_it_names(tmp_path, monkeypatch, caplog):
    """Without --workdir the demo used a temporary folder and named a final model it then deleted."""
    monkeypatch.chdir(tmp_path)
    lines = []
    small = {"max_operand": 6, "hidden_size": 8, "num_layers": 1, "sft_steps": 2, "sft_batch_size": 4}
    with caplog.at_level("INFO", logger="fastdpo"):
        run_demo(**small, dpo_steps=1, tokens_per_step=64, progress=False, echo=lines.append)
    named = [
        line.split("final model")[1].strip(" :") for line in lines + caplog.messages if "final model" in line
    ]
    assert named, lines
    for path in named:
        assert (Path(path) / "config.json").is_file(), path
    assert [p.parent for p in (tmp_path / "runs").glob("demo-*/dpo/final")] != []
