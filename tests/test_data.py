"""Tests for fastdpo.data: formats, sources, chat templates, truncation, cache and error messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import fastdpo.data_tokenize as data_module
from fastdpo.data import DataReport, load_preference_data, tokenize_preferences
from fastdpo.errors import UserError

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
STANDARD = [
    {"prompt": "What color is the sky?", "chosen": " It is blue.", "rejected": " It is green."},
    {"prompt": "Where is the sun?", "chosen": " In the sky.", "rejected": " In the sea."},
]
CONVERSATIONAL = [
    {
        "prompt": [{"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "It is blue."}],
        "rejected": [{"role": "assistant", "content": "It is green."}],
    }
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    special = ["<pad>", "</s>", "<s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [row["prompt"] + row["chosen"] + row["rejected"] for row in STANDARD] * 3
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write(path: Path, rows: list, fmt: str) -> Path:
    """Writes rows as jsonl, json, parquet or a saved dataset directory and returns the path."""
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif fmt == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "saved"])
@pytest.mark.parametrize("rows", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
def test_every_file_source_loads_the_same_rows(tmp_path: Path, fmt: str, rows: list) -> None:
    path = write(tmp_path / f"data.{fmt}", rows, fmt)
    ds, report = load_preference_data(path)
    assert ds.to_list() == rows
    assert (report.rows_read, report.rows_kept, report.num_dropped) == (len(rows), len(rows), 0)


def test_in_memory_sources_and_splits(tmp_path: Path) -> None:
    assert load_preference_data(STANDARD)[0].to_list() == STANDARD
    assert load_preference_data(datasets.Dataset.from_list(STANDARD))[0].to_list() == STANDARD
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(STANDARD[:1]), "test": datasets.Dataset.from_list(STANDARD[1:])}
    )
    assert load_preference_data(dd, split="test")[0].to_list() == STANDARD[1:]
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_preference_data(tmp_path / "dd", split="test")[0].to_list() == STANDARD[1:]
    with pytest.raises(ValueError, match="split 'dev' not found"):
        load_preference_data(dd, split="dev")


def test_messages_keep_only_role_and_content() -> None:
    row = copy.deepcopy(CONVERSATIONAL[0])
    row["chosen"][0]["name"] = "bot"
    assert load_preference_data([row])[0][0] == CONVERSATIONAL[0]


def test_implicit_prompt_conversation_takes_common_leading_messages() -> None:
    system = {"role": "system", "content": "Be brief."}
    user = {"role": "user", "content": "Sky?"}
    row = {
        "chosen": [system, user, {"role": "assistant", "content": "Blue."}],
        "rejected": [system, user, {"role": "assistant", "content": "Green."}],
    }
    out = load_preference_data([row])[0][0]
    assert out == {
        "prompt": [system, user],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    }


def test_implicit_prompt_string_cuts_back_to_whitespace() -> None:
    rows = [
        {"chosen": "The sky is blue", "rejected": "The sky is black"},
        {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: deep red"},
    ]
    out = load_preference_data(rows)[0].to_list()
    assert out[0] == {"prompt": "The sky is", "chosen": " blue", "rejected": " black"}
    assert out[1] == {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " deep red"}


def test_string_prompt_next_to_conversations() -> None:
    user = {"role": "user", "content": "Sky?"}
    full = {"prompt": "Sky?", "chosen": [user, {"role": "assistant", "content": "Blue."}]}
    full["rejected"] = [user, {"role": "assistant", "content": "Green."}]
    assert load_preference_data([full])[0][0]["prompt"] == [user]
    responses_only = {
        "prompt": "Sky?",
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    }
    assert load_preference_data([responses_only])[0][0]["prompt"] == [user]


def test_sharegpt(tmp_path: Path) -> None:
    row = {
        "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Sky?"}],
        "chosen": {"from": "gpt", "value": "Blue."},
        "rejected": "Green.",
    }
    out = load_preference_data(write(tmp_path / "sg.jsonl", [row], "jsonl"))[0][0]
    assert out == {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    }
    with pytest.raises(ValueError, match="row 0: missing 'rejected'"):
        load_preference_data([{"conversations": row["conversations"], "chosen": "Blue."}])
    bad = dict(row, conversations=[{"from": "robot", "value": "hi"}])
    with pytest.raises(ValueError, match=r"row 0: 'conversations' turn 0: expected 'from' in .*'robot'"):
        load_preference_data([bad])


def test_standard_tokenization_adds_bos_and_eos_once(tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [STANDARD[0], dict(STANDARD[1], chosen=" In the sky.</s>")]
    ds, report = tokenize_preferences(load_preference_data(rows)[0], tokenizer, max_length=128)
    assert ds.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert ds.features["prompt_ids"].feature.dtype == "int32"
    for row, out in zip(rows, ds, strict=True):
        assert out["prompt_ids"][0] == tokenizer.bos_token_id
        for name in ("chosen", "rejected"):
            ids = out[f"{name}_ids"]
            assert ids[-1] == tokenizer.eos_token_id and ids[-2] != tokenizer.eos_token_id
            full = tokenizer(row["prompt"] + row[name]).input_ids
            assert out["prompt_ids"] + ids == (full if full[-1] == tokenizer.eos_token_id else full + [1])
    assert (report.rows_read, report.rows_kept, report.rows_truncated) == (2, 2, 0)


def test_chat_template_prompt_is_prefix_of_prompt_plus_response(tokenizer: PreTrainedTokenizerFast) -> None:
    ds, _ = tokenize_preferences(load_preference_data(CONVERSATIONAL)[0], tokenizer, max_length=128)
    row, out = CONVERSATIONAL[0], ds[0]
    prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert out["prompt_ids"] == tokenizer(prompt_text, add_special_tokens=False).input_ids
    for name in ("chosen", "rejected"):
        full_text = tokenizer.apply_chat_template(row["prompt"] + row[name], tokenize=False)
        assert (
            out["prompt_ids"] + out[f"{name}_ids"] == tokenizer(full_text, add_special_tokens=False).input_ids
        )
    assert tokenizer.decode(out["chosen_ids"]) == "It is blue.</s>"


def test_chat_template_breaking_prefix_property_raises(tokenizer: PreTrainedTokenizerFast) -> None:
    broken = copy.deepcopy(tokenizer)
    broken.chat_template = CHAT_TEMPLATE.replace("<|assistant|>{% endif %}", "<|assistant|>\n{% endif %}")
    with pytest.raises(ValueError, match=r"row 0: the chat template does not render the prompt .* prefix"):
        tokenize_preferences(load_preference_data(CONVERSATIONAL)[0], broken, max_length=128)
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="needs a chat_template"):
        tokenize_preferences(load_preference_data(CONVERSATIONAL)[0], no_template, max_length=128)


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_truncation_modes(tokenizer: PreTrainedTokenizerFast, mode: str) -> None:
    long_prompt = " ".join(["What color is the sky?"] * 6)
    rows = [{"prompt": long_prompt, "chosen": " It is blue." * 4, "rejected": " It is green."}, STANDARD[1]]
    prompt = tokenizer(long_prompt).input_ids
    chosen = tokenizer(long_prompt + rows[0]["chosen"]).input_ids[len(prompt) :] + [tokenizer.eos_token_id]
    assert len(prompt) > 10 and len(chosen) > 10
    ds, report = tokenize_preferences(
        load_preference_data(rows)[0], tokenizer, max_length=20, max_prompt_length=10, truncation_mode=mode
    )
    out = ds[0]
    assert out["prompt_ids"] == (prompt[-10:] if mode == "keep_end" else prompt[:10])
    assert out["chosen_ids"] == chosen[:10]
    assert len(out["rejected_ids"]) <= 10
    assert (report.rows_kept, report.rows_truncated) == (2, 1)


def test_prompt_filling_max_length_is_dropped_and_counted(tokenizer: PreTrainedTokenizerFast) -> None:
    rows = [{"prompt": " ".join(["What color is the sky?"] * 6), "chosen": " Blue.", "rejected": " Red."}]
    rows.append(STANDARD[0])
    ds, report = tokenize_preferences(load_preference_data(rows)[0], tokenizer, max_length=16)
    assert len(ds) == 1 and report.rows_dropped == {"prompt_fills_max_length": 1}
    assert report.rows_read == report.rows_kept + report.num_dropped


def test_cache_hit_skips_tokenization(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_preference_data(STANDARD)[0]
    first, report = tokenize_preferences(ds, tokenizer, max_length=64, cache_dir=tmp_path)
    assert not report.from_cache

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache entry")

    monkeypatch.setattr(data_module, "_tokenize_batch", fail)
    again, cached = tokenize_preferences(
        load_preference_data(STANDARD)[0], tokenizer, max_length=64, cache_dir=tmp_path
    )
    assert cached.from_cache and "from cache" in str(cached)
    assert again.to_list() == first.to_list() and cached.rows_kept == report.rows_kept
    monkeypatch.undo()

    changed = copy.deepcopy(tokenizer)
    changed.chat_template = "{{ messages }}"
    misses = [
        tokenize_preferences(ds, tokenizer, max_length=63, cache_dir=tmp_path),
        tokenize_preferences(ds, tokenizer, max_length=64, truncation_mode="keep_start", cache_dir=tmp_path),
        tokenize_preferences(ds, changed, max_length=64, cache_dir=tmp_path),
        tokenize_preferences(ds.select([0]), tokenizer, max_length=64, cache_dir=tmp_path),
    ]
    assert not any(r.from_cache for _, r in misses)


def test_num_proc_matches_single_process(tokenizer: PreTrainedTokenizerFast) -> None:
    ds = load_preference_data(STANDARD * 4)[0]
    single, _ = tokenize_preferences(ds, tokenizer, max_length=64)
    multi, _ = tokenize_preferences(ds, tokenizer, max_length=64, num_proc=2)
    assert multi.to_list() == single.to_list()


GOOD = json.dumps(STANDARD[0])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "chosen": "b"', "line 3: invalid JSON"),
        ("[1, 2]", "line 3: expected a JSON object with 'prompt', 'chosen', 'rejected'.* got list"),
        ('{"prompt": "a", "chosen": "b"}', "line 3: missing 'rejected'"),
        (
            '{"prompt": "a", "chosen": 5, "rejected": "c"}',
            "line 3: 'chosen': expected a string or a list .* got int",
        ),
        (
            '{"prompt": "a", "chosen": [{"role": "user"}], "rejected": []}',
            "line 3: 'chosen' message 0: expected",
        ),
        ('{"prompt": "a", "chosen": "  ", "rejected": "c"}', "line 3: 'chosen' response is empty"),
        ('{"prompt": "", "chosen": "b", "rejected": "c"}', "line 3: 'prompt' is empty"),
        ('{"prompt": "a", "chosen": "b", "rejected": "b"}', "line 3: 'chosen' and 'rejected' are identical"),
        ('{"chosen": "b c", "rejected": "d e"}', "line 3: implicit prompt: .* share no leading prompt"),
        (
            '{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}',
            "line 3: 'prompt', .* all",
        ),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{line}\n{GOOD}\n")
    with pytest.raises(ValueError, match=f"data.jsonl {message}"):
        load_preference_data(path)


def test_malformed_json_parquet_and_mixed_formats(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text('[\n  {"prompt": "a",,}\n]')
    with pytest.raises(ValueError, match=r"data.json line 2 column \d+: invalid JSON"):
        load_preference_data(path)
    path.write_text(json.dumps({"prompt": ["a"]}, indent=2))
    with pytest.raises(ValueError, match="data.json: expected a JSON array"):
        load_preference_data(path)
    write(path, [STANDARD[0], {"prompt": "a"}], "json")
    with pytest.raises(ValueError, match="data.json row 1: missing 'chosen'"):
        load_preference_data(path)
    parquet = write(
        tmp_path / "data.parquet", [STANDARD[0], dict(STANDARD[1], rejected=STANDARD[1]["chosen"])], "parquet"
    )
    with pytest.raises(ValueError, match="data.parquet row 1: 'chosen' and 'rejected' are identical"):
        load_preference_data(parquet)
    with pytest.raises(ValueError, match="row 1: rows mix standard"):
        load_preference_data([STANDARD[0], CONVERSATIONAL[0]])


def test_json_lines_saved_as_json(tmp_path: Path) -> None:
    path = write(tmp_path / "data.json", STANDARD, "jsonl")
    assert load_preference_data(path)[0].to_list() == STANDARD


def test_non_utf8_bytes_name_file_and_line(tmp_path: Path) -> None:
    """Undecodable bytes are a data error naming the file and line, skipped and counted under skip_invalid."""
    bad = b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}'  # latin-1, not UTF-8
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\n".join([GOOD.encode(), bad, "caf\u00e9 not json".encode(), GOOD.encode()]) + b"\n")
    with pytest.raises(UserError, match=r"data.jsonl line 2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        load_preference_data(path)
    ds, report = load_preference_data(path, skip_invalid=True)
    assert len(ds) == 2 and report.rows_read == 4
    assert report.rows_dropped == {"invalid_utf8": 1, "invalid_json": 1}
    assert "invalid_utf8: 1" in str(report)
    # A .json array cannot lose one row; the error names the line. JSON Lines saved as .json skip by line.
    array = tmp_path / "data.json"
    array.write_bytes(b"[\n" + GOOD.encode() + b",\n" + bad + b"\n]")
    for skip in (False, True):
        with pytest.raises(UserError, match=r"data.json line 3: not UTF-8 text \(byte 0xe9 at column 16\)"):
            load_preference_data(array, skip_invalid=skip)
    lines = tmp_path / "lines.json"
    lines.write_bytes(GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(UserError, match="lines.json line 2: not UTF-8"):
        load_preference_data(lines)
    ds, report = load_preference_data(lines, skip_invalid=True)
    assert len(ds) == 2 and report.rows_dropped == {"invalid_utf8": 1}


def test_skip_invalid_counts_every_reason(tmp_path: Path) -> None:
    lines = [
        GOOD,
        "not json",
        '{"prompt": "a", "chosen": "b", "rejected": "b"}',
        '{"prompt": "a", "chosen": "", "rejected": "c"}',
        '{"prompt": "a", "chosen": "b", "rejected": "c"}',
        "7",
        '{"prompt": "a", "chosen": "b"}',
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds, report = load_preference_data(path, skip_invalid=True)
    assert len(ds) == report.rows_kept == 2
    assert report.rows_read == 7
    assert report.rows_dropped == {
        "invalid_json": 1,
        "identical_responses": 1,
        "empty_response": 1,
        "not_an_object": 1,
        "missing_column": 1,
    }
    text = str(report)
    assert "7 rows read, 2 kept, 5 dropped" in text and "invalid_json: 1" in text


def test_all_rows_dropped_gives_empty_dataset(tokenizer: PreTrainedTokenizerFast) -> None:
    ds, report = load_preference_data(["x"], skip_invalid=True)
    assert len(ds) == 0 and report.rows_dropped == {"not_an_object": 1}
    tokenized, tok_report = tokenize_preferences(ds, tokenizer, max_length=8)
    assert len(tokenized) == 0 and tok_report == DataReport()


def test_bad_arguments(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    ds = load_preference_data(STANDARD)[0]
    with pytest.raises(
        ValueError, match="truncation_mode: expected 'keep_end' or 'keep_start', got 'middle'"
    ):
        tokenize_preferences(ds, tokenizer, max_length=8, truncation_mode="middle")
    with pytest.raises(ValueError, match="max_length: expected an int >= 2"):
        tokenize_preferences(ds, tokenizer, max_length=1)
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_preferences(ds, tokenizer, max_length=8, max_prompt_length=0)
    with pytest.raises(ValueError, match="expected columns prompt/chosen/rejected"):
        tokenize_preferences(ds.rename_column("prompt", "question"), tokenizer, max_length=8)
    mixed = datasets.Dataset.from_list([dict(CONVERSATIONAL[0], prompt="What color is the sky?")])
    with pytest.raises(ValueError, match="all strings or all .* message lists"):
        tokenize_preferences(mixed, tokenizer, max_length=8)
    with pytest.raises(TypeError, match="tokenizer: expected a transformers tokenizer"):
        tokenize_preferences(ds, "gpt2", max_length=8)
    with pytest.raises(TypeError, match="source: expected a path"):
        load_preference_data(42)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_preference_data(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match="data.csv: unsupported file type '.csv'"):
        load_preference_data(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="expected a directory written by datasets' save_to_disk"):
        load_preference_data(tmp_path)
