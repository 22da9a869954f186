"""A tiny, fast version of ``fastdpo demo``: the story runs end to end and DPO wins held-out pairs."""

import json
import re

import pytest

from fastdpo import cli
from fastdpo.demo import addition_pairs, build_model, build_tokenizer, run_demo

SUMMARY = re.compile(
    r"held-out reward accuracy (\d\.\d\d) -> (\d\.\d\d), mean margin (-?\d+\.\d{3}) -> (-?\d+\.\d{3})"
)


def test_tiny_demo_improves_heldout_reward_accuracy(tmp_path, capsys, run_tiny_demo):
    result = run_tiny_demo()
    lines = capsys.readouterr().out.strip().splitlines()
    match = SUMMARY.fullmatch(lines[-1])
    assert match, lines[-1]
    assert lines[-1] == result.summary
    before, after, margin_before, margin_after = map(float, match.groups())
    # Before DPO the policy is the reference: every reward is exactly 0.
    assert before == 0.0 and margin_before == 0.0
    # 13 seeds of this tiny setting gave 0.82-0.93; the full demo reaches >= 0.9.
    assert after >= 0.7
    assert margin_after > 0.0
    assert any(line.strip().startswith("greedy answers right") for line in lines)
    assert sum("before DPO:" in line for line in lines) >= 1, "sample generations before/after DPO"
    # The DPO step ran the trainer on the files the demo wrote, as `fastdpo train` would.
    assert (tmp_path / "train.jsonl").is_file() and (tmp_path / "heldout.jsonl").is_file()
    records = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "eval" and records[-1]["rewards/accuracies"] == pytest.approx(
        result.accuracy_after
    )
    assert (tmp_path / "dpo" / "final" / "config.json").is_file()


def test_pairs_are_right_answer_versus_near_miss():
    rows = addition_pairs([(38, 45), (12, 7)])
    assert rows[0]["chosen"][0]["content"] == "83" and rows[0]["rejected"][0]["content"] == "73"
    assert rows[1]["chosen"][0]["content"] == "19" and rows[1]["rejected"][0]["content"] == "29"
    assert rows[0]["prompt"] == [{"role": "user", "content": "38+45="}]


def test_tokenizer_and_model_are_local_and_consistent():
    tokenizer = build_tokenizer()
    messages = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and text.endswith(tokenizer.eos_token)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "3+4=7"
    model = build_model(tokenizer, hidden_size=16, num_layers=1)
    assert model.config.vocab_size == len(tokenizer)
    with pytest.raises(ValueError, match="hidden_size"):
        build_model(tokenizer, hidden_size=10)


def test_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="heldout_fraction"):
        run_demo(heldout_fraction=1.5)
    with pytest.raises(ValueError, match="max_operand"):
        run_demo(max_operand=1)


def test_cli_demo_delegates(monkeypatch):
    seen = {}
    monkeypatch.setattr("fastdpo.demo.run_demo", lambda **kw: seen.update(kw))
    assert cli.main(["demo", "--seed", "3", "--dpo-steps", "5"]) == 0
    assert seen == {"seed": 3, "sft_steps": 1200, "dpo_steps": 5, "workdir": None, "loss": "dpo"}
    assert cli.main(["demo", "--loss", "kto"]) == 0 and seen["loss"] == "kto"
