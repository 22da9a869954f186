"""``fastdpo demo``: DPO fixes a habit that SFT taught a tiny model, end to end on a CPU in a few minutes.

The task is two-number addition (``"38+45="`` -> ``"83"``), so every answer can be checked. Step by step:

1. Build a small Llama (random init) and a character-level tokenizer with a chat template, locally.
2. SFT it on sloppy data: on problems with a carry, most answers (60%) drop the carry
   (``"38+45="`` -> ``"73"``), so the SFT model picks up the habit.
3. DPO on preference pairs over the SFT problems: chosen is the right answer, rejected the near miss
   (the dropped carry; on problems without a carry, a spurious one). This runs ``Trainer``, the code path of
   ``fastdpo train``, on JSONL files and a saved model: packing, precomputed reference log-probs, fused loss.
4. Report on held-out problems that neither SFT nor DPO saw: reward accuracy (TRL's definition, the
   fraction of pairs with ``beta * (log-ratio chosen) > beta * (log-ratio rejected)``) and mean margin,
   before and after DPO, plus greedy answers and sample generations.

``--loss kto`` replaces step 3 by KTO on unpaired thumbs-up / thumbs-down feedback made from the same
task: each training problem gets one answer, the right one (desirable) or the near miss (undesirable), in
turn. The held-out report is then the gap between the mean rewards of desirable and undesirable answers.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fastdpo.train import TrainConfig, Trainer

__all__ = [
    "DEMO_LOSSES",
    "DemoResult",
    "addition_feedback",
    "addition_pairs",
    "build_model",
    "build_tokenizer",
    "demo_train_config",
    "run_demo",
]

_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
_CHARS = "0123456789+= "
DEMO_LOSSES = ("dpo", "kto")


@dataclass
class DemoResult:
    """Held-out numbers of one demo run.

    Attributes:
        accuracy_before: Reward accuracy before DPO (0: the policy is still the reference, all rewards are 0);
            NaN for KTO, which scores unpaired answers.
        accuracy_after: Reward accuracy after DPO (NaN for KTO).
        margin_before: Mean reward margin ``chosen - rejected`` before DPO; for KTO the gap between the
            mean rewards of desirable and undesirable answers (TRL's KTO ``rewards/margins``).
        margin_after: The same after training.
        answers_before: Fraction of held-out problems the SFT model answers right, greedily.
        answers_after: The same after DPO.
        summary: The demo's last printed line.
    """

    accuracy_before: float
    accuracy_after: float
    margin_before: float
    margin_after: float
    answers_before: float
    answers_after: float
    summary: str


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast`` for arithmetic with a chat template, built locally."""
    vocab = {token: i for i, token in enumerate(_SPECIAL + list(_CHARS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialized small ``LlamaForCausalLM`` (4 heads, tied embeddings) for ``tokenizer``."""
    if hidden_size % 4 or hidden_size < 8:
        raise ValueError(f"hidden_size: expected a multiple of 4 heads with head_dim >= 2, got {hidden_size}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _has_carry(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def _near_miss(a: int, b: int) -> int:
    """The tempting wrong answer: the carry dropped, or a spurious carry where there is none."""
    return a + b - 10 if _has_carry(a, b) else a + b + 10


def _row(a: int, b: int, answer: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(answer)}]


def addition_pairs(problems: list[tuple[int, int]]) -> list[dict]:
    """Conversational preference rows: chosen is ``a+b``, rejected the near miss (carry dropped or added)."""
    return [
        {
            "prompt": [{"role": "user", "content": f"{a}+{b}="}],
            "chosen": [{"role": "assistant", "content": str(a + b)}],
            "rejected": [{"role": "assistant", "content": str(_near_miss(a, b))}],
        }
        for a, b in problems
    ]


def addition_feedback(problems: list[tuple[int, int]], *, both: bool = False) -> list[dict]:
    """Unpaired (KTO) rows: problem ``i`` gets the right answer (``label`` True) when ``i`` is even, else
    the near miss (False); with ``both``, every problem gets both rows."""
    rows = []
    for i, (a, b) in enumerate(problems):
        for desirable in (True, False) if both else (i % 2 == 0,):
            answer = a + b if desirable else _near_miss(a, b)
            prompt, completion = _row(a, b, answer)
            rows.append({"prompt": [prompt], "completion": [completion], "label": desirable})
    return rows


def _encode(tokenizer: PreTrainedTokenizerFast, a: int, b: int, answer: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids with EOS) as the chat template renders them, like ``fastdpo.data`` does."""
    messages = _row(a, b, answer)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    return prompt_ids, full_ids[len(prompt_ids) :]


def _padded(
    tokenizer: PreTrainedTokenizerFast, examples: list[tuple[list[int], list[int]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answer tokens only)."""
    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), tokenizer.pad_token_id)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    labels = torch.full((len(examples), width), -100)
    for i, (prompt, answer) in enumerate(examples):
        n = len(prompt) + len(answer)
        ids[i, :n] = torch.tensor(prompt + answer)
        mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(answer)
    return ids, mask, labels


def _sft(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[tuple[int, int]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    slip_rate: float,
    rng: random.Random,
    echo: Callable[[str], None],
) -> None:
    """Next-token SFT (AdamW, warmup, cosine decay); carry answers drop the carry with prob. ``slip_rate``."""
    right = [_encode(tokenizer, a, b, a + b) for a, b in problems]
    slipped = [_encode(tokenizer, a, b, _near_miss(a, b)) for a, b in problems]
    carries = [_has_carry(a, b) for a, b in problems]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    # A decay to a small floor matters here: at a constant rate the last steps' noise costs answers.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.05 + 0.475 * (1 + math.cos(math.pi * min(1.0, s / steps)))),
    )
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        picks = rng.sample(range(len(problems)), min(batch_size, len(problems)))
        batch = [slipped[i] if carries[i] and rng.random() < slip_rate else right[i] for i in picks]
        ids, mask, labels = _padded(tokenizer, batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, steps // 4) == 0 or step == steps:
            echo(f"  SFT step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")


@torch.no_grad()
def _answers_right(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, problems: list[tuple[int, int]]
) -> float:
    """Fraction of problems whose greedy answer is exactly ``a+b`` then EOS (teacher forcing equals greedy
    decoding here: every predicted token is checked while the prefix is still right)."""
    examples = [_encode(tokenizer, a, b, a + b) for a, b in problems]
    ids, mask, labels = _padded(tokenizer, examples)
    model.eval()
    predicted = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    right = ((predicted == targets) | (targets == -100)).all(dim=1)
    return right.float().mean().item()


@torch.no_grad()
def _generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, a: int, b: int) -> str:
    prompt, _ = _encode(tokenizer, a, b, 0)
    model.eval()
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True).strip()


@contextmanager
def _quiet_library_bars() -> Iterator[None]:
    """Hides the per-file bars of datasets and transformers (saving, loading, tokenizing a few KB)."""
    import datasets
    import transformers.utils.logging as hf_logging

    datasets_on, hf_on = not datasets.are_progress_bars_disabled(), hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _new_run_dir() -> Path:
    """A new folder ``runs/demo-<UTC time>-<random>``; the random part keeps demos started together apart."""
    Path("runs").mkdir(exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=time.strftime("demo-%Y%m%d-%H%M%S-", time.gmtime()), dir="runs"))


def demo_train_config(
    workdir: str | Path,
    *,
    beta: float = 0.5,
    lr: float = 1e-4,
    max_steps: int = 60,
    tokens_per_step: int = 1024,
    seed: int = 0,
    progress: bool = True,
    loss: str = "dpo",
) -> TrainConfig:
    """The DPO (or KTO) step's ``TrainConfig`` over the files the demo writes to ``workdir``.

    With the defaults and ``workdir="runs/demo"`` it equals ``configs/demo.yaml``, so after
    ``fastdpo demo --workdir runs/demo``, ``fastdpo train -c configs/demo.yaml`` repeats the DPO step;
    likewise ``loss="kto"`` with ``workdir="runs/demo-kto"`` and ``configs/kto.yaml``.
    """
    root = Path(workdir)
    kto = loss == "kto"
    return TrainConfig(
        model=str(root / "sft"),
        data=str(root / ("feedback.jsonl" if kto else "train.jsonl")),
        eval_data=str(root / ("heldout_feedback.jsonl" if kto else "heldout.jsonl")),
        output_dir=str(root / loss),
        loss_type="kto" if kto else "sigmoid",
        beta=beta,
        lr=lr,
        max_steps=max_steps,
        warmup_ratio=0.1,
        max_length=32,
        max_prompt_length=24,
        tokens_per_step=tokens_per_step,
        device="cpu",
        dtype="fp32",
        backend="torch",
        log_every=max(1, max_steps // 4),
        save_every=0,
        resume=False,
        tensorboard=False,
        progress=progress,
        seed=seed,
    )


def run_demo(
    *,
    max_operand: int = 50,
    heldout_fraction: float = 0.2,
    slip_rate: float = 0.6,
    hidden_size: int = 64,
    num_layers: int = 2,
    sft_steps: int = 1200,
    sft_batch_size: int = 128,
    sft_lr: float = 3e-3,
    dpo_steps: int = 60,
    dpo_lr: float = 1e-4,
    beta: float = 0.5,
    tokens_per_step: int = 1024,
    seed: int = 0,
    workdir: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    loss: str = "dpo",
) -> DemoResult:
    """Runs the demo and prints its story, ending in ``held-out reward accuracy x -> y, mean margin a -> b``.

    SFT then DPO of a small model on addition, every step on CPU; DPO goes through ``Trainer``.

    Args:
        max_operand: Problems are ``a+b`` with ``0 <= a, b < max_operand``.
        heldout_fraction: Fraction of the problems held out from SFT and DPO for evaluation.
        slip_rate: Probability that an SFT answer to a carry problem drops the carry.
        hidden_size: Model width (4 heads).
        num_layers: Decoder layers.
        sft_steps: SFT optimizer steps.
        sft_batch_size: Problems per SFT step.
        sft_lr: SFT peak learning rate (AdamW, short warmup, cosine decay).
        dpo_steps: DPO optimizer steps (``max_steps`` of the trainer).
        dpo_lr: DPO peak learning rate (warmup, then cosine decay).
        beta: DPO beta.
        tokens_per_step: Packed tokens per DPO step.
        seed: Seed of the problems, the model init, SFT sampling and the trainer.
        workdir: Folder for the saved SFT model, the JSONL pairs and the DPO run (final model in
            ``dpo/final``); if None, a new ``runs/demo-<UTC time>-<random>`` folder under the current one.
        progress: Show the trainer's progress bars.
        echo: Where the story lines go.
        loss: ``"dpo"`` (preference pairs) or ``"kto"`` (unpaired feedback; ``dpo_*`` and ``beta`` then
            apply to the KTO step, and the run goes to ``kto`` instead of ``dpo``). The KTO demo ends in
            ``held-out desirable vs undesirable reward gap a -> b``.

    Returns:
        The held-out numbers and the summary line.
    """
    if not 2 <= max_operand <= 1000:
        raise ValueError(f"max_operand: expected an int in [2, 1000], got {max_operand}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction: expected a float in (0, 1), got {heldout_fraction}")
    if not 0 <= slip_rate <= 1:
        raise ValueError(f"slip_rate: expected a float in [0, 1], got {slip_rate}")
    if loss not in DEMO_LOSSES:
        raise ValueError(f"loss: expected one of {list(DEMO_LOSSES)}, got {loss!r}")
    method = loss.upper()
    # Made first, so that a folder that cannot be written fails before minutes of SFT.
    root = Path(workdir) if workdir is not None else _new_run_dir()
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rng = random.Random(seed)
    problems = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    rng.shuffle(problems)
    num_heldout = max(1, round(heldout_fraction * len(problems)))
    heldout, seen = problems[:num_heldout], problems[num_heldout:]

    tokenizer = build_tokenizer()
    sft_model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    n_params = sum(p.numel() for p in sft_model.parameters())
    echo(f"fastdpo demo: addition with a {num_layers}-layer Llama ({n_params / 1e3:.0f}k parameters), on CPU")
    echo(
        f"1) SFT on {len(seen)} problems; {slip_rate:.0%} of the answers to carry problems drop the carry "
        f"({len(heldout)} problems held out)"
    )
    _sft(
        sft_model,
        tokenizer,
        seen,
        steps=sft_steps,
        batch_size=sft_batch_size,
        lr=sft_lr,
        slip_rate=slip_rate,
        rng=rng,
        echo=echo,
    )
    answers_before = _answers_right(sft_model, tokenizer, heldout)
    samples_before: dict[tuple[int, int], str] = {}
    for a, b in heldout:
        answer = _generate(sft_model, tokenizer, a, b)
        if answer != str(a + b):
            samples_before[(a, b)] = answer
        if len(samples_before) == 3:
            break

    with _quiet_library_bars():
        sft_model.save_pretrained(root / "sft")
        tokenizer.save_pretrained(root / "sft")
        if loss == "kto":
            _write_jsonl(root / "feedback.jsonl", addition_feedback(seen))
            _write_jsonl(root / "heldout_feedback.jsonl", addition_feedback(heldout, both=True))
        else:
            _write_jsonl(root / "train.jsonl", addition_pairs(seen))
            _write_jsonl(root / "heldout.jsonl", addition_pairs(heldout))
        config = demo_train_config(
            root,
            beta=beta,
            lr=dpo_lr,
            max_steps=dpo_steps,
            tokens_per_step=tokens_per_step,
            seed=seed,
            progress=progress,
            loss=loss,
        )
        data = (
            f"{len(seen)} unpaired answers (right: desirable, near miss: undesirable, in turn)"
            if loss == "kto"
            else f"{len(seen)} pairs (right answer vs near miss)"
        )
        echo(
            f"2) {method} with the packed trainer (fastdpo train's code path): {data}, {dpo_steps} steps "
            f"of <= {tokens_per_step} tokens, beta {beta}"
        )
        trainer = Trainer(config)
        before = trainer.evaluate()
        after = trainer.train()["eval"]
        answers_after = _answers_right(trainer.model, tokenizer, heldout)
        samples_after = {p: _generate(trainer.model, tokenizer, *p) for p in samples_before}

    echo(f"3) {len(heldout)} held-out problems, unseen by SFT and {method}")
    echo("  samples: the first held-out problems the SFT model gets wrong, greedy generation")
    for (a, b), answer in samples_before.items():
        after_answer = samples_after[(a, b)]
        echo(
            f"  {a}+{b}=  before {method}: {answer:>4}   after {method}: {after_answer:>4}   (right: {a + b})"
        )
    echo(f"  greedy answers right: {answers_before:.2f} -> {answers_after:.2f}")
    won = "no pair counts as won" if loss == "dpo" else "the desirable vs undesirable gap starts at 0"
    echo(f"  before {method} the policy is its own reference: every reward is 0, so {won}")
    echo(f"  total time {time.perf_counter() - start:.0f} s")
    data_kind = "feedback" if loss == "kto" else "pairs"
    echo(
        f"  kept in {root}: the SFT model, the {data_kind}, the {method} run; final model: "
        f"{root / loss / 'final'}"
    )
    m0, m1 = before["rewards/margins"], after["rewards/margins"]
    if loss == "kto":
        acc0 = acc1 = math.nan
        summary = f"held-out desirable vs undesirable reward gap {m0:.3f} -> {m1:.3f}"
    else:
        acc0, acc1 = before["rewards/accuracies"], after["rewards/accuracies"]
        summary = f"held-out reward accuracy {acc0:.2f} -> {acc1:.2f}, mean margin {m0:.3f} -> {m1:.3f}"
    echo(summary)
    return DemoResult(acc0, acc1, m0, m1, answers_before, answers_after, summary)
