"""KTO in the packed trainer: unpaired data, TRL's KL completions, a packed step against float64 KTO and
against ``FusedLinearKTOLoss`` on the unpacked batch, reference modes, resume, and the demo variant."""

import dataclasses
import json
import logging
import random
import re
import types
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from fastdpo import FusedLinearKTOLoss
from fastdpo.data_unpaired import balance_warning, kl_completions, load_unpaired_data, tokenize_unpaired
from fastdpo.demo import addition_feedback, build_model, build_tokenizer, demo_train_config
from fastdpo.distributed import unwrap_model
from fastdpo.errors import UserError
from fastdpo.losses import kto as kto_losses
from fastdpo.packing import IGNORE_INDEX
from fastdpo.train import TrainConfig, Trainer
from fastdpo.train.kto import KTO_METRIC_NAMES, _bins_with_partners, load_unpaired_splits

BETA = 0.3
D_WEIGHT, U_WEIGHT = 1.25, 1.0


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Llama + tokenizer on disk and a JSONL of unpaired addition answers, in turn right
    (desirable) and near miss (undesirable), of random lengths."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, num_layers=2, seed=random.randrange(1000))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random()
    problems = [(rng.randrange(1000), rng.randrange(100)) for _ in range(64)]
    (root / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in addition_feedback(problems)))
    return root


def _config(assets, out, **overrides) -> TrainConfig:
    options = dict(
        model=str(assets / "model"),
        data=str(assets / "feedback.jsonl"),
        output_dir=str(out),
        loss_type="kto",
        beta=BETA,
        desirable_weight=D_WEIGHT,
        undesirable_weight=U_WEIGHT,
        max_length=32,
        tokens_per_step=128,
        max_steps=3,
        lr=1e-2,
        warmup_steps=1,
        max_grad_norm=0.0,
        save_every=0,
        save_model=False,
        tensorboard=False,
        progress=False,
        device="cpu",
        backend="torch",
        seed=random.randrange(1000),
    )
    options.update(overrides)
    return TrainConfig(**options)


def _read_metrics(out, split):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


# ------------------------------------------------------------------ data


def test_standard_and_conversational_rows_load_and_tokenize(tmp_path):
    tokenizer = build_tokenizer()
    standard = [
        {"prompt": "12+7=", "completion": "19", "label": True},
        {"prompt": "38+45=", "completion": "73", "label": 0},
        {"prompt": "1+1=", "completion": "2", "label": 1},
    ]
    path = tmp_path / "standard.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in standard))
    raw, report = load_unpaired_data(path)
    assert raw["label"] == [True, False, True] and (report.desirable, report.undesirable) == (2, 1)
    assert "2 desirable, 1 undesirable" in str(report)
    data, report = tokenize_unpaired(raw, tokenizer, max_length=32, cache_dir=tmp_path / "cache")
    eos = tokenizer.eos_token_id
    assert data[0]["prompt_ids"] == tokenizer("12+7=")["input_ids"]
    assert data[0]["completion_ids"] == tokenizer("19", add_special_tokens=False)["input_ids"] + [eos]
    assert (report.desirable, report.undesirable, report.from_cache) == (2, 1, False)
    cached, report = tokenize_unpaired(raw, tokenizer, max_length=32, cache_dir=tmp_path / "cache")
    assert report.from_cache and cached.to_list() == data.to_list() and report.desirable == 2

    # Conversational rows, from a saved dataset, with a string prompt next to message completions.
    rows = addition_feedback([(38, 45), (12, 7)])
    rows[1]["prompt"] = rows[1]["prompt"][0]["content"]
    datasets.Dataset.from_list(rows[:1]).save_to_disk(tmp_path / "saved")
    raw, _ = load_unpaired_data(rows)
    assert raw[1]["prompt"] == [{"role": "user", "content": "12+7="}]
    data, _ = tokenize_unpaired(raw, tokenizer, max_length=32)
    messages = [*raw[0]["prompt"], *raw[0]["completion"]]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        data[0]["prompt_ids"] + data[0]["completion_ids"]
        == tokenizer(full, add_special_tokens=False)["input_ids"]
    )
    assert load_unpaired_data(tmp_path / "saved")[0].to_list() == raw.select([0]).to_list()

    # Truncation as for pairs: the prompt to max_prompt_length, then the completion to the rest.
    short, report = tokenize_unpaired(raw, tokenizer, max_length=12, max_prompt_length=6)
    assert report.rows_truncated == 2
    assert all(
        len(p) <= 6 and len(p) + len(c) <= 12
        for p, c in zip(short["prompt_ids"], short["completion_ids"], strict=True)
    )


@pytest.mark.parametrize("label", ["yes", 2, 0.5, None, [1]])
def test_a_bad_label_names_the_file_and_line(tmp_path, label):
    path = tmp_path / "bad.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2", "label": True}, {"prompt": "1+2=", "completion": "3"}]
    if label is not None:
        rows[1]["label"] = label
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = "missing 'label'" if label is None else "'label': expected a bool or 0/1"
    with pytest.raises(UserError, match=rf"bad.jsonl line 2: {expected}"):
        load_unpaired_data(path)
    data, report = load_unpaired_data(path, skip_invalid=True)
    assert len(data) == 1 and report.rows_dropped == {
        "missing_column" if label is None else "invalid_label": 1
    }


def test_an_imbalance_warns_with_the_kto_papers_weights(assets, tmp_path, caplog):
    assert balance_warning(10, 10, 1.0, 1.0) == "" and balance_warning(4, 3, 1.0, 1.0) == ""
    message = balance_warning(3, 2, 1.0, 1.0)
    # TRL 1.16 KTOTrainer's advice for 3 desirable, 2 undesirable: desirable_weight in [0.67, 0.89].
    assert "desirable_weight in [0.67, 0.89]" in message and "undesirable_weight in [1.12, 1.50]" in message
    low, high = (float(x) for x in re.search(r"undesirable_weight in \[(.+?), (.+?)\]", message).groups())
    assert 3 / (2 * high) == pytest.approx(1.0) and 3 / (2 * low) == pytest.approx(4 / 3, abs=0.01)
    assert "no undesirable examples" in balance_warning(5, 0, 1.0, 1.0)

    rows = addition_feedback([(i, i) for i in range(12)])
    path = tmp_path / "skewed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[::2]))  # 12 desirable, 6 undesirable
    tokenizer = build_tokenizer()
    with caplog.at_level(logging.INFO, logger="fastdpo"):
        load_unpaired_splits(_config(assets, tmp_path, data=str(path)), tokenizer, tmp_path / "cache")
    assert "12 desirable, 6 undesirable" in caplog.text
    assert "set EITHER desirable_weight in [0.50, 0.67]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        config = _config(assets, tmp_path, data=str(path), desirable_weight=0.6, undesirable_weight=1.0)
        load_unpaired_splits(config, tokenizer, tmp_path / "cache")
    # The repeated rows are duplicates (warned about since #24); with these weights, no balance warning.
    assert "6 duplicate rows" in caplog.text and "desirable_weight" not in caplog.text


# ------------------------------------------------------------------ KL completions and bins


def test_kl_completions_equal_trls_on_a_batch(tmp_path):
    """TRL 1.16's own data preparation and collator give the same sequences as the packed trainer."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference, KTOTrainer

    tokenizer = build_tokenizer()
    # Example 1 has a longer prompt and a shorter answer than example 0: its KL sequence (its prompt with
    # example 0's answer) is longer than any real one and gets cut to max_length, as TRL's collator does.
    rows = addition_feedback([(99990, 9), (1000, 1000), (3, 4), (25, 17), (8, 1)])
    raw, _ = load_unpaired_data(rows)
    full, _ = tokenize_unpaired(raw, tokenizer, max_length=64)
    lengths = [len(p) + len(c) for p, c in zip(full["prompt_ids"], full["completion_ids"], strict=True)]
    max_length = max(lengths)
    assert len(full[1]["prompt_ids"]) + len(full[0]["completion_ids"]) > max_length

    batch_size = 3
    stock = types.SimpleNamespace(
        calculate_KL=True, _tokenizer=tokenizer, desirable_weight=1.0, undesirable_weight=1.0
    )
    args = types.SimpleNamespace(
        dataset_num_proc=None, max_length=max_length, per_device_train_batch_size=batch_size
    )
    trl_data = KTOTrainer._prepare_dataset(stock, datasets.Dataset.from_list(rows), tokenizer, args, "train")
    collate = DataCollatorForUnpairedPreference(pad_token_id=tokenizer.pad_token_id, max_length=max_length)

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(model="unused", data=str(path), loss_type="kto", max_length=max_length)
    split, _ = load_unpaired_splits(config, tokenizer, tmp_path / "cache")
    for batch in (np.arange(0, 3), np.arange(3, 5)):
        examples = split.examples(batch)
        stock_batch = collate([trl_data[int(i)] for i in batch])
        for j, example in enumerate(examples):
            assert example["prompt_ids"] == trl_data[int(batch[j])]["prompt_ids"]
            assert example["completion_ids"] == trl_data[int(batch[j])]["completion_ids"]
            kl_ids = stock_batch["KL_input_ids"][j][stock_batch["KL_attention_mask"][j].bool()].tolist()
            assert example["prompt_ids"] + example["kl_ids"] == kl_ids
        assert [e["label"] for e in examples] == stock_batch["label"].tolist()

    assert kl_completions([[1], [2, 2], [3]]) == [[3], [1], [2, 2]]
    with pytest.raises(ValueError, match="holds 1 example"):
        kl_completions([[1]])


def test_every_kl_bin_has_a_mismatched_partner():
    # First-fit-decreasing leaves the last example alone; one moves over from a bin of three.
    tokens = np.array([30] * 7)
    bins = _bins_with_partners(tokens, 100, "train")
    assert sorted(len(b) for b in bins) == [2, 2, 3]
    assert sorted(np.concatenate(bins).tolist()) == list(range(7))
    assert all(tokens[b].sum() <= 100 for b in bins)
    with pytest.raises(ValueError, match=r"no mismatched partner; raise tokens_per_step to at least 90"):
        _bins_with_partners(np.array([60, 30, 60]), 100, "train")
    with pytest.raises(ValueError, match="eval split: .* a single example"):
        _bins_with_partners(np.array([60]), 100, "eval")


# ------------------------------------------------------------------ the packed loop


def _logps64(model, prompts, completions, *, grad) -> torch.Tensor:
    """float64 summed completion log-probs of unpacked prompt+completion sequences, plain HF forward."""
    values = []
    with torch.set_grad_enabled(grad):
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = torch.tensor([prompt + completion])
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            picked = logp.gather(-1, ids[0, 1:, None])[:, 0]
            values.append(picked[len(prompt) - 1 :].sum())
    return torch.stack(values)


def _unpacked(model, prompts, completions) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded hidden states ``[S, T, D]`` and shifted labels ``[S, T]`` (completion tokens only)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        n = len(p) + len(c)
        ids[i, :n], mask[i, :n] = torch.tensor(p + c), 1
        labels[i, len(p) - 1 : n - 1] = torch.tensor(c)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden, labels


@pytest.mark.parametrize(
    ("loss_type", "shared_prompt"), [("kto", True), ("kto", False), ("apo_zero_unpaired", True)]
)
def test_packed_step_equals_float64_kto_and_the_fused_loss_unpacked(
    assets, tmp_path, loss_type, shared_prompt
):
    """A step after the first (policy != reference): gradients and metrics equal TRL's KTO on unpacked
    float64 sequences, and the loss and log-probs equal ``FusedLinearKTOLoss`` on the unpacked batch."""
    config = _config(
        assets, tmp_path, log_every=1, loss_type=loss_type, shared_prompt=shared_prompt, max_steps=0
    )
    trainer = Trainer(config)
    labels = np.asarray(trainer.train_split.data["label"])
    # The first later step (one bin each) with 3 or more examples of both kinds.
    k, step = next(
        (k, step)
        for k, step in enumerate(trainer._epoch_plan(0))
        if k and len(step[0]) >= 3 and 0 < labels[step[0]].sum() < len(step[0])
    )
    assert len(step) == 1
    examples = trainer.train_split.examples(step[0])
    prompts = [e["prompt_ids"] for e in examples]
    completions = [e["completion_ids"] for e in examples]
    uses_kl = loss_type == "kto"
    # The KL completions are the bin's completions rotated by one (TRL's construction).
    kl_completions_ = [e["kl_ids"] for e in examples] if uses_kl else []
    assert not uses_kl or kl_completions_ == [completions[-1], *completions[:-1]]
    desirable = torch.tensor([e["label"] for e in examples])
    grads = {}

    def hook(optimizer, args, kwargs):
        if trainer.step == k:
            grads.update(
                {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
            )

    trainer.optimizer.register_step_pre_hook(hook)
    trainer.train(stop_after=k)
    policy32 = AutoModelForCausalLM.from_pretrained(assets / "model")
    policy32.load_state_dict(trainer.model.state_dict())
    policy = AutoModelForCausalLM.from_pretrained(assets / "model").double()
    policy.load_state_dict({k: v.double() for k, v in trainer.model.state_dict().items()})
    reference = AutoModelForCausalLM.from_pretrained(assets / "model").double()
    trainer.train(stop_after=k + 1)

    ref = _logps64(reference, prompts, completions, grad=False)
    logps = _logps64(policy, prompts, completions, grad=True)
    kl = torch.zeros((), dtype=torch.float64)
    if uses_kl:
        kl_ref = _logps64(reference, prompts, kl_completions_, grad=False)
        kl_pol = _logps64(policy, prompts, kl_completions_, grad=False)
        kl = (kl_pol - kl_ref).mean().clamp(min=0)
    z = BETA * (logps - ref - kl)
    losses = torch.where(desirable, D_WEIGHT * (1 - z.sigmoid()), U_WEIGHT * (1 - (-z).sigmoid()))
    losses.mean().backward()
    for name, param in policy.named_parameters():
        torch.testing.assert_close(grads[name].double(), param.grad, rtol=1e-4, atol=1e-7, msg=name)

    logged = _read_metrics(tmp_path, "train")[-1]
    assert logged["step"] == k + 1 and set(KTO_METRIC_NAMES) <= set(logged)
    rewards = BETA * (logps - ref)
    expected = {
        "loss": losses.mean(),
        "kl": kl,
        "rewards/chosen": rewards[desirable].mean(),
        "rewards/rejected": rewards[~desirable].mean(),
        "rewards/margins": rewards[desirable].mean() - rewards[~desirable].mean(),
        "logps/chosen": logps[desirable].mean(),
        "logps/rejected": logps[~desirable].mean(),
    }
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), name

    # The same step through FusedLinearKTOLoss on the unpacked batch (fp32, padded layout).
    loss_fn = FusedLinearKTOLoss(
        BETA, loss_type, desirable_weight=D_WEIGHT, undesirable_weight=U_WEIGHT, backend="torch"
    )
    with torch.no_grad():
        hidden, labels = _unpacked(policy32, prompts, completions)
        kl_inputs = {}
        if uses_kl:
            kl_hidden, kl_labels = _unpacked(policy32, prompts, kl_completions_)
            kl_ref_logps = trainer.train_split.ref_rejected[step[0]]
            kl_inputs = {"kl_hidden": kl_hidden, "kl_labels": kl_labels, "kl_ref_logps": kl_ref_logps}
        out = loss_fn(
            hidden,
            policy32.lm_head.weight,
            labels,
            preference_labels=desirable,
            ref_logps=trainer.train_split.ref_chosen[step[0]],
            **kl_inputs,
        )
    torch.testing.assert_close(out.logps.double(), logps.detach(), rtol=1e-5, atol=1e-4)
    assert logged["loss"] == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-6)
    assert logged["kl"] == pytest.approx(out.kl.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("reference", ["precompute", "model", "adapter", "none"])
def test_reference_modes(assets, tmp_path, reference):
    """Before any update every reward and the KL term are 0 (with a reference); the modes train."""
    extra = {"ref_model": str(assets / "model")} if reference == "model" else {}
    if reference == "adapter":
        extra = {"lora_r": 4}
    trainer = Trainer(
        _config(assets, tmp_path, reference=reference, eval_fraction=0.25, max_steps=2, **extra)
    )
    before = trainer.evaluate()
    if reference == "none":
        assert before["rewards/chosen"] == pytest.approx(BETA * before["logps/chosen"], rel=1e-6)
    else:
        assert before["rewards/margins"] == before["kl"] == 0.0
        labels = torch.tensor(trainer.eval_split.data["label"])
        weights = torch.where(labels, D_WEIGHT, U_WEIGHT)
        assert before["loss"] == pytest.approx(0.5 * weights.mean().item(), rel=1e-6)
    assert set(before) == set(KTO_METRIC_NAMES)
    after = trainer.train()["eval"]
    assert after["rewards/margins"] != before["rewards/margins"]


def test_precomputed_kl_references_are_cached_and_match_a_live_reference(assets, tmp_path, caplog):
    first = Trainer(_config(assets, tmp_path / "a", eval_fraction=0.25))
    assert not torch.equal(first.train_split.ref_chosen, first.train_split.ref_rejected)
    with caplog.at_level(logging.INFO, logger="fastdpo"):
        second = Trainer(_config(assets, tmp_path / "a", eval_fraction=0.25, seed=first.config.seed))
    assert "read from" in caplog.text
    assert torch.equal(first.train_split.ref_rejected, second.train_split.ref_rejected)
    live = Trainer(
        _config(
            assets,
            tmp_path / "b",
            eval_fraction=0.25,
            seed=first.config.seed,
            reference="model",
            ref_model=str(assets / "model"),
        )
    )
    first.train(stop_after=1)
    live.train(stop_after=1)
    for a, b in zip(first.model.parameters(), live.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # apo_zero_unpaired has no KL sequences; its cache entry is its own.
    apo = Trainer(_config(assets, tmp_path / "a", eval_fraction=0.25, loss_type="apo_zero_unpaired"))
    assert apo.train_split.bins is None and torch.equal(apo.train_split.ref_rejected, torch.zeros(48))
    assert apo.train()["train"]["kl"] == 0.0


def test_resume_is_exact(assets, tmp_path):
    extra = {"max_steps": 4, "seed": 7, "log_every": 1, "epochs": 2}
    whole = Trainer(_config(assets, tmp_path / "whole", **extra))
    whole.train()
    first = Trainer(_config(assets, tmp_path / "cut", save_every=2, **extra))
    first.train(stop_after=2)
    del first
    resumed = Trainer(_config(assets, tmp_path / "cut", save_every=2, **extra))
    assert resumed.step == 2
    resumed.train()
    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    last = [_read_metrics(tmp_path / run, "train")[-1] for run in ("whole", "cut")]
    assert last[0]["step"] == last[1]["step"] == 4 and last[0]["loss"] == last[1]["loss"]
    # Without a KL term the same rows pack differently: the checkpoint's data position would mean other bins.
    with pytest.raises(ValueError, match="cannot resume"):
        Trainer(
            _config(assets, tmp_path / "cut", save_every=2, **{**extra, "loss_type": "apo_zero_unpaired"})
        )


def _train_recording_kl(rank: int, config: TrainConfig) -> dict:
    """Rank task: train, recording the KL estimate of every loss call before and after the average over
    ranks (``FusedLinearKTOLoss``'s ``_mean_over_ranks``), and the gradients of step 1."""
    trainer = Trainer(config)
    kls, grads = [], {}
    mean_over_ranks = kto_losses._mean_over_ranks

    def recording(value):
        averaged = mean_over_ranks(value)
        kls.append((value.item(), averaged.item()))
        return averaged

    def hook(optimizer, args, kwargs):
        if trainer.step == 0:
            params = unwrap_model(trainer.model).named_parameters()
            grads.update({n: p.grad.clone() for n, p in params if p.grad is not None})

    kto_losses._mean_over_ranks = recording
    try:
        trainer.optimizer.register_step_pre_hook(hook)
        return {"result": trainer.train(), "kls": kls, "grads": grads}
    finally:
        kto_losses._mean_over_ranks = mean_over_ranks


@pytest.mark.slow
def test_two_ddp_ranks_share_one_kl_estimate(assets, tmp_path):
    """Each rank scores other examples, yet every loss call uses the same KL estimate, the mean of the
    ranks' own; step 1 (policy = reference) equals one process over the same examples."""
    from test_distributed import _Ranks

    config = _config(assets, tmp_path / "single", tokens_per_optimizer_step=256, max_steps=2, log_every=1)
    single = _train_recording_kl(0, config)
    assert all(local == averaged for local, averaged in single["kls"]), "one process: nothing to average"
    pool = _Ranks()
    try:
        replies = pool.run(
            _train_recording_kl, dataclasses.replace(config, output_dir=str(tmp_path / "ddp"), strategy="ddp")
        )
    finally:
        pool.close()
    (local0, averaged0), (local1, averaged1) = (np.array(reply["kls"]).T for reply in replies)
    assert len(local0) == len(local1) == 2
    assert not np.array_equal(local0, local1), "the ranks should score different examples"
    np.testing.assert_allclose(averaged0, (local0 + local1) / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(averaged0, averaged1)
    for name, grad in single["grads"].items():
        for reply in replies:
            torch.testing.assert_close(reply["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert replies[0]["result"]["train"]["kl"] == replies[1]["result"]["train"]["kl"]


@pytest.mark.gpu
def test_cuda_bf16_triton_step_matches_cpu_fp32(assets, tmp_path):
    """On CUDA (bf16 autocast, Triton kernels) the first KTO gradient points where the fp32 CPU one does."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    seed = random.randrange(1000)
    grads = {}
    for device in ("cpu", "cuda"):
        backend = "triton" if device == "cuda" else "torch"
        trainer = Trainer(_config(assets, tmp_path / device, device=device, backend=backend, seed=seed))
        captured = grads[device] = {}

        def hook(optimizer, args, kwargs, trainer=trainer, captured=captured):
            if trainer.step == 0:
                captured.update({n: p.grad.float().cpu() for n, p in trainer.model.named_parameters()})

        trainer.optimizer.register_step_pre_hook(hook)
        trainer.train(stop_after=1)
    cpu, cuda = (torch.cat([g.flatten() for g in grads[d].values()]) for d in ("cpu", "cuda"))
    assert torch.nn.functional.cosine_similarity(cpu, cuda, dim=0) > 0.99
    assert cuda.norm() == pytest.approx(cpu.norm().item(), rel=0.05)


def test_config_options():
    config = TrainConfig(model="m", data="d", loss_type="apo_zero_unpaired", desirable_weight="1.5")
    assert config.desirable_weight == 1.5
    for name in ("desirable_weight", "undesirable_weight"):
        with pytest.raises(ValueError, match=name):
            TrainConfig(model="m", data="d", loss_type="kto", **{name: 0})
    with pytest.raises(ValueError, match="'kto', 'apo_zero_unpaired'"):
        TrainConfig(model="m", data="d", loss_type="kto_pair")


# ------------------------------------------------------------------ demo


def test_demo_yaml_is_the_kto_demos_train_config():
    from fastdpo.cli import load_config

    configs = Path(__file__).resolve().parent.parent / "configs"
    assert load_config(configs / "kto.yaml") == demo_train_config("runs/demo-kto", loss="kto")


@pytest.mark.slow
def test_tiny_kto_demo_widens_the_heldout_reward_gap(tmp_path, capsys, run_tiny_demo):
    result = run_tiny_demo(loss="kto")
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(
        r"held-out desirable vs undesirable reward gap (-?\d+\.\d{3}) -> (-?\d+\.\d{3})", lines[-1]
    )
    assert match, lines[-1]
    before, after = map(float, match.groups())
    assert before == 0.0 and after > 0.0 and result.margin_after == pytest.approx(after, abs=1e-3)
    assert any("before KTO:" in line for line in lines)
    records = [json.loads(line) for line in (tmp_path / "kto" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "eval" and "kl" in records[-1]
