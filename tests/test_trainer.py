"""The packed trainer against float64 PyTorch: accumulated gradients, metrics, exact resume, references."""

import dataclasses
import json
import logging
import math
import os
import random
import signal
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM

from fastdpo.demo import addition_pairs, build_model, build_tokenizer
from fastdpo.errors import UserError
from fastdpo.train import METRIC_NAMES, TrainConfig, Trainer, loop
from fastdpo.train.build import warmup_cosine as _warmup_cosine

BETA = 0.3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny random Llama + tokenizer saved to disk and a JSONL of addition pairs with random lengths."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=32, num_layers=2, seed=random.randrange(1000))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = random.Random()
    problems = [(rng.randrange(1000), rng.randrange(100)) for _ in range(96)]
    rows = addition_pairs(problems)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _config(assets, out, **overrides) -> TrainConfig:
    options = dict(
        model=str(assets / "model"),
        data=str(assets / "pairs.jsonl"),
        output_dir=str(out),
        beta=BETA,
        max_length=32,
        tokens_per_step=128,
        tokens_per_optimizer_step=512,
        max_steps=4,
        lr=1e-2,
        warmup_steps=1,
        max_grad_norm=0.0,
        save_every=0,
        save_model=False,
        tensorboard=False,
        progress=False,
        device="cpu",
        seed=random.randrange(1000),
    )
    options.update(overrides)
    return TrainConfig(**options)


def _capture_grads(trainer: Trainer, at_step: int) -> dict[str, torch.Tensor]:
    """Gradients as the optimizer sees them when it takes step ``at_step`` (1-based)."""
    captured: dict[str, torch.Tensor] = {}

    def hook(optimizer, args, kwargs):
        if trainer.step == at_step - 1:
            captured.update(
                {
                    n: p.grad.detach().clone()
                    for n, p in trainer.model.named_parameters()
                    if p.grad is not None
                }
            )

    trainer.optimizer.register_step_pre_hook(hook)
    return captured


def _sequence_logps64(model, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 summed response log-probs of unpacked prompt+response sequences, plain HF forward."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        values = []
        for pair in pairs:
            ids = torch.tensor([pair["prompt_ids"] + pair[key]])
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            targets = ids[0, 1:]
            picked = logp.gather(-1, targets[:, None])[:, 0]
            values.append(picked[len(pair["prompt_ids"]) - 1 :].sum())
        out.append(torch.stack(values))
    return out[0], out[1]


def _read_metrics(out, split):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_step_gradient_and_metrics_match_float64_dpo(assets, tmp_path):
    """Step 2 (policy != reference, several bins) equals TRL-style DPO on unpacked float64 sequences."""
    trainer = Trainer(_config(assets, tmp_path, log_every=1))
    bins = trainer._epoch_plan(0)[1]
    assert len(bins) > 1, "the step should accumulate several micro-batches"
    indices = torch.cat([torch.from_numpy(b) for b in bins]).numpy()
    pairs = trainer.train_split.pairs(indices)
    grads = _capture_grads(trainer, at_step=2)
    trainer.train(stop_after=1)
    policy = AutoModelForCausalLM.from_pretrained(assets / "model").double()
    policy.load_state_dict({k: v.double() for k, v in trainer.model.state_dict().items()})
    reference = AutoModelForCausalLM.from_pretrained(assets / "model").double()
    trainer.train(stop_after=2)

    with torch.no_grad():
        ref_c, ref_r = _sequence_logps64(reference, pairs)
    pol_c, pol_r = _sequence_logps64(policy, pairs)
    chosen, rejected = BETA * (pol_c - ref_c), BETA * (pol_r - ref_r)
    loss = -F.logsigmoid(chosen - rejected).mean()
    loss.backward()
    for name, param in policy.named_parameters():
        torch.testing.assert_close(grads[name].double(), param.grad, rtol=1e-4, atol=1e-7, msg=name)

    logged = _read_metrics(tmp_path, "train")[-1]
    assert logged["step"] == 2
    expected = {
        "loss": loss,
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).double().mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": pol_c.mean(),
        "logps/rejected": pol_r.mean(),
    }
    assert set(METRIC_NAMES) <= set(logged)
    for name, value in expected.items():
        assert logged[name] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), name
    tokens = trainer.train_split.tokens
    assert logged["num_tokens"] == sum(
        int(tokens[b].sum()) for step in trainer._epoch_plan(0)[:2] for b in step
    )


@pytest.mark.parametrize("setup", ["full", "lora"])
def test_resume_is_exact(assets, tmp_path, setup):
    """Killed after step 3 and resumed from its checkpoint, a run ends with the uninterrupted weights."""
    extra = {"max_steps": 6, "seed": 7, "log_every": 1}
    if setup == "lora":
        # Dropout draws random numbers in every forward, so an exact match needs the RNG state restored.
        extra.update(lora_r=4, lora_dropout=0.1, disable_dropout=False, reference="adapter")
    whole = Trainer(_config(assets, tmp_path / "whole", **extra))
    initial = {n: p.detach().clone() for n, p in whole.model.named_parameters() if p.requires_grad}
    whole.train()

    first = Trainer(_config(assets, tmp_path / "cut", save_every=3, **extra))
    first.train(stop_after=3)
    del first
    resumed = Trainer(_config(assets, tmp_path / "cut", save_every=3, **extra))
    assert (resumed.step, resumed.step_in_epoch) == (3, 3)
    resumed.train()

    expected, got = whole.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    trained = dict(whole.model.named_parameters())
    assert all(not torch.equal(trained[n], p) for n, p in initial.items()), (
        "every trainable tensor should move"
    )
    last = [_read_metrics(tmp_path / run, "train")[-1] for run in ("whole", "cut")]
    assert last[0]["step"] == last[1]["step"] == 6 and last[0]["loss"] == last[1]["loss"]


def test_resume_refuses_a_different_plan(assets, tmp_path):
    Trainer(_config(assets, tmp_path, save_every=1)).train(stop_after=1)
    with pytest.raises(ValueError, match="tokens_per_step"):
        Trainer(_config(assets, tmp_path, save_every=1, tokens_per_step=256))


@pytest.mark.parametrize("reference", ["precompute", "model", "adapter"])
def test_policy_equals_reference_before_training(assets, tmp_path, reference):
    """Before any update every reward is exactly 0: no pair counts as won (TRL's strict >)."""
    extra = {"ref_model": str(assets / "model")} if reference == "model" else {}
    if reference == "adapter":
        extra = {"lora_r": 4}
    trainer = Trainer(_config(assets, tmp_path, reference=reference, eval_fraction=0.25, **extra))
    metrics = trainer.evaluate()
    assert metrics["rewards/accuracies"] == 0.0
    assert metrics["rewards/margins"] == 0.0
    assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert len(trainer.eval_split.data) == 24 and len(trainer.train_split.data) == 72
    after = trainer.train()["eval"]
    assert after["rewards/margins"] != 0.0


def test_reference_cache_is_reused(assets, tmp_path, caplog):
    config = _config(assets, tmp_path)
    first = Trainer(config)
    files = sorted((tmp_path / "cache").glob("ref-logps-*.safetensors"))
    assert len(files) == 1
    with caplog.at_level(logging.INFO, logger="fastdpo"):
        second = Trainer(config)
    assert "read from" in caplog.text
    assert torch.equal(first.train_split.ref_chosen, second.train_split.ref_chosen)
    assert not torch.equal(first.train_split.ref_chosen, first.train_split.ref_rejected)
    Trainer(_config(assets, tmp_path, shared_prompt=False, tokens_per_step=256))
    assert len(list((tmp_path / "cache").glob("ref-logps-*.safetensors"))) == 2


def test_checkpointing_and_offload_keep_gradients(assets, tmp_path, monkeypatch):
    """Gradient checkpointing + save_on_cpu give the plain run's gradients and do offload saved tensors."""
    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Counting(real):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(t.shape) or pack(t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    seed = random.randrange(1000)
    plain = Trainer(_config(assets, tmp_path / "a", seed=seed))
    lean = Trainer(
        _config(assets, tmp_path / "b", seed=seed, gradient_checkpointing=True, offload_activations=True)
    )
    grads = [_capture_grads(t, at_step=2) for t in (plain, lean)]
    plain.train(stop_after=2)
    assert not packed
    lean.train(stop_after=2)
    assert packed, "offload_activations saved nothing through save_on_cpu"
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_outputs_logs_and_export(assets, tmp_path):
    trainer = Trainer(
        _config(
            assets,
            tmp_path,
            eval_fraction=0.25,
            eval_every=2,
            log_every=2,
            save_model=True,
            tensorboard=True,
            save_every=2,
        )
    )
    result = trainer.train()
    assert set(METRIC_NAMES) <= set(result["train"]) and set(METRIC_NAMES) <= set(result["eval"])
    assert [r["step"] for r in _read_metrics(tmp_path, "eval")] == [2, 4]
    assert [r["step"] for r in _read_metrics(tmp_path, "train")] == [2, 4]
    assert list((tmp_path / "tb").iterdir())
    assert (tmp_path / "checkpoint-00000004").is_dir() and (tmp_path / "config.yaml").is_file()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "final", use_safetensors=True)
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], value, rtol=0, atol=0)


def test_steps_follow_the_token_budgets(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path, epochs=2, max_steps=0))
    tokens = trainer.train_split.tokens
    for epoch in (0, 1):
        plan = trainer._epoch_plan(epoch)
        seen = sorted(i for step in plan for b in step for i in b.tolist())
        assert seen == list(range(len(tokens))), "every pair once per epoch"
        for step in plan:
            assert all(tokens[b].sum() <= 128 for b in step)
            assert sum(tokens[b].sum() for b in step) <= 512
    assert trainer.total_steps == len(trainer._epoch_plan(0)) + len(trainer._epoch_plan(1))
    assert [i.tolist() for s in trainer._epoch_plan(0) for i in s] != [
        i.tolist() for s in trainer._epoch_plan(1) for i in s
    ]


def test_warmup_cosine_schedule():
    factors = [_warmup_cosine(s, warmup=2, total=10, min_ratio=0.1) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_precomputed_and_live_reference_model_agree(assets, tmp_path):
    """A separate reference model scores the same whether precomputed up front or run next to the policy."""
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=32, num_layers=2, seed=random.randrange(1000, 2000)).save_pretrained(
        tmp_path / "other"
    )
    common = dict(ref_model=str(tmp_path / "other"), eval_fraction=0.25, seed=random.randrange(1000))
    precomputed = Trainer(_config(assets, tmp_path / "a", reference="precompute", **common)).evaluate()
    live = Trainer(_config(assets, tmp_path / "b", reference="model", **common)).evaluate()
    assert precomputed["rewards/margins"] != 0.0
    for name in METRIC_NAMES:
        assert precomputed[name] == pytest.approx(live[name], rel=1e-5, abs=1e-6), name


@pytest.mark.gpu
def test_cuda_bf16_triton_step_matches_cpu_fp32(assets, tmp_path):
    """On CUDA (bf16 autocast, Triton kernels) the first gradient points where the fp32 CPU one does."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    seed = random.randrange(1000)
    grads = {}
    for device in ("cpu", "cuda"):
        trainer = Trainer(_config(assets, tmp_path / device, device=device, seed=seed, eval_fraction=0.25))
        assert trainer.evaluate()["rewards/margins"] == 0.0
        grads[device] = _capture_grads(trainer, at_step=1)
        trainer.train(stop_after=1)
    assert grads["cpu"].keys() == grads["cuda"].keys()
    cpu = torch.cat([g.flatten() for g in grads["cpu"].values()])
    cuda = torch.cat([g.float().cpu().flatten() for g in grads["cuda"].values()])
    assert F.cosine_similarity(cpu, cuda, dim=0) > 0.99
    assert cuda.norm() == pytest.approx(cpu.norm().item(), rel=0.05)


# ---------------------------------------------------------------------- hardening (issue 12)


def _float_fields():
    hints = typing.get_type_hints(TrainConfig)
    return [f.name for f in dataclasses.fields(TrainConfig) if hints[f.name] is float]


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, "inf", "nan", True])
def test_every_float_option_rejects_non_finite_values_and_bools(assets, tmp_path, bad):
    names = _float_fields()
    assert {"lr", "beta", "max_grad_norm", "save_every_minutes"} <= set(names)
    for name in names:
        with pytest.raises((ValueError, TypeError), match=name):
            _config(assets, tmp_path, **{name: bad})
    with pytest.raises(ValueError, match="max_steps"):
        _config(assets, tmp_path, max_steps=math.inf)
    assert _config(assets, tmp_path, lr="2e-5").lr == 2e-5


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_a_non_finite_step_is_skipped_and_training_goes_on(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path, log_every=1, save_every=1))
    loss = trainer.forward.loss

    def nan_in_step_2(batch, ref):
        out = loss(batch, ref)
        return dataclasses.replace(out, loss=out.loss * math.nan) if trainer.step == 1 else out

    trainer.forward.loss = nan_in_step_2
    trainer.train(stop_after=1)
    before = _params(trainer)
    trainer.train(stop_after=2)
    after = _params(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before), "the NaN step changed the weights"
    # The schedule still advanced: step 3 runs at the LR of step 3.
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(
        1e-2 * _warmup_cosine(2, warmup=1, total=4, min_ratio=0)
    )
    trainer.train()
    assert not torch.equal(after["model.embed_tokens.weight"], trainer.model.model.embed_tokens.weight)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in lines] == [
        (1, "train"),
        (2, "skipped"),
        (3, "train"),
        (4, "train"),
    ]
    assert "non-finite loss nan" in lines[1]["reason"]


def test_a_diverged_run_stops_and_exports_nothing(assets, tmp_path):
    trainer = Trainer(_config(assets, tmp_path, max_steps=8, max_bad_steps=2, save_model=True))
    for group in trainer.optimizer.param_groups:  # past the config's checks, as a diverging run would
        group["lr"] = math.inf
    trainer.scheduler.base_lrs = [math.inf] * len(trainer.scheduler.base_lrs)
    with pytest.raises(UserError, match="stopping at step 3: 2 optimizer steps in a row had a non-finite"):
        trainer.train()
    assert not (tmp_path / "final").exists()
    with pytest.raises(UserError, match="refusing to write the final model .* inf or nan"):
        trainer._export(tmp_path / "final")
    with pytest.raises(UserError, match="refusing to write the checkpoint of step 3"):
        trainer.save()
    assert not (tmp_path / "final").exists() and not list(tmp_path.glob("checkpoint-*"))


def test_resume_refuses_changed_options_or_applies_them_when_allowed(assets, tmp_path):
    seed = random.randrange(1000)
    Trainer(_config(assets, tmp_path, save_every=2, seed=seed)).train(stop_after=2)
    with pytest.raises(UserError, match=r"beta \(0.3 -> 0.5\), lr \(0.01 -> 0.03\).*allow_config_change"):
        Trainer(_config(assets, tmp_path, save_every=2, seed=seed, lr=3e-2, beta=0.5))
    with pytest.raises(UserError, match=r"lora_r \(0 -> 4\)"):
        Trainer(_config(assets, tmp_path, save_every=2, seed=seed, lora_r=4, allow_config_change=True))
    # Free options (how the run executes and reports) never count as changes.
    assert Trainer(_config(assets, tmp_path, save_every=1, seed=seed, log_every=3)).step == 2

    changed = _config(
        assets,
        tmp_path,
        save_every=2,
        seed=seed,
        lr=3e-2,
        max_steps=6,
        warmup_steps=3,
        allow_config_change=True,
    )
    trainer = Trainer(changed)
    assert trainer.step == 2
    expected = 3e-2 * _warmup_cosine(2, warmup=3, total=6, min_ratio=0.0)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([expected] * 2)
    trainer.train()
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert recorded["lr"] == 3e-2 and recorded["max_steps"] == 6
    # The checkpoints after the change record it: resuming them needs no flag.
    assert Trainer(_config(assets, tmp_path, seed=seed, lr=3e-2, max_steps=6, warmup_steps=3)).step == 6


def test_metrics_do_not_repeat_after_a_resume_and_num_tokens_is_a_total(assets, tmp_path):
    seed = random.randrange(1000)
    first = Trainer(_config(assets, tmp_path, save_every=2, log_every=1, seed=seed))
    first.train(stop_after=3)  # checkpoint at 2, step 3 logged after it
    resumed = Trainer(_config(assets, tmp_path, save_every=2, log_every=2, seed=seed))
    assert resumed.step == 2
    resumed.train()
    records = _read_metrics(tmp_path, "train")
    assert [r["step"] for r in records] == [1, 2, 4]
    tokens = resumed.train_split.tokens
    totals = np.cumsum([sum(int(tokens[b].sum()) for b in step) for step in resumed._epoch_plan(0)])
    assert [r["num_tokens"] for r in records] == [totals[0], totals[1], totals[3]]


def test_a_signal_ends_the_run_after_the_step_with_a_checkpoint(assets, tmp_path, monkeypatch):
    seed = random.randrange(1000)
    trainer = Trainer(_config(assets, tmp_path, seed=seed))
    step = trainer._train_step

    def signalled_in_step_2(bins):
        if trainer.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(bins)

    trainer._train_step = signalled_in_step_2
    assert trainer.train() == {}
    assert trainer.stopped_by == signal.SIGTERM and trainer.step == 2
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-00000002"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is restored"
    resumed = Trainer(_config(assets, tmp_path, seed=seed))
    assert resumed.step == 2

    def signalled(config):
        run = Trainer(config)
        monkeypatch.setattr(
            run, "_train_step", lambda bins: os.kill(os.getpid(), signal.SIGINT) or step(bins)
        )
        return run

    monkeypatch.setattr(loop, "Trainer", signalled)
    with pytest.raises(SystemExit) as exit_info:
        loop.train(_config(assets, tmp_path / "cli", seed=seed))
    assert exit_info.value.code == 130


def test_time_based_saving(assets, tmp_path):
    Trainer(_config(assets, tmp_path, save_every_minutes=1e-9, keep_last=4)).train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        f"checkpoint-0000000{i}" for i in (1, 2, 3, 4)
    ]
