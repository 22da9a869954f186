"""Swapping ``trl.DPOTrainer`` for fastdpo's ``FastDPOTrainer``: same arguments, fused kernels underneath.

The swap is the class name; the config, datasets, reference handling and logged metrics stay TRL's::

    from trl import DPOConfig, DPOTrainer
    from fastdpo.integrations.trl import FastDPOTrainer

    trainer = FastDPOTrainer(                       # was: DPOTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        args=DPOConfig(output_dir="out", loss_type="sigmoid", beta=0.1),
        train_dataset=load_dataset("trl-lib/ultrafeedback_binarized", split="train"),
    )
    trainer.train()

This script runs the same on a tiny random Llama and an in-memory dataset, so it needs no download and
finishes on CPU in seconds::

    python examples/trl_drop_in.py            # FastDPOTrainer
    python examples/trl_drop_in.py --stock    # trl.DPOTrainer, for comparison
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import DPOConfig, DPOTrainer

from fastdpo.integrations.trl import FastDPOTrainer

WORDS = [f"w{i}" for i in range(60)]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``WORDS`` with pad and EOS tokens."""
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def build_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config)


def build_dataset(num_pairs: int, seed: int) -> Dataset:
    """TRL's standard preference format: text ``prompt``, ``chosen`` and ``rejected`` columns."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    rows = [
        {
            "prompt": text(rng.randint(3, 8)),
            "chosen": " " + text(rng.randint(2, 8)),
            "rejected": " " + text(rng.randint(2, 8)),
        }
        for _ in range(num_pairs)
    ]
    return Dataset.from_list(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output-dir", default=None, help="trainer output directory (default: a temp dir)")
    parser.add_argument("--loss-type", default="sigmoid")
    parser.add_argument("--stock", action="store_true", help="train with trl.DPOTrainer instead")
    opts = parser.parse_args()

    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=0)
    # A full fine-tune needs a reference model: here a frozen copy of the initial policy. (With a model
    # id string, TRL loads it itself; with peft_config, the policy with adapters disabled is the reference.)
    ref_model = build_model(len(tokenizer), seed=0)
    args = DPOConfig(
        output_dir=opts.output_dir or tempfile.mkdtemp(prefix="fastdpo-trl-"),
        loss_type=opts.loss_type,
        max_steps=opts.steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer_cls = DPOTrainer if opts.stock else FastDPOTrainer
    trainer = trainer_cls(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=build_dataset(64, seed=0),
        processing_class=tokenizer,
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(
                f"step {entry['step']}: loss {entry['loss']:.5f} margin {entry['rewards/margins']:.5f} "
                f"accuracy {entry['rewards/accuracies']:.2f}"
            )


if __name__ == "__main__":
    main()
