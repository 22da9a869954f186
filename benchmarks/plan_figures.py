"""The planned figures of benchmarks/RESULTS.md: ``fastdpo plan`` of the Llama-3-8B LoRA step, fastdpo vs TRL.

  python benchmarks/plan_figures.py lengths --jsonl out/lengths.jsonl   # 16k, 64k, 128k tokens, one pair
  python benchmarks/plan_figures.py fit --jsonl out/fit.jsonl           # largest step in 24/48/80/141 GB

Every figure is a meta-device run (no GPU, no weights): "planned", never "measured". Three setups share
``configs/llama3-8b-long.yaml`` (LoRA r=16 on every projection, bf16 base, reference precomputed, flash-attn's
memory), without its shared prompt so that a pair is the same tokens for both trainers: fastdpo with
gradient checkpointing only, fastdpo with the file's long-context options, and stock TRL 1.16
``DPOTrainer``'s compute path (``fastdpo plan --compare-trl``: padded pairs, its chunked head). Memory
sizes are decimal GB as cards are sold (80 GB = 80e9 bytes); the margin is ``fastdpo plan``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastdpo.planner.api import GIB, load_model_config, margin_bytes  # noqa: E402
from fastdpo.planner.step import StepPlanner, fit_tokens  # noqa: E402
from fastdpo.train.config import TrainConfig, read_yaml  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "llama3-8b-long.yaml")
MODEL = os.path.join(ROOT, "configs", "llama3.1-8b.json")
LONG_OPTIONS = ("offload_checkpoints", "tiled_mlp", "lean_norms")
SETUPS = ("fastdpo, checkpointing only", "fastdpo, long-context options", "TRL 1.16")
FIT_MAX_LENGTH = 4096  # --fit steps of pairs of 4,096-token sequences (prompt 1,024)


def base_config(max_length: int) -> TrainConfig:
    values = read_yaml(CONFIG)
    # Without the shared prompt a pair is 2 * max_length tokens for fastdpo and for TRL alike.
    values.update(
        max_length=max_length, max_prompt_length=1024, tokens_per_step=2 * max_length, shared_prompt=False
    )
    return TrainConfig.from_dict(values)


def planner(setup: str, config: TrainConfig, model_config) -> object:
    """The setup's step planner, whose ``measure`` is cached by step size (a fit asks some sizes twice)."""
    if setup == "TRL 1.16":
        from fastdpo.planner.trl import TRLStepPlanner

        inner = TRLStepPlanner(config, model_config, "cuda")
    else:
        on = setup.endswith("long-context options")
        config = dataclasses.replace(config, **{name: on for name in LONG_OPTIONS})
        inner = StepPlanner(config, model_config, __import__("torch").device("meta"), "cuda")
    cache: dict[int, object] = {}

    class Cached:
        def measure(self, tokens: int):
            if tokens not in cache:
                cache[tokens] = inner.measure(tokens)
            return cache[tokens]

    return Cached()


def lengths(model_config, out) -> None:
    for tokens in (16384, 65536, 131072):
        config = base_config(tokens // 2)
        for setup in SETUPS:
            start = time.perf_counter()
            m = planner(setup, config, model_config).measure(tokens)
            row = dict(
                table="lengths", setup=setup, tokens=m.tokens, pairs=m.num_pairs, peak_gib=m.peak_bytes / GIB,
                host_gib=m.host_bytes / GIB, where=m.where, plan_s=time.perf_counter() - start,
                breakdown_gib={k: v / GIB for k, v in m.breakdown.items()},
            )  # fmt: skip
            emit(row, out)


def fit(model_config, out) -> None:
    config = base_config(FIT_MAX_LENGTH)
    for setup in SETUPS:
        p = planner(setup, config, model_config)
        for gb in (24, 48, 80, 141):
            memory = gb * 10**9
            start = time.perf_counter()
            best = fit_tokens(p, 2 * FIT_MAX_LENGTH, memory - margin_bytes(memory, "cuda"))
            row = dict(table="fit", setup=setup, gpu_gb=gb, max_tokens_per_step=best,
                       fit_s=time.perf_counter() - start)  # fmt: skip
            if best:
                m = p.measure(best)
                row.update(peak_gib=m.peak_bytes / GIB, host_gib=m.host_bytes / GIB, pairs=m.num_pairs,
                           planned_tokens=m.tokens, where=m.where)  # fmt: skip
            emit(row, out)


def emit(row: dict, out) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=["lengths", "fit"])
    p.add_argument("--jsonl", help="also append the rows here")
    args = p.parse_args(argv)
    model_config = load_model_config(MODEL)
    out = open(args.jsonl, "a", encoding="utf-8") if args.jsonl else None  # noqa: SIM115
    try:
        (lengths if args.table == "lengths" else fit)(model_config, out)
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    main()
