"""Times the C++ and numpy pack planners on random DPO pair lengths.

Usage:
    python benchmarks/bench_packing.py --pairs 1000000 --budget 16384 --csv packing.csv
    python benchmarks/bench_packing.py --pairs 2000  # quick CI smoke run
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable

import numpy as np

from fastdpo import packing
from fastdpo.packing import balance_bins, pair_num_tokens, plan_bins

__all__ = ["main", "random_pair_tokens"]


def random_pair_tokens(num_pairs: int, budget: int, *, shared_prompt: bool, seed: int) -> np.ndarray:
    """Equals packed token counts of ``num_pairs`` pairs with log-normal prompt and response lengths.

    Medians of 256 prompt and 192 response tokens with long tails, the shape of common chat preference
    sets; pairs that would not fit ``budget`` are clipped to it.
    """
    rng = np.random.default_rng(seed)

    def lengths(median: float) -> np.ndarray:
        return np.maximum(rng.lognormal(np.log(median), 0.8, num_pairs).astype(np.int64), 1)

    tokens = pair_num_tokens(lengths(256), lengths(192), lengths(192), shared_prompt=shared_prompt)
    return np.minimum(tokens, budget)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Equals the fastest wall-clock seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    """Runs the benchmark, prints a table, optionally writes CSV, and returns the rows."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--pairs", type=int, default=1_000_000, help="number of pairs to plan")
    parser.add_argument("--budget", type=int, default=16384, help="tokens per bin")
    parser.add_argument("--ranks", type=int, default=8, help="groups for balance_bins")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per planner; the best is kept")
    parser.add_argument("--shared-prompt", action="store_true", help="use shared-prompt token counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=None, help="write the table to this CSV path")
    args = parser.parse_args(argv)
    if args.pairs <= 0 or args.budget <= 0 or args.ranks <= 0 or args.repeats <= 0:
        parser.error("--pairs, --budget, --ranks and --repeats must be positive")

    tokens = random_pair_tokens(args.pairs, args.budget, shared_prompt=args.shared_prompt, seed=args.seed)
    impls = ["cpp", "python"] if packing._C is not None else ["python"]
    if "cpp" not in impls:
        print("fastdpo._C is not built; timing the numpy planner only")
    plans = {impl: plan_bins(tokens, args.budget, impl=impl) for impl in impls}
    offsets, order = plans[impls[0]]
    if not all(np.array_equal(offsets, o) and np.array_equal(order, r) for o, r in plans.values()):
        raise RuntimeError("C++ and numpy planners disagree; run tests/test_packing.py")
    bin_tokens = np.add.reduceat(tokens[order], offsets[:-1])
    fill = tokens.sum() / (bin_tokens.size * args.budget)

    rows = []
    for impl in impls:
        plan_s = best_time(lambda impl=impl: plan_bins(tokens, args.budget, impl=impl), args.repeats)
        balance_s = best_time(lambda impl=impl: balance_bins(bin_tokens, args.ranks, impl=impl), args.repeats)
        rows.append(
            {
                "impl": impl,
                "pairs": args.pairs,
                "budget": args.budget,
                "bins": bin_tokens.size,
                "fill": round(float(fill), 4),
                "plan_s": float(f"{plan_s:.4g}"),
                "pairs_per_s": round(args.pairs / plan_s),
                "balance_s": float(f"{balance_s:.4g}"),
            }
        )

    header = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[h]).rjust(w) for h, w in zip(header, widths, strict=True)))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
