"""The ``fastdpo`` command: help, YAML + override parsing, config errors, train and bench delegation."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastdpo import cli
from fastdpo.demo import addition_pairs, build_model, build_tokenizer, demo_train_config
from fastdpo.trainer import TrainConfig

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
        (["--tokens-per-step", "100"], "tokens_per_step: expected an int >= 2 * max_length"),
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
