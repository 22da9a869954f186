"""FastDPOTrainer against TRL 1.16's stock DPOTrainer on one batch: loss, every gradient, every metric.

Everything is built in the test: a tiny random LlamaForCausalLM, a WordLevel tokenizer and an in-memory
preference dataset; nothing is downloaded. The policy and the reference model get different random
weights, so rewards and log-ratios are far from zero.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from fastdpo.integrations.trl import FastDPOTrainer, check_trl_version  # noqa: E402

# By module path: the Triton launchers, whose chunk fold the triton-backend test counts.
head_triton = importlib.import_module("fastdpo.ops._head_triton")
REPO = Path(__file__).resolve().parents[1]
WORDS = [f"w{i}" for i in range(40)]
VOCAB = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
BATCH = 4

# Every TRL 1.16 loss type, then loss_weights, the f-divergences, ld_alpha and gradient checkpointing, each on
# top of one loss type.
LOSS_CASES = {
    "sigmoid": {"loss_type": "sigmoid"},
    "hinge": {"loss_type": "hinge"},
    "ipo": {"loss_type": "ipo"},
    "exo_pair": {"loss_type": "exo_pair", "label_smoothing": 1e-3},
    "nca_pair": {"loss_type": "nca_pair"},
    "robust": {"loss_type": "robust", "label_smoothing": 0.1},
    "bco_pair": {"loss_type": "bco_pair"},
    "sppo_hard": {"loss_type": "sppo_hard"},
    "aot": {"loss_type": "aot"},
    "aot_unpaired": {"loss_type": "aot_unpaired"},
    "apo_zero": {"loss_type": "apo_zero"},
    "apo_down": {"loss_type": "apo_down"},
    "discopop": {"loss_type": "discopop"},
    "sft": {"loss_type": "sft"},
    "sigmoid_norm": {"loss_type": "sigmoid_norm"},
    "mpo_weights": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    "js_divergence": {"loss_type": "hinge", "f_divergence_type": "js_divergence"},
    "alpha_divergence": {
        "loss_type": "sigmoid",
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 0.3,
    },
    "ld_alpha": {"loss_type": "sigmoid", "ld_alpha": 0.5},
    "gradient_checkpointing": {"loss_type": "ipo", "gradient_checkpointing": True},
}


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def _setup(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.delenv("FASTDPO_BACKEND", raising=False)
    # The matrices here are tiny: a second intra-op thread only adds synchronization, which costs 100x on
    # a loaded 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def _dataset(rows: int = 8, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))

    # Responses of different lengths, so padding, ld_alpha's shared length and the length-normalized
    # losses all matter.
    return Dataset.from_list(
        [
            {
                "prompt": text(2 + i % 3),
                "chosen": " " + text(2 + i % 4),
                "rejected": " " + text(1 + (3 * i) % 5),
            }
            for i in range(rows)
        ]
    )


def _llama_config(tie: bool = False, vocab: int = len(VOCAB)) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )


def _states(tie: bool = False, vocab: int = len(VOCAB)) -> tuple[dict, dict]:
    """Fresh random (policy, reference) weights; each trainer loads its own copies."""
    policy = LlamaForCausalLM(_llama_config(tie, vocab)).state_dict()
    reference = LlamaForCausalLM(_llama_config(tie, vocab)).state_dict()
    return policy, reference


def _model(state: dict, tie: bool = False, vocab: int = len(VOCAB)) -> LlamaForCausalLM:
    model = LlamaForCausalLM(_llama_config(tie, vocab))
    model.load_state_dict(state)
    return model


def _args(tmp_path: Path, config_cls: type = DPOConfig, **overrides) -> TrainingArguments:
    """A CPU ``config_cls`` (``DPOConfig`` or TRL's ``KTOConfig``) for one tiny run in ``tmp_path``."""
    settings = {
        "output_dir": str(tmp_path),
        "report_to": [],
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": BATCH,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "disable_tqdm": True,
        **overrides,
    }
    return config_cls(**settings)


def _one_batch(trainer: DPOTrainer) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """Loss, gradients and logged metrics of ``compute_loss`` on the first ``BATCH`` training examples."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    batch = trainer._prepare_inputs(batch)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def _assert_same(stock: tuple, fast: tuple, *, metric_keys_equal: bool = True, rtol: float = 1e-5) -> None:
    stock_loss, stock_grads, stock_metrics = stock
    fast_loss, fast_grads, fast_metrics = fast
    torch.testing.assert_close(fast_loss, stock_loss, rtol=rtol, atol=1e-7)
    assert set(fast_grads) == set(stock_grads) and stock_grads
    for name, g in stock_grads.items():
        # Entries near zero carry the absolute rounding of the whole reduction, hence the per-tensor atol.
        assert fast_grads[name].dtype == g.dtype, name
        torch.testing.assert_close(fast_grads[name], g, rtol=rtol, atol=rtol * float(g.abs().max()), msg=name)
    if metric_keys_equal:
        assert set(fast_metrics) == set(stock_metrics)
    for key, value in stock_metrics.items():
        # Rewards are differences of log-probs of size ~15, so their rounding is absolute, not relative.
        fast_value = fast_metrics[key]
        assert math.isclose(fast_value, value, rel_tol=rtol, abs_tol=rtol / 10), (key, fast_value, value)


def _stock_and_fast(
    tmp_path: Path, no_trl_head, build, policy: dict, reference: dict, *, settings=None, dataset=None
) -> list[tuple]:
    """One batch through the stock trainer, then through FastDPOTrainer with TRL's own head disabled."""
    dataset = _dataset() if dataset is None else dataset
    runs = []
    for cls in (DPOTrainer, FastDPOTrainer):
        if cls is FastDPOTrainer:
            no_trl_head()
        trainer = cls(
            model=build(policy),
            ref_model=build(reference),
            args=_args(tmp_path, **(settings or {})),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
        runs.append(_one_batch(trainer))
    return runs


@pytest.fixture
def no_trl_head(monkeypatch: pytest.MonkeyPatch):
    """Makes TRL's own fused log-prob head fail, to prove FastDPOTrainer's numbers come from fastdpo."""

    class Forbidden:
        @staticmethod
        def apply(*args, **kwargs):
            raise AssertionError("FastDPOTrainer called TRL's chunked log-prob head")

    def forbid() -> None:
        monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", Forbidden)

    return forbid


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_matches_stock_trainer(case: str, tmp_path: Path, no_trl_head) -> None:
    policy, reference = _states()
    dataset = _dataset(seed=len(case))
    settings = LOSS_CASES[case]
    stock = _one_batch(
        DPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path, **settings),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
    )
    no_trl_head()
    fast = _one_batch(
        FastDPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path, **settings),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
    )
    _assert_same(stock, fast)


# Every TRL 1.16 loss type, and gradient checkpointing, under TRL's bf16 autocast.
BF16_CASES = [*list(LOSS_CASES)[:15], "gradient_checkpointing"]
# Above the 8192 vocab columns per chunk of fastdpo's former torch backend, which rounded each chunk's
# product to bf16 before summing.
BIG_VOCAB = 9000


@pytest.mark.parametrize("case", BF16_CASES)
def test_bf16_autocast_matches_stock(case: str, tmp_path: Path, no_trl_head) -> None:
    """Under bf16 autocast the head casts inside and returns fp32 gradients, as TRL's: equal to rtol 1e-6."""
    policy, reference = _states(vocab=BIG_VOCAB)

    def build(state: dict) -> LlamaForCausalLM:
        return _model(state, vocab=BIG_VOCAB)

    dataset = _dataset(seed=len(case))
    settings = {**LOSS_CASES[case], "bf16": True}
    stock, fast = _stock_and_fast(
        tmp_path, no_trl_head, build, policy, reference, settings=settings, dataset=dataset
    )
    _assert_same(stock, fast, rtol=1e-6)
    if case == "sigmoid":
        # Negative control: without autocast the loss differs, so autocast was on.
        fp32 = FastDPOTrainer(
            model=build(policy),
            ref_model=build(reference),
            args=_args(tmp_path, **LOSS_CASES[case]),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
        assert abs(float(_one_batch(fp32)[0]) - float(stock[0])) > 1e-6


@pytest.mark.parametrize(
    "settings",
    [
        {"loss_type": "sigmoid"},
        {"loss_type": ["ipo", "bco_pair"], "loss_weights": [0.5, 1.0], "ld_alpha": 0.5},
        {"loss_type": "robust", "label_smoothing": 0.1, "bf16": True},
    ],
)
def test_wpo_matches_stock(settings: dict, tmp_path: Path, no_trl_head) -> None:
    """WPO (``use_weighting``): pair losses weighted by exp(mean(logp - log sum p^2)), as stock TRL."""
    policy, reference = _states(vocab=BIG_VOCAB)

    def build(state: dict) -> LlamaForCausalLM:
        return _model(state, vocab=BIG_VOCAB)

    stock, fast = _stock_and_fast(
        tmp_path, no_trl_head, build, policy, reference, settings={**settings, "use_weighting": True}
    )
    _assert_same(stock, fast, rtol=1e-6)
    unweighted = _one_batch(
        FastDPOTrainer(
            model=build(policy),
            ref_model=build(reference),
            args=_args(tmp_path, **settings),
            train_dataset=_dataset(),
            processing_class=_tokenizer(),
        )
    )
    assert abs(float(unweighted[0]) - float(fast[0])) > 1e-3 * abs(float(fast[0]))


def test_tied_embeddings(tmp_path: Path, no_trl_head) -> None:
    policy, reference = _states(tie=True)
    runs = _stock_and_fast(tmp_path, no_trl_head, lambda state: _model(state, tie=True), policy, reference)
    _assert_same(*runs)


def test_lora_reference_is_adapter_disabled(tmp_path: Path, no_trl_head) -> None:
    peft = pytest.importorskip("peft")
    policy, _ = _states()
    dataset = _dataset()
    # Random (not zero) B matrices, so the adapted policy differs from its adapter-free reference.
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    runs = []
    for cls in (DPOTrainer, FastDPOTrainer):
        if cls is FastDPOTrainer:
            no_trl_head()
        # TRL seeds before wrapping the model, so both trainers get the same adapter weights.
        trainer = cls(
            model=_model(policy),
            args=_args(tmp_path, loss_type="sigmoid"),
            train_dataset=dataset,
            processing_class=_tokenizer(),
            peft_config=lora,
        )
        assert trainer.ref_model is None
        runs.append(_one_batch(trainer))
    assert all("lora" in name for name in runs[1][1])
    assert abs(runs[1][2]["rewards/margins"]) > 1e-4
    _assert_same(*runs)


@pytest.mark.parametrize("arch", ["cohere_logit_scale", "gemma2_softcap"])
def test_logit_scale_and_softcap(arch: str, tmp_path: Path, no_trl_head) -> None:
    """The head transforms TRL reads from the config: Cohere's ``logit_scale``, Gemma-2's final softcap."""
    import transformers

    common = {
        "vocab_size": len(VOCAB),
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": None,
        "eos_token_id": 1,
    }
    if arch == "cohere_logit_scale":
        config = transformers.CohereConfig(**common, logit_scale=0.5)
        model_class = transformers.CohereForCausalLM
    else:
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=2.0)
        model_class = transformers.Gemma2ForCausalLM
    policy, reference = model_class(config).state_dict(), model_class(config).state_dict()

    def model(state: dict) -> torch.nn.Module:
        m = model_class(config)
        m.load_state_dict(state)
        return m

    runs = _stock_and_fast(tmp_path, no_trl_head, model, policy, reference)
    _assert_same(*runs)


def test_moe_router_aux_loss(tmp_path: Path, no_trl_head) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        output_router_logits=True,
        router_aux_loss_coef=0.05,
    )
    policy, reference = MixtralForCausalLM(config).state_dict(), MixtralForCausalLM(config).state_dict()

    def model(state: dict) -> MixtralForCausalLM:
        m = MixtralForCausalLM(config)
        m.load_state_dict(state)
        return m

    runs = _stock_and_fast(tmp_path, no_trl_head, model, policy, reference)
    assert runs[1][2]["aux_loss"] > 0
    _assert_same(*runs)


def test_precomputed_reference_matches_inline_reference(tmp_path: Path, no_trl_head) -> None:
    policy, reference = _states()
    dataset = _dataset()
    stock = _one_batch(
        DPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
    )
    no_trl_head()
    trainer = FastDPOTrainer(
        model=_model(policy),
        ref_model=_model(reference),
        args=_args(tmp_path, precompute_ref_log_probs=True),
        train_dataset=dataset,
        processing_class=_tokenizer(),
    )
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(trainer.train_dataset.column_names)
    _assert_same(stock, _one_batch(trainer))


def test_rpo_alpha_equals_stock_sft_term(tmp_path: Path) -> None:
    """RPO's NLL is TRL's ``sft`` loss: ``rpo_alpha=a`` equals stock ``["sigmoid", "sft"]`` at ``[1, a]``."""
    policy, reference = _states()
    dataset = _dataset()
    stock = _one_batch(
        DPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
    )
    fast = _one_batch(
        FastDPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path),
            train_dataset=dataset,
            processing_class=_tokenizer(),
            rpo_alpha=0.5,
        )
    )
    _assert_same(stock, fast, metric_keys_equal=False)
    assert set(fast[2]) - set(stock[2]) == {"nll_loss"}
    sft_only = _one_batch(
        DPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path, loss_type="sft"),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
    )
    assert math.isclose(fast[2]["nll_loss"], float(sft_only[0]), rel_tol=1e-5)


def test_reference_free_against_float64(tmp_path: Path) -> None:
    policy, reference = _states()
    trainer = FastDPOTrainer(
        model=_model(policy),
        ref_model=_model(reference),
        args=_args(tmp_path, beta=0.2),
        train_dataset=_dataset(),
        processing_class=_tokenizer(),
        reference_free=True,
    )
    assert trainer.ref_model is None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    loss, _, metrics = _one_batch(trainer)

    # Independent float64 reference: full logits, log-softmax, gather, sum over the completion tokens.
    model64 = _model(policy).double()
    with torch.no_grad():
        logits = model64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    seq = (logp * batch["completion_mask"][:, 1:]).sum(-1)
    chosen, rejected = seq.chunk(2)
    expected = -torch.nn.functional.logsigmoid(0.2 * (chosen - rejected)).mean()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
    assert math.isclose(metrics["rewards/chosen"], float(0.2 * chosen.mean()), rel_tol=1e-5)
    assert math.isclose(metrics["logps/rejected"], float(rejected.mean()), rel_tol=1e-5)


def test_triton_backend_under_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_trl_head
) -> None:
    if not os.path.exists("/dev/nvidiactl"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    policy, reference = _states()
    dataset = _dataset()
    stock = _one_batch(
        DPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path, loss_type="robust", label_smoothing=0.1),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
    )
    no_trl_head()
    monkeypatch.setenv("FASTDPO_BACKEND", "triton")
    calls = []
    fold_forward = head_triton.fold_forward
    monkeypatch.setattr(head_triton, "fold_forward", lambda *a, **k: calls.append(1) or fold_forward(*a, **k))
    fast = _one_batch(
        FastDPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path, loss_type="robust", label_smoothing=0.1),
            train_dataset=dataset,
            processing_class=_tokenizer(),
        )
    )
    assert len(calls) == 2  # the reference and the policy log-probs, one chunk each
    _assert_same(stock, fast)


def test_without_logit_metrics(tmp_path: Path) -> None:
    policy, reference = _states()
    dataset = _dataset()
    runs = []
    for cls, extra in ((DPOTrainer, {}), (FastDPOTrainer, {"logit_metrics": False})):
        trainer = cls(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path),
            train_dataset=dataset,
            processing_class=_tokenizer(),
            **extra,
        )
        runs.append(_one_batch(trainer))
    stock, fast = runs
    dropped = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    assert set(stock[2]) - set(fast[2]) == dropped
    for key in dropped:
        stock[2].pop(key)
    _assert_same(stock, fast)


def test_version_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_trl_version("1.16.0")
    check_trl_version("1.16.7")
    for bad in ("1.17.0", "0.29.1", "2.0.0.dev0", "unknown"):
        with pytest.raises(RuntimeError, match=rf"1\.16.*{bad}"):
            check_trl_version(bad)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    policy, reference = _states()
    with pytest.raises(RuntimeError, match=r"supports trl >=1\.16,<1\.17.*trl 1\.17\.0 is installed"):
        FastDPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path),
            train_dataset=_dataset(),
            processing_class=_tokenizer(),
        )


@pytest.mark.parametrize(
    ("settings", "extra", "match"),
    [
        ({"loss_type": "simpo"}, {}, "unknown loss_type"),
        ({}, {"backend": "cuda"}, "backend must be"),
        ({}, {"impl": "tiled"}, "impl must be"),
    ],
)
def test_rejects_unsupported_settings(tmp_path: Path, settings: dict, extra: dict, match: str) -> None:
    policy, reference = _states()
    with pytest.raises(ValueError, match=match):
        FastDPOTrainer(
            model=_model(policy),
            ref_model=_model(reference),
            args=_args(tmp_path, **settings),
            train_dataset=_dataset(),
            processing_class=_tokenizer(),
            **extra,
        )


def test_full_determinism_picks_the_chunked_impl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy, reference = _states()
    # full_determinism flips process-wide switches; restore them after the test.
    for name in ("CUDA_LAUNCH_BLOCKING", "CUBLAS_WORKSPACE_CONFIG", "ASCEND_LAUNCH_BLOCKING",
                 "HCCL_DETERMINISTIC", "FLASH_ATTENTION_DETERMINISTIC"):  # fmt: skip
        monkeypatch.setenv(name, os.environ.get(name, ""))
    deterministic = torch.are_deterministic_algorithms_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        impls = []
        for full, impl in ((True, None), (True, "fused"), (False, None)):
            trainer = FastDPOTrainer(
                model=_model(policy),
                ref_model=_model(reference),
                args=_args(tmp_path, full_determinism=full),
                train_dataset=_dataset(),
                processing_class=_tokenizer(),
                impl=impl,
            )
            impls.append(trainer.fastdpo_loss.spec.head.impl)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
    assert impls == ["chunked", "fused", None]


def _train_two_steps(cls, tmp_path: Path, states: tuple[dict, dict], data, args, keys: set[str]):
    """Trains a ``cls`` two logged steps on ``data(rows, seed)`` with ``args(tmp_path, ...)``; checks each
    logged step has a finite loss and ``keys``, and that the head moved. Returns the trainer and model."""
    policy, reference = states
    model = _model(policy)
    trainer = cls(
        model=model,
        ref_model=_model(reference),
        args=args(tmp_path, max_steps=2, logging_steps=1, learning_rate=1e-2),
        train_dataset=data(),
        eval_dataset=data(rows=4, seed=1),
        processing_class=_tokenizer(),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert math.isfinite(entry["loss"]) and keys <= set(entry)
    assert not torch.equal(model.lm_head.weight.detach(), policy["lm_head.weight"])
    return trainer, model


def test_train_two_steps(tmp_path: Path, no_trl_head) -> None:
    no_trl_head()
    keys = {"rewards/margins", "entropy", "logps/chosen"}
    trainer, model = _train_two_steps(FastDPOTrainer, tmp_path, _states(), _dataset, _args, keys)
    evaluation = trainer.evaluate()
    assert math.isfinite(evaluation["eval_loss"]) and "eval_rewards/accuracies" in evaluation
    # Generation still runs the model's own forward.
    out = model.generate(torch.tensor([[2, 3, 4]]), max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 5)


_DDP_WORKER = r"""
import json, sys, tempfile, warnings
warnings.filterwarnings("ignore")
import torch, torch.distributed as dist
from transformers import LlamaForCausalLM, TrainerCallback
from trl import DPOConfig
sys.path.insert(0, sys.argv[2])
from test_trl_integration import _dataset, _llama_config, _tokenizer
from fastdpo.integrations.trl import FastDPOTrainer

torch.manual_seed(0)
policy, reference = (LlamaForCausalLM(_llama_config()).state_dict() for _ in range(2))


class Spread(TrainerCallback):
    # Largest gradient difference across ranks right before the optimizer step, relative to the gradient.
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(every, flat)
        self.value = max((e - flat).abs().max().item() for e in every) / flat.abs().max().item()


class Unwrapped(FastDPOTrainer):
    # What Liger's DPO path does inside TRL (trl#7245): the loss runs on the unwrapped module.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(self.accelerator.unwrap_model(model), inputs, return_outputs)


result = {}
for name, cls, find_unused in [("find_unused", FastDPOTrainer, True), ("static", FastDPOTrainer, False),
                               ("unwrapped", Unwrapped, True)]:
    model, ref = LlamaForCausalLM(_llama_config()), LlamaForCausalLM(_llama_config())
    model.load_state_dict(policy)
    ref.load_state_dict(reference)
    spread = Spread()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False,
                     per_device_train_batch_size=2, gradient_checkpointing=False, max_steps=1,
                     save_strategy="no", ddp_backend="gloo", ddp_find_unused_parameters=find_unused,
                     disable_tqdm=True)
    cls(model=model, ref_model=ref, args=args, train_dataset=_dataset(), processing_class=_tokenizer(),
        callbacks=[spread]).train()
    result[name] = spread.value
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(result, f)
"""


def test_ddp_keeps_gradient_sync(tmp_path: Path) -> None:
    """Two gloo ranks with different data: gradients must agree after backward, as DDP all-reduced them.

    The ``unwrapped`` control runs the same loss on the unwrapped module and must disagree, which shows
    the check can fail.
    """
    worker = tmp_path / "ddp_worker.py"
    worker.write_text(_DDP_WORKER)
    out = tmp_path / "spread.json"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    env.pop("FASTDPO_BACKEND", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*cmd, str(worker), str(out), str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spread = json.loads(out.read_text())
    assert spread["find_unused"] < 1e-6
    assert spread["static"] < 1e-6
    assert spread["unwrapped"] > 1e-3


def test_examples_run(tmp_path: Path) -> None:
    """Both examples, as scripts, in one interpreter (imports dominate their run time)."""
    runs = [
        [str(REPO / "examples" / "plain_pytorch_loop.py"), "--steps", "2"],
        [str(REPO / "examples" / "trl_drop_in.py"), "--steps", "2", "--output-dir", str(tmp_path)],
    ]
    runner = "import runpy, sys\nfor sys.argv in {!r}:\n    runpy.run_path(sys.argv[0], run_name='__main__')"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FASTDPO_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", runner.format(runs)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 2: loss") == 2, proc.stdout
    # The plain loop ends by scoring one batch with both losses on the trained policy.
    naive, fused = (float(x) for x in re.findall(r"(?:naive|fused) loss ([-\d.]+)", proc.stdout))
    assert math.isclose(naive, fused, rel_tol=1e-5)
