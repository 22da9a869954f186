"""The trainer on two gloo ranks (DDP, FSDP2) against one process; resume after a crash; injected models.

Two ranks are spawned once for the module (``test_distributed``'s rank pool) and build trainers from pickled
configs; tasks return numbers and the assertions run here. The crash test spawns its own pair.
"""

from __future__ import annotations

import dataclasses
import json
import random
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import WORLD, _free_port, _rank_env, _Ranks
from test_trainer import _config, _sequence_logps64, assets  # noqa: F401  (assets is a fixture)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

from fastdpo.demo import build_model, build_tokenizer
from fastdpo.distributed import init_distributed, unwrap_model
from fastdpo.train import METRIC_NAMES, TrainConfig, Trainer

CRASH_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def ranks():
    pool = _Ranks()
    yield pool
    pool.close()


def _full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The trained weights as one process holds them (gathered from the shards under FSDP2)."""
    if trainer.config.strategy == "fsdp2":
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(trainer.model, options=options)
    return {k: v.detach().clone() for k, v in unwrap_model(trainer.model).state_dict().items()}


def _full_grads(trainer: Trainer, captured: dict) -> None:
    """Records the whole gradients the optimizer sees at each step (gathered from the shards under FSDP2)."""

    def hook(optimizer, args, kwargs):
        grads = {}
        for name, param in unwrap_model(trainer.model).named_parameters():
            grad = param.grad
            if grad is not None:
                grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
        captured[trainer.step + 1] = grads

    trainer.optimizer.register_step_pre_hook(hook)


def _train(rank: int, config: TrainConfig, stop_after: int | None = None) -> dict:
    """Task: build a trainer (resuming if the run has a checkpoint), train, report what one process sees."""
    trainer = Trainer(config)
    grads: dict[int, dict[str, torch.Tensor]] = {}
    _full_grads(trainer, grads)
    result = trainer.train(stop_after=stop_after)
    return {
        "grads": grads,
        "result": result,
        "ref": (trainer.train_split.ref_chosen.clone(), trainer.train_split.ref_rejected.clone()),
        "state": _full_state(trainer),
        "step": trainer.step,
        "tiled": sum("forward" in vars(m) for m in unwrap_model(trainer.model).modules()),
    }


def _assert_same_state(actual: dict, expected: dict, **tolerance) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def _logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# Every long-context mechanism, with tiles of 24 rows (not a divisor of the bins) so each MLP runs several.
LONG_CONTEXT = dict(
    gradient_checkpointing=True, offload_checkpoints=True, tiled_mlp=True, lean_norms=True, tile_tokens=24
)


@pytest.mark.parametrize("long_context", [False, True], ids=["plain", "long-context"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_step_on_two_ranks_equals_one_process(ranks, assets, tmp_path, strategy, long_context):  # noqa: F811
    """One step over the same global batch: same reference table, loss, metrics and updated weights; with
    the long-context mechanisms on the ranks too (a tiled MLP that DDP's reducer or FSDP2's resharding saw
    accumulate a parameter twice would fail here, as Liger's does: Liger #893)."""
    config = _config(assets, tmp_path / "single", log_every=1, backend="torch", lr=1e-3)
    single = _train(0, config, stop_after=1)
    distributed = dataclasses.replace(config, output_dir=str(tmp_path / strategy), strategy=strategy)
    if long_context:
        distributed = dataclasses.replace(distributed, **LONG_CONTEXT)
    replies = ranks.run(_train, distributed, 1)
    layers = AutoConfig.from_pretrained(config.model).num_hidden_layers
    # A tiled MLP and two tiled norms a layer, and the final norm.
    assert [r["tiled"] for r in replies] == [3 * layers + 1 if long_context else 0] * WORLD
    for reply in replies:
        _assert_same_state(reply["grads"][1], single["grads"][1], rtol=1e-5, atol=1e-7)
        for table, expected in zip(reply["ref"], single["ref"], strict=True):
            torch.testing.assert_close(table, expected, rtol=1e-6, atol=1e-6)
        got, want = reply["result"]["train"], single["result"]["train"]
        for name in (*METRIC_NAMES, "grad_norm", "learning_rate", "num_tokens"):
            assert got[name] == pytest.approx(want[name], rel=1e-6, abs=1e-6), name
    # AdamW's first update is lr * g / (|g| + 1e-8): where |g| nears eps, fp32 rounding in g (summed over
    # ranks in another order) moves the update by up to lr, so those entries are compared to the update size.
    for name, weight in single["state"].items():
        grads = single["grads"][1]
        # A tied weight (lm_head) has its gradient under the name of the parameter it shares.
        grad = grads.get(
            name, next((g for k, g in grads.items() if torch.equal(single["state"][k], weight)), None)
        )
        tight = torch.ones_like(weight, dtype=torch.bool) if grad is None else grad.abs() > 1e-6
        got = replies[0]["state"][name]
        torch.testing.assert_close(got[tight], weight[tight], rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(got[~tight], weight[~tight], rtol=0, atol=2 * config.lr, msg=name)
    if strategy == "ddp":
        _assert_same_state(replies[1]["state"], replies[0]["state"], rtol=0, atol=0)
    assert [r["step"] for r in _logged(tmp_path / strategy)] == [1], "rank 0 alone writes metrics.jsonl"


def test_fsdp2_resumes_exactly_and_exports_a_loadable_model(ranks, assets, tmp_path):  # noqa: F811
    config = _config(
        assets,
        tmp_path / "whole",
        backend="torch",
        strategy="fsdp2",
        max_steps=3,
        save_every=1,
        save_model=True,
        log_every=1,
        eval_fraction=0.1,
    )
    whole = ranks.run(_train, config)
    resumed_config = dataclasses.replace(config, output_dir=str(tmp_path / "resumed"))
    ranks.run(_train, resumed_config, 2)
    assert (tmp_path / "resumed" / "sharded-00000002").is_dir()
    resumed = ranks.run(_train, resumed_config)
    assert resumed[0]["step"] == 3
    _assert_same_state(resumed[0]["state"], whole[0]["state"], rtol=0, atol=0)
    (want,) = [r for r in _logged(tmp_path / "whole") if r["step"] == 3 and r["split"] == "train"]
    (got,) = [r for r in _logged(tmp_path / "resumed") if r["step"] == 3 and r["split"] == "train"]
    assert {k: got[k] for k in METRIC_NAMES} == {k: want[k] for k in METRIC_NAMES}
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "whole" / "final").state_dict()
    _assert_same_state(exported, whole[0]["state"], rtol=0, atol=0)
    assert (tmp_path / "whole" / "final" / "tokenizer.json").is_file()


def _crashing_rank(rank: int, port: int, config: TrainConfig, report_dir: str) -> None:
    """Rank 1 raises inside optimizer step 2; rank 0 records how its training ended."""
    _rank_env(rank, port)
    init_distributed(timeout_s=CRASH_TIMEOUT_S)
    trainer = Trainer(config)
    if rank == 1:
        step = trainer._train_step

        def crash_in_step_2(bins):
            if trainer.step == 1:
                raise RuntimeError("simulated crash of rank 1 in step 2")
            return step(bins)

        trainer._train_step = crash_in_step_2
    try:
        trainer.train()
        outcome = {"error": None}
    except Exception as err:
        outcome = {"error": type(err).__name__, "message": str(err), "trace": traceback.format_exc()}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    if outcome["error"]:
        raise SystemExit(1)


def test_a_crashed_rank_fails_the_job_and_a_rerun_resumes_exactly(ranks, assets, tmp_path):  # noqa: F811
    config = _config(
        assets, tmp_path / "run", backend="torch", strategy="ddp", max_steps=3, save_every=1, save_model=True
    )
    procs = mp.start_processes(
        _crashing_rank,
        args=(_free_port(), config, str(tmp_path)),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    for p in procs.processes:
        p.join(timeout=CRASH_TIMEOUT_S + 90)
    hung = [p.pid for p in procs.processes if p.is_alive()]
    for p in procs.processes:
        if p.is_alive():
            p.kill()
        p.join()
    assert not hung, "a rank hung after its peer crashed"
    assert [p.exitcode for p in procs.processes] == [1, 1]
    survivor = json.loads((tmp_path / "rank0.json").read_text())
    assert survivor["error"] == "RuntimeError", survivor
    assert "training step 2 failed on rank 0 of 2" in survivor["message"]
    assert "another rank" in survivor["message"]
    assert not (tmp_path / "run" / "final").exists()

    rerun = ranks.run(_train, config)
    whole = ranks.run(_train, dataclasses.replace(config, output_dir=str(tmp_path / "whole")))
    assert rerun[0]["step"] == 3
    _assert_same_state(rerun[0]["state"], whole[0]["state"], rtol=0, atol=0)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final").state_dict()
    _assert_same_state(exported, whole[0]["state"], rtol=0, atol=0)


def test_injected_gemma2_model_scores_with_its_final_logit_softcap(assets, tmp_path):  # noqa: F811
    """Reference log-probs of an injected Gemma-2 (softcap 2) equal its own float64 logits'; no disk cache."""
    tokenizer = build_tokenizer()
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        sliding_window=256,
        final_logit_softcapping=2.0,
        attn_logit_softcapping=None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(random.randrange(2**31))
    model = Gemma2ForCausalLM(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(
        _config(assets, tmp_path, backend="torch", model="injected-gemma2"), model=model, tokenizer=tokenizer
    )
    assert trainer.loss_fn.spec.softcap == 2.0 and trainer.loss_fn.spec.temperature == 1.0
    reference = Gemma2ForCausalLM(config).double()
    reference.load_state_dict({k: v.double() for k, v in initial.items()})
    indices = torch.randperm(len(trainer.train_split.data))[:6].numpy()
    with torch.no_grad():
        chosen, rejected = _sequence_logps64(reference, trainer.train_split.pairs(indices))
    torch.testing.assert_close(trainer.train_split.ref_chosen[indices].double(), chosen, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        trainer.train_split.ref_rejected[indices].double(), rejected, rtol=1e-4, atol=1e-4
    )
    assert not list((tmp_path / "cache").glob("ref-logps-*")), "an injected model's logps must not be cached"


def test_logit_scale_becomes_the_loss_temperature(assets, tmp_path):  # noqa: F811
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=16, num_layers=1)
    model.config.logit_scale = 0.25
    trainer = Trainer(
        _config(assets, tmp_path, backend="torch", model="injected", loss_type="simpo"),
        model=model,
        tokenizer=tokenizer,
    )
    assert trainer.loss_fn.spec.temperature == 4.0 and trainer.loss_fn.spec.softcap is None
    assert trainer.model is model


def test_strategy_needs_a_process_group_and_is_validated(assets, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="strategy: expected one of"):
        _config(assets, tmp_path, strategy="zero3")
    with pytest.raises(ValueError, match="fsdp2 exports full weights only"):
        _config(assets, tmp_path, strategy="fsdp2", lora_r=4)
    with pytest.raises(ValueError, match="needs a process group; launch with torchrun"):
        Trainer(_config(assets, tmp_path, strategy="ddp"))
    with pytest.raises(ValueError, match="expected this process's place in the job"):
        Trainer(_config(assets, tmp_path), world_size=2)
