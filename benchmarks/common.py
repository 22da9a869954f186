"""Helpers shared by the benchmark scripts: timing, row printing and CSV output."""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from collections.abc import Callable


def median_ms(
    fn: Callable[[], object], device: str, reps: int, setup: Callable[[], object] | None = None
) -> float:
    """Median wall time of ``fn`` in ms over ``reps`` runs after 2 warm-ups (compilation, autotuning)."""
    import torch

    times = []
    for i in range(reps + 2):
        if setup is not None:
            setup()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def parse_providers(parser: argparse.ArgumentParser, value: str, known: list[str]) -> list[str]:
    """The comma-separated providers of ``value``; an unknown name is a usage error."""
    wanted = [x for x in value.split(",") if x]
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        parser.error(f"unknown providers {unknown}; expected some of {known}")
    return wanted


def format_row(row: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def write_csv(path: str | None, rows: list[dict]) -> None:
    """Writes ``rows`` (dicts, keys in first-seen order) to ``path``; nothing when ``path`` is None."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
