"""Trainer benchmark: a DPO step of a Llama-3.1-8B-shaped model (random weights, LoRA), fastdpo vs TRL.

Modes (each configuration runs in a fresh subprocess, so an out-of-memory leaves the next one clean):
  max-context    the longest chosen+rejected tokens per optimizer step that trains without OOM
  throughput     tokens/s and model FLOPs utilization at equal settings
  shared-prompt  fastdpo with and without shared-prompt packing on a long-prompt, short-response workload
  mechanisms     fastdpo's step time with each long-context mechanism on, against checkpointing alone

GPU:  python benchmarks/bench_trainer.py --mode max-context --csv out/ctx.csv
      python benchmarks/bench_trainer.py --mode throughput --tokens 16384 --csv out/tps.csv
CPU:  python benchmarks/bench_trainer.py --tiny     (harness check: a tiny model, a few hundred tokens)
      python benchmarks/bench_trainer.py --small --mode mechanisms --tokens 8192 --steps 4   (CPU timings)

Tokens per step count every packed token (prompt included) of the pairs in one optimizer step. Pairs are
random words of a word-level tokenizer whose vocabulary matches the model's; no download is needed.

``--long-context`` (the default in max-context mode) runs fastdpo with the memory settings of
``configs/llama3-8b-long.yaml`` (offloaded layer checkpoints, tiled MLP, lean norms, fused AdamW, LoRA on
every projection, reference precomputed), the same ones ``fastdpo plan`` plans there, so a GPU run measures
what the plan says; ``--plan`` adds that plan's peak to each fastdpo row (``planned_gb``, a meta-device run
on this machine's CPU). Both trainers put LoRA on the same modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from common import write_csv

LONG_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "llama3-8b-long.yaml"
)
# What --long-context takes from LONG_CONFIG: the memory settings, not the run's data, model or schedule.
LONG_KEYS = (
    "gradient_checkpointing", "offload_checkpoints", "tiled_mlp", "lean_norms", "tile_tokens", "fused_adamw",
    "attn_backend", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "reference",
)  # fmt: skip
# --mode mechanisms: the step time each long-context mechanism adds to checkpointing alone (fastdpo only).
_CKPT = {"gradient_checkpointing": True}
MECHANISMS = {
    "checkpointing": _CKPT,
    "+ offload_checkpoints": {**_CKPT, "offload_checkpoints": True},
    "+ tiled_mlp": {**_CKPT, "tiled_mlp": True},
    "+ lean_norms": {**_CKPT, "lean_norms": True},
    "+ all three": {**_CKPT, "offload_checkpoints": True, "tiled_mlp": True, "lean_norms": True},
}
LLAMA31_8B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256)
SMALL = dict(hidden=512, layers=4, heads=8, kv_heads=4, intermediate=1376, vocab=8192)  # CPU timings
TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512)
H100_BF16_DENSE_TFLOPS = 989.0


def build_tokenizer(vocab: int):
    """A whitespace word-level tokenizer with exactly ``vocab`` entries (words ``w0``.. plus specials)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(vocab - len(specials))])}
    core = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def build_model(shape: dict, device: str, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=1 << 20,
        rope_theta=500000.0,
    )
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def write_pairs(path: str, vocab: int, pairs: int, prompt_len: int, response_len: int, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    n_words = vocab - 4

    def text(n: int) -> str:
        return " ".join(f"w{rng.randrange(n_words)}" for _ in range(n))

    with open(path, "w") as f:
        for _ in range(pairs):
            row = dict(prompt=text(prompt_len), chosen=text(response_len), rejected=text(response_len))
            f.write(json.dumps(row) + "\n")


def _flops_per_token(model, lora: bool) -> float:
    """Matmul FLOPs per trained token: policy fwd + bwd (dX only under LoRA) plus the reference forward."""
    n = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    return (2 + (2 if lora else 4) + 2) * n


def run_fastdpo(args, shape, tokens: int, prompt_len: int, response_len: int, shared_prompt: bool) -> dict:
    import torch

    from fastdpo.train import TrainConfig, Trainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = build_tokenizer(shape["vocab"])
    model = build_model(shape, device, dtype)
    pair_tokens = (prompt_len + 2 * response_len + 1) if shared_prompt else 2 * (prompt_len + response_len)
    pairs_per_step = max(1, tokens // pair_tokens)
    work = tempfile.mkdtemp()
    data = os.path.join(work, "pairs.jsonl")
    write_pairs(data, shape["vocab"], pairs_per_step * (args.steps + 1), prompt_len, response_len)
    options = {**(long_context_options(device) if args.long_context else {}), **args.options}
    cfg = TrainConfig(
        model="injected",
        data=data,
        output_dir=os.path.join(work, "run"),
        max_length=prompt_len + response_len + 2,
        max_prompt_length=prompt_len + 1,
        shared_prompt=shared_prompt,
        tokens_per_step=max(tokens, 2 * (prompt_len + response_len + 2)),
        tokens_per_optimizer_step=max(tokens, 2 * (prompt_len + response_len + 2)),
        lora_r=16,
        lora_alpha=32,
        reference="adapter",
        gradient_checkpointing=True,
        offload_activations=args.offload,
        attn_backend="flex" if device == "cuda" else "sdpa",
        max_steps=args.steps,
        save_every=0,
        save_model=False,
        tensorboard=False,
        progress=False,
        log_every=1,
        lr=1e-5,
    )
    cfg = dataclasses.replace(cfg, **options)
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    trainer.train(stop_after=1)  # warm-up step: compilation, autotuning
    if device == "cuda":
        torch.cuda.synchronize()
    start, tokens_before = time.perf_counter(), trainer.num_tokens
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tps = (trainer.num_tokens - tokens_before) / elapsed
    row = dict(tokens_per_s=round(tps, 1), step_s=round(elapsed / max(1, args.steps - 1), 3))
    if device == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["mfu"] = round(tps * _flops_per_token(trainer.model, True) / (H100_BF16_DENSE_TFLOPS * 1e12), 4)
    if args.plan:
        from fastdpo.planner.api import plan_memory

        planned = plan_memory(cfg, model_config=model.config, device="cuda" if device == "cuda" else "cpu")
        row["planned_gb"] = round(planned.peak_bytes / 2**30, 3)
    return row


def long_context_options(device: str) -> dict:
    """LONG_CONFIG's memory settings; off CUDA, whose flash-attn is absent, the packed torch attention."""
    from fastdpo.train.config import read_yaml

    options = {k: v for k, v in read_yaml(LONG_CONFIG).items() if k in LONG_KEYS}
    if device != "cuda":
        options["attn_backend"] = "packed"
    return options


def run_trl(args, shape, tokens: int, prompt_len: int, response_len: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tok = build_tokenizer(shape["vocab"])
    model = build_model(shape, device, dtype)
    work = tempfile.mkdtemp()
    data = os.path.join(work, "pairs.jsonl")
    seq = prompt_len + response_len
    batch = max(1, tokens // (2 * seq))
    write_pairs(data, shape["vocab"], batch * (args.steps + 1), prompt_len, response_len)
    ds = Dataset.from_json(data)
    config = DPOConfig(
        output_dir=os.path.join(work, "trl"),
        per_device_train_batch_size=batch,
        max_length=seq + 2,
        gradient_checkpointing=True,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        max_steps=args.steps,
        learning_rate=1e-5,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
    )
    from fastdpo.train import TrainConfig

    # fastdpo's LoRA modules: the long-context file's, else TrainConfig's default.
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lora_target_modules")
    targets = (
        long_context_options(device)["lora_target_modules"] if args.long_context else field.default_factory()
    )
    peft = LoraConfig(r=16, lora_alpha=32, target_modules=list(targets))
    trainer = DPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, peft_config=peft)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tps = batch * 2 * seq * args.steps / elapsed
    row = dict(tokens_per_s=round(tps, 1), step_s=round(elapsed / args.steps, 3))
    if device == "cuda":
        row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def _child(spec: dict) -> None:
    args = argparse.Namespace(**spec["args"])
    shape = spec["shape"]
    try:
        if spec["provider"] == "trl":
            row = run_trl(args, shape, spec["tokens"], spec["prompt_len"], spec["response_len"])
        else:
            row = run_fastdpo(
                args, shape, spec["tokens"], spec["prompt_len"], spec["response_len"], spec["shared_prompt"]
            )
        row["status"] = "ok"
    except Exception as exc:  # an OOM is a result here, not a failure of the benchmark
        import torch

        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        row = dict(status="OOM" if oom else f"error: {type(exc).__name__}: {exc}"[:300])
    print("RESULT " + json.dumps(row), flush=True)


def _run(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True, text=True, timeout=3600
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        return dict(status=f"crashed (rc={out.returncode}): {out.stderr[-300:]}")
    return json.loads(lines[-1][7:])


def _specs(args, shape: dict, tokens: int, providers: list[str]) -> list[tuple[str, str, dict]]:
    """The runs of one step size: (provider, variant, child spec)."""
    if args.mode == "shared-prompt":
        prompt_len, response_len = int(tokens * 0.45), int(tokens * 0.025)
        variants = [("fastdpo", "shared prompt"), ("fastdpo", "")]
    else:
        seq = tokens // 2
        prompt_len = int(seq * args.prompt_frac)
        response_len = seq - prompt_len - 2
        names = list(MECHANISMS) if args.mode == "mechanisms" else [""]
        variants = (
            [("fastdpo", v) for v in names] if args.mode == "mechanisms" else [(p, "") for p in providers]
        )
    return [
        (
            provider,
            variant,
            dict(
                provider=provider,
                shape=shape,
                tokens=tokens,
                prompt_len=prompt_len,
                response_len=response_len,
                shared_prompt=variant == "shared prompt",
            ),
        )  # fmt: skip
        for provider, variant in variants
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--mode", choices=["max-context", "throughput", "shared-prompt", "mechanisms"], default="throughput"
    )
    p.add_argument("--providers", default="fastdpo,trl")
    p.add_argument("--tokens", type=int, action="append", help="tokens per optimizer step (repeatable)")
    p.add_argument("--prompt-frac", type=float, default=0.5, help="prompt share of each sequence")
    p.add_argument(
        "--steps", type=int, help="timed optimizer steps after one warm-up step (default 3; 2 with --tiny)"
    )
    p.add_argument("--offload", action="store_true", help="fastdpo: offload checkpointed activations to CPU")
    p.add_argument(
        "--long-context", action=argparse.BooleanOptionalAction, default=None,
        help="fastdpo: the memory settings of configs/llama3-8b-long.yaml (default: on in max-context mode)",
    )  # fmt: skip
    p.add_argument("--plan", action="store_true", help="fastdpo rows: also fastdpo plan's peak (planned_gb)")
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: a CPU check of the harness")
    p.add_argument("--small", action="store_true", help="a small model (hidden 512, 4 layers): CPU timings")
    p.add_argument("--csv", help="write the rows as CSV here")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        _child(json.loads(args._child))
        return []

    shape = TINY if args.tiny else SMALL if args.small else LLAMA31_8B
    defaults = {
        "max-context": [256, 512] if args.tiny else [65536, 131072, 262144, 393216, 524288, 655360, 786432],
        "throughput": [256] if args.tiny else [16384],
        "shared-prompt": [512] if args.tiny else [16384],
        "mechanisms": [512] if args.tiny else [8192],
    }
    tokens_list = args.tokens or defaults[args.mode]
    providers = [x for x in args.providers.split(",") if x]
    long_context = args.mode == "max-context" if args.long_context is None else args.long_context
    child_args = dict(
        steps=args.steps or (2 if args.tiny else 3),
        offload=args.offload,
        long_context=long_context,
        plan=args.plan,
    )
    rows = []
    for tokens in tokens_list:
        for provider, variant, spec in _specs(args, shape, tokens, providers):
            spec["args"] = {**child_args, "options": MECHANISMS.get(variant, {})}
            row = dict(
                mode=args.mode, provider=provider, variant=variant, tokens_per_step=tokens,
                long_context=long_context and provider == "fastdpo",
            )  # fmt: skip
            row.update(_run(spec))
            rows.append(row)
            print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    write_csv(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()
