"""FastKTOTrainer against TRL 1.16's stock KTOTrainer on one batch: loss, every gradient, every metric.

Built like ``test_trl_integration.py`` (whose helpers it reuses): a tiny random LlamaForCausalLM, a
WordLevel tokenizer and an in-memory unpaired dataset (prompt / completion / label); nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import test_trl_integration  # noqa: E402
from datasets import Dataset  # noqa: E402
from test_trl_integration import (  # noqa: E402
    WORDS,
    _assert_same,
    _model,
    _one_batch,
    _states,
    _tokenizer,
    _train_two_steps,
)
from trl import KTOConfig, KTOTrainer  # noqa: E402

import fastdpo.ops.kto_loss as kto_ops  # noqa: E402
from fastdpo.integrations.trl import FastKTOTrainer  # noqa: E402

# The fixture that makes TRL's own head fail, so the fast trainer's numbers provably come from fastdpo.
no_trl_head = test_trl_integration.no_trl_head
# One intra-op thread and no FASTDPO_BACKEND, for every test here as there.
_setup = test_trl_integration._setup
_args = functools.partial(test_trl_integration._args, config_cls=KTOConfig)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

# Loss types, the weights, gradient checkpointing and bf16 autocast, each on one trainer configuration.
CASES = {
    "kto": {},
    "apo_zero_unpaired": {"loss_type": "apo_zero_unpaired"},
    "weights": {"desirable_weight": 1.33, "undesirable_weight": 0.75, "beta": 0.3},
    "gradient_checkpointing": {"gradient_checkpointing": True},
}


def _kto_states() -> tuple[dict, dict]:
    """Random (policy, reference) weights whose KL estimate is positive, so the clamp never hides it.

    A sharper reference head (logits x10) gives random completions lower log-probs than the policy does.
    """
    policy, reference = _states()
    reference["lm_head.weight"] = 10 * reference["lm_head.weight"]
    return policy, reference


def _dataset(rows: int = 8, seed: int = 0) -> Dataset:
    """Unpaired rows of varied lengths; labels mixed within every batch of ``BATCH``."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    return Dataset.from_list(
        [
            {"prompt": text(2 + i % 3), "completion": " " + text(1 + (3 * i) % 5), "label": i % 3 != 1}
            for i in range(rows)
        ]
    )


def _run(
    cls, tmp_path: Path, policy: dict, reference: dict | None, *, dataset=None, peft_config=None, **settings
):
    trainer = cls(
        model=_model(policy),
        ref_model=None if reference is None else _model(reference),
        args=_args(tmp_path, **settings),
        train_dataset=dataset if dataset is not None else _dataset(),
        processing_class=_tokenizer(),
        peft_config=peft_config,
    )
    return trainer, _one_batch(trainer)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_stock_trainer(case: str, tmp_path: Path, no_trl_head) -> None:
    policy, reference = _kto_states()
    _, stock = _run(KTOTrainer, tmp_path, policy, reference, **CASES[case])
    no_trl_head()
    _, fast = _run(FastKTOTrainer, tmp_path, policy, reference, **CASES[case])
    _assert_same(stock, fast)
    if case != "apo_zero_unpaired":
        assert fast[2]["kl"] > 0  # the KL term is live, not clamped away
    assert {"rewards/margins", "logits/chosen", "entropy"} <= set(fast[2])


def test_gemma2_final_logit_softcap(tmp_path: Path, no_trl_head) -> None:
    """The policy loss, the KL completions and the reference are all scored with the model's softcap."""
    import transformers

    config = transformers.Gemma2Config(
        vocab_size=len(test_trl_integration.VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=None, eos_token_id=1, final_logit_softcapping=2.0,
    )  # fmt: skip
    states = [transformers.Gemma2ForCausalLM(config).state_dict() for _ in range(2)]
    # Logits of order 1 (policy) and 2 (reference), where the softcap of 2 bends them.
    states[0]["lm_head.weight"] = 5 * states[0]["lm_head.weight"]
    states[1]["lm_head.weight"] = 10 * states[1]["lm_head.weight"]
    runs = []
    for cls in (KTOTrainer, FastKTOTrainer):
        if cls is FastKTOTrainer:
            no_trl_head()
        models = [transformers.Gemma2ForCausalLM(config) for _ in states]
        for model, state in zip(models, states, strict=True):
            model.load_state_dict(state)
        trainer = cls(
            model=models[0], ref_model=models[1], args=_args(tmp_path), train_dataset=_dataset(),
            processing_class=_tokenizer(),
        )  # fmt: skip
        runs.append(_one_batch(trainer))
    _assert_same(*runs)


def test_single_label_batch(tmp_path: Path, no_trl_head) -> None:
    policy, reference = _kto_states()
    dataset = _dataset().map(lambda row: {"label": True})
    _, stock = _run(KTOTrainer, tmp_path, policy, reference, dataset=dataset)
    no_trl_head()
    _, fast = _run(FastKTOTrainer, tmp_path, policy, reference, dataset=dataset)
    _assert_same(stock, fast)
    assert "rewards/rejected" not in fast[2] and "rewards/chosen" in fast[2]


def test_bf16_autocast(tmp_path: Path, no_trl_head) -> None:
    """Under bf16 autocast, fast and stock differ by at most twice stock's own bf16 error (against fp32)."""
    policy, reference = _kto_states()
    _, fp32 = _run(KTOTrainer, tmp_path, policy, reference)
    _, stock = _run(KTOTrainer, tmp_path, policy, reference, bf16=True)
    no_trl_head()
    _, fast = _run(FastKTOTrainer, tmp_path, policy, reference, bf16=True)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    own = max(rel(stock[1][n], g) for n, g in fp32[1].items())
    assert own > 0  # autocast changed stock's numbers, so the comparison below can fail
    assert set(fast[1]) == set(stock[1])
    for name, g in stock[1].items():
        assert fast[1][name].dtype == torch.float32, name
        assert rel(fast[1][name], g) <= 2 * own, name
    assert abs(float(fast[0] - stock[0])) <= 2 * abs(float(stock[0] - fp32[0])) + 1e-7
    assert set(fast[2]) == set(stock[2])
    for key, value in stock[2].items():
        assert abs(fast[2][key] - value) <= 2 * abs(value - fp32[2][key]) + 1e-6 * abs(value) + 1e-7, key


def test_precomputed_reference_matches_inline_reference(tmp_path: Path, no_trl_head) -> None:
    policy, reference = _kto_states()
    _, stock = _run(KTOTrainer, tmp_path, policy, reference)
    no_trl_head()
    trainer, fast = _run(FastKTOTrainer, tmp_path, policy, reference, precompute_ref_log_probs=True)
    assert {"ref_logps", "ref_KL_logps"} <= set(trainer.train_dataset.column_names)
    _assert_same(stock, fast)


def test_lora_reference_is_adapter_disabled(tmp_path: Path, no_trl_head) -> None:
    peft = pytest.importorskip("peft")
    policy, _ = _states()
    # Random (not zero) B matrices, so the adapted policy differs from its adapter-free reference.
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    runs = []
    for cls in (KTOTrainer, FastKTOTrainer):
        if cls is FastKTOTrainer:
            no_trl_head()
        trainer, run = _run(cls, tmp_path, policy, None, peft_config=lora)
        assert trainer.ref_model is None
        runs.append(run)
    assert all("lora" in name for name in runs[1][1])
    assert abs(runs[1][2]["rewards/chosen"]) > 1e-4
    _assert_same(*runs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_dtype(dtype: torch.dtype, tmp_path: Path, no_trl_head) -> None:
    """TRL's ``model_init_kwargs={"dtype": ...}``: policy and reference in fp16 / bf16, no autocast. Both
    heads multiply in the model dtype and sum in fp32: the same loss, gradients (in the model dtype) and
    metrics as stock, to the fp32 tolerance."""
    policy, reference = _kto_states()
    runs = []
    for cls in (KTOTrainer, FastKTOTrainer):
        if cls is FastKTOTrainer:
            no_trl_head()
        trainer = cls(
            model=_model(policy).to(dtype), ref_model=_model(reference).to(dtype), args=_args(tmp_path),
            train_dataset=_dataset(), processing_class=_tokenizer(),
        )  # fmt: skip
        runs.append(_one_batch(trainer))
    assert all(g.dtype == dtype for g in runs[1][1].values())
    assert runs[0][2]["kl"] > 0
    _assert_same(*runs)


def _same_or_both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.allclose(a[~a.isnan()], b[~b.isnan()], rtol=1e-5)


def test_non_finite_kl_completion_is_trls(
    tmp_path: Path, no_trl_head, caplog: pytest.LogCaptureFixture
) -> None:
    """fp16 overflow in one KL completion: TRL's KL term (a plain mean) is NaN, and so is its loss; the
    drop-in gives the same numbers instead of stopping the run, and warns with the count of them."""
    policy, reference = _kto_states()
    # The reference's embedding of one word overflows (inf), as an fp16 activation can: every sequence
    # holding it scores NaN under the reference, the KL completion built from its prompt included.
    token = _tokenizer().convert_tokens_to_ids(WORDS[0])
    reference["model.embed_tokens.weight"][token] = float("inf")
    dataset = _dataset()
    batch = [dataset[i]["prompt"] + dataset[i]["completion"] for i in range(test_trl_integration.BATCH)]
    runs = []
    for cls in (KTOTrainer, FastKTOTrainer):
        if cls is FastKTOTrainer:
            no_trl_head()
        trainer = cls(
            model=_model(policy).half(), ref_model=_model(reference).half(), args=_args(tmp_path),
            train_dataset=dataset, processing_class=_tokenizer(),
        )  # fmt: skip
        with caplog.at_level("WARNING", logger="fastdpo.integrations.trl.kto"):
            runs.append(_one_batch(trainer))
    assert sum(WORDS[0] in text.split() for text in batch) == 1  # one poisoned sequence, the rest finite
    (stock_loss, stock_grads, stock_metrics), (fast_loss, fast_grads, fast_metrics) = runs
    assert math.isnan(stock_metrics["kl"]) and math.isnan(fast_metrics["kl"])
    assert _same_or_both_nan(fast_loss, stock_loss) and fast_loss.isnan()
    assert set(fast_grads) == set(stock_grads)
    for name, g in stock_grads.items():
        assert _same_or_both_nan(fast_grads[name].float(), g.float()), name
    assert set(fast_metrics) == set(stock_metrics)
    for key, value in stock_metrics.items():
        assert math.isnan(value) == math.isnan(fast_metrics[key]), key
        if not math.isnan(value):
            assert math.isclose(fast_metrics[key], value, rel_tol=1e-3, abs_tol=1e-4), key
    warnings = [r.getMessage() for r in caplog.records if "KL completions" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{_poisoned_kl_rows(dataset)} of 4 KL completions")


def _poisoned_kl_rows(dataset: Dataset) -> int:
    """How many of the first batch's KL completions (TRL's: each prompt with the previous row's completion)
    hold the poisoned word."""
    rows = [dataset[i] for i in range(test_trl_integration.BATCH)]
    kl_texts = [rows[i]["prompt"] + rows[i - 1]["completion"] for i in range(len(rows))]
    return sum(WORDS[0] in text.split() for text in kl_texts)


def _default_lora_run(cls, tmp_path: Path, peft_model) -> tuple:
    """TRL's ``test_train_peft_model``: a ``PeftModel`` with PEFT's default ``LoraConfig`` (B = 0) and no
    ``ref_model``, so TRL adds a "ref" copy of the adapter; ``KTOConfig``'s default gradient checkpointing,
    switched on as ``Trainer.train`` does, so the policy backward recomputes its layers."""
    trainer = cls(
        model=peft_model, args=_args(tmp_path, gradient_checkpointing=True, learning_rate=1.0),
        train_dataset=_dataset(), processing_class=_tokenizer(),
    )  # fmt: skip
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default", "ref"}
    trainer.model.activation_checkpointing_enable(trainer.args.activation_checkpointing_kwargs)
    assert trainer.model.is_gradient_checkpointing
    return _one_batch(trainer)


def test_default_lora_without_reference_model(tmp_path: Path, no_trl_head) -> None:
    """Equal loss, metrics and LoRA gradients given equal adapter weights.

    The 10% first-step grad_norm gap seen in TRL's own test was not the trainer's: with B = 0 the loss does
    not depend on lora_A, but the B gradients do, and TRL's test draws lora_A from the unseeded global RNG
    after the previous tests ran, so the stock and the fast runs started from different adapters. The
    control below shows exactly that signature: same loss, different gradients.
    """
    peft = pytest.importorskip("peft")
    policy, _ = _states()
    torch.manual_seed(0)
    lora = peft.get_peft_model(_model(policy), peft.LoraConfig())
    stock = _default_lora_run(KTOTrainer, tmp_path, copy.deepcopy(lora))
    torch.manual_seed(1)
    redrawn = _default_lora_run(KTOTrainer, tmp_path, peft.get_peft_model(_model(policy), peft.LoraConfig()))
    no_trl_head()
    fast = _default_lora_run(FastKTOTrainer, tmp_path, lora)
    assert stock[1] and all(".default." in name for name in stock[1])
    _assert_same(stock, fast)
    torch.testing.assert_close(redrawn[0], stock[0], rtol=1e-6, atol=0)
    b_grads = [name for name in stock[1] if "lora_B" in name]
    assert b_grads and all(stock[1][name].abs().max() > 0 for name in b_grads)
    assert all(not torch.allclose(redrawn[1][name], stock[1][name], rtol=1e-2) for name in b_grads)


def _first_loader_batch(trainer) -> tuple:
    """``_one_batch``, on the first batch of the trainer's own train dataloader (works for iterable data)."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_iterable_dataset(loss_type: str, tmp_path: Path, no_trl_head) -> None:
    """A streaming ``IterableDataset``, tokenized lazily, its KL completions built batch by batch."""
    policy, reference = _kto_states()
    runs = []
    for cls in (KTOTrainer, FastKTOTrainer):
        if cls is FastKTOTrainer:
            no_trl_head()
        trainer = cls(
            model=_model(policy), ref_model=_model(reference),
            args=_args(tmp_path, loss_type=loss_type, max_steps=1),
            train_dataset=_dataset().to_iterable_dataset(), processing_class=_tokenizer(),
        )  # fmt: skip
        runs.append(_first_loader_batch(trainer))
    assert (runs[0][2]["kl"] > 0) == (loss_type == "kto")
    _assert_same(*runs)


def test_multiple_eval_datasets(tmp_path: Path, no_trl_head) -> None:
    """``eval_dataset`` as a dict: every dataset's eval metrics (loss, KL, rewards, logits) equal stock's."""
    policy, reference = _kto_states()
    results = []
    for cls in (KTOTrainer, FastKTOTrainer):
        if cls is FastKTOTrainer:
            no_trl_head()
        trainer = cls(
            model=_model(policy), ref_model=_model(reference), args=_args(tmp_path), train_dataset=_dataset(),
            eval_dataset={"data1": _dataset(rows=4, seed=1), "data2": _dataset(rows=6, seed=2)},
            processing_class=_tokenizer(),
        )  # fmt: skip
        trainer.evaluate()
        # One log entry per dataset: its prefixed loss, and TRL's metrics (unprefixed, as TRL logs them).
        timing = ("_runtime", "_per_second")
        entries = trainer.state.log_history
        results.append([{k: v for k, v in e.items() if not k.endswith(timing)} for e in entries])
    stock, fast = results
    assert len(stock) == 2 and "eval_data1_loss" in stock[0] and "eval_data2_loss" in stock[1]
    assert {"eval_kl", "eval_rewards/margins", "eval_logits/chosen"} <= set(stock[1])
    assert stock[0]["eval_kl"] != stock[1]["eval_kl"]
    assert [set(e) for e in fast] == [set(e) for e in stock]
    for stock_entry, fast_entry in zip(stock, fast, strict=True):
        for key, value in stock_entry.items():
            got = fast_entry[key]
            assert math.isclose(got, value, rel_tol=1e-5, abs_tol=1e-6), (key, got, value)


def test_without_logit_metrics(tmp_path: Path) -> None:
    policy, reference = _kto_states()
    _, stock = _run(KTOTrainer, tmp_path, policy, reference)
    trainer = FastKTOTrainer(
        model=_model(policy),
        ref_model=_model(reference),
        args=_args(tmp_path),
        train_dataset=_dataset(),
        processing_class=_tokenizer(),
        logit_metrics=False,
    )
    fast = _one_batch(trainer)
    dropped = {"entropy", "logits/chosen", "logits/rejected"}
    assert set(stock[2]) - set(fast[2]) == dropped
    for key in dropped:
        stock[2].pop(key)
    _assert_same(stock, fast)


@pytest.mark.parametrize(
    ("extra", "match"), [({"backend": "cuda"}, "backend must be"), ({"impl": "naive"}, "impl must be")]
)
def test_rejects_unsupported_settings(tmp_path: Path, extra: dict, match: str) -> None:
    policy, reference = _kto_states()
    with pytest.raises(ValueError, match=match):
        FastKTOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path),
            train_dataset=_dataset(),
            processing_class=_tokenizer(),
            **extra,
        )


def test_triton_backend_under_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_trl_head
) -> None:
    if not os.path.exists("/dev/nvidiactl"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    policy, reference = _kto_states()
    _, stock = _run(KTOTrainer, tmp_path, policy, reference)
    no_trl_head()
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    calls = []
    kernel = kto_ops.kto_loss_triton
    monkeypatch.setattr(kto_ops, "kto_loss_triton", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    _, fast = _run(FastKTOTrainer, tmp_path, policy, reference)
    assert calls  # the KTO loss kernel ran
    _assert_same(stock, fast)


def test_version_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    policy, reference = _kto_states()
    with pytest.raises(RuntimeError, match=r"supports trl >=1\.16,<1\.17.*trl 1\.17\.0 is installed"):
        FastKTOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path),
            train_dataset=_dataset(),
            processing_class=_tokenizer(),
        )


def test_train_two_steps_and_evaluate(tmp_path: Path, no_trl_head) -> None:
    no_trl_head()
    keys = {"kl", "rewards/chosen", "logps/rejected"}
    trainer, _ = _train_two_steps(FastKTOTrainer, tmp_path, _kto_states(), _dataset, _args, keys)
    evaluation = trainer.evaluate()
    assert math.isfinite(evaluation["eval_loss"]) and "eval_kl" in evaluation


_DDP_WORKER = r"""
import json, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
from transformers import LlamaForCausalLM, TrainerCallback
from trl import KTOConfig, KTOTrainer
sys.path.insert(0, sys.argv[2])
from test_trl_integration import _llama_config, _tokenizer
from test_kto_trl import _dataset, _kto_states
from fastdpo.integrations.trl import FastKTOTrainer

torch.manual_seed(0)
policy, reference = _kto_states()


class Grads(TrainerCallback):
    # The all-reduced gradient right before the optimizer step, and its spread across ranks.
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flat)
        self.spread = max((e - flat).abs().max().item() for e in every) / flat.abs().max().item()
        self.flat = flat


class Unwrapped(FastKTOTrainer):
    # The loss run on the unwrapped module, outside DDP's forward: gradients are not all-reduced.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(self.accelerator.unwrap_model(model), inputs, return_outputs)


result = {}
for name, cls in [("stock", KTOTrainer), ("fast", FastKTOTrainer), ("unwrapped", Unwrapped)]:
    model, ref = LlamaForCausalLM(_llama_config()), LlamaForCausalLM(_llama_config())
    model.load_state_dict(policy)
    ref.load_state_dict(reference)
    grads = Grads()
    args = KTOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=2, gradient_checkpointing=False, max_steps=1,
                     save_strategy="no", ddp_backend="gloo", disable_tqdm=True, logging_steps=1)
    trainer = cls(model=model, ref_model=ref, args=args, train_dataset=_dataset(),
                  processing_class=_tokenizer(), callbacks=[grads])
    trainer.train()
    loss = [e for e in trainer.state.log_history if "loss" in e][0]
    result[name] = {"spread": grads.spread, "flat": grads.flat, "loss": loss["loss"], "kl": loss["kl"]}
if dist.get_rank() == 0:
    stock, fast = result["stock"]["flat"], result["fast"]["flat"]
    out = {name: {k: v for k, v in r.items() if k != "flat"} for name, r in result.items()}
    out["fast_vs_stock"] = ((fast - stock).abs().max() / stock.abs().max()).item()
    with open(sys.argv[1], "w") as f:
        json.dump(out, f)
"""


def test_ddp_matches_stock_and_keeps_gradient_sync(tmp_path: Path) -> None:
    """Two gloo ranks with different data: the all-reduced gradients, the loss and the (gathered) KL term
    equal stock KTOTrainer's, and agree across ranks. The ``unwrapped`` control must disagree."""
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(_DDP_WORKER)
    out = tmp_path / "result.json"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    env.pop("FASTDPO_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(worker), str(out), str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["fast"]["spread"] < 1e-6 and result["stock"]["spread"] < 1e-6
    assert result["unwrapped"]["spread"] > 1e-3
    assert result["fast_vs_stock"] < 1e-5
    assert result["fast"]["kl"] > 0
    assert math.isclose(result["fast"]["kl"], result["stock"]["kl"], rel_tol=1e-5)
    assert math.isclose(result["fast"]["loss"], result["stock"]["loss"], rel_tol=1e-5)
