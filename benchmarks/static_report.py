"""Static report: what the compiled kernels look like on sm_90a and sm_80, from a machine without a GPU.

For each shape, the launchers run on fake CUDA tensors with the launches captured (see ``aot.py``); each
distinct launch is compiled for each arch and one table per shape lists: registers, spill bytes, stack
frame, shared memory, CTAs per SM (from registers x threads and shared memory against the arch limits),
the grid and the waves it makes on an H100 (sm_90a, 132 SMs) or A100 (sm_80, 108 SMs), the MMA kind,
the atomics (static PTX counts by memory semantics) and the static gate's verdict.

    python benchmarks/static_report.py                         # Llama-3-8B, Qwen2.5-7B, Gemma-2 heads
    python benchmarks/static_report.py --custom 4096,4096,128256 --softcap 30 --arch sm90a
    python benchmarks/static_report.py --json out/static.json --gate   # exit 1 on any gate violation
"""

from __future__ import annotations

import os

# Compiling for a GPU target needs real JITFunctions; the interpreter's stand-ins cannot compile.
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from aot import Report, capture_launches, compile_all, ptxas_available  # noqa: E402
from gpu_specs import ARCHS, DEFAULT_SHAPES, Shape  # noqa: E402

# The exit status when the triton wheel ships no ptxas (the gate test skips on it, and only on it).
NO_PTXAS_EXIT = 3
_COLUMNS = [
    ("variant", 27), ("kernel", 22), ("config", 52), ("arch", 5), ("regs", 4), ("spill st/ld", 11),
    ("stack", 5), ("smem KB", 7), ("CTA/SM", 6), ("grid", 12), ("waves", 6), ("mma", 8), ("atomics", 22),
    ("gate", 4),
]  # fmt: skip


def _cells(r: Report) -> list[str]:
    if r.error:
        return [r.launch.variant, _short(r.launch.kernel), r.launch.config(), r.arch] + ["-"] * 9 + ["FAIL"]
    grid = "x".join(str(g) for g in r.launch.grid if g > 1) or "1"
    atomics = " ".join(f"{k}:{v}" for k, v in sorted(r.atomics.items())) or "-"
    return [
        r.launch.variant, _short(r.launch.kernel), r.launch.config(), r.arch, str(r.regs),
        f"{r.spill_stores}/{r.spill_loads}", str(r.stack), f"{r.shared / 1024:.0f}", str(r.ctas_per_sm), grid,
        f"{r.waves:.2f}", r.mma_kind, atomics, "FAIL" if r.violations() else "ok",
    ]  # fmt: skip


def _short(kernel: str) -> str:
    return kernel.removeprefix("_").removesuffix("_kernel")


def print_tables(reports: list[Report], shapes: list[Shape]) -> None:
    """One table per shape (and one for the shape-independent loss kernels), then every violation."""
    titles = {s.name: f"{s.name}: N={s.n} D={s.d} V={s.v} {s.dtype}" + (f" softcap={s.softcap}" if s.softcap
              else "") + (" bias" if s.bias else "") for s in shapes}  # fmt: skip
    titles["-"] = "shape-independent kernels"
    for name, title in titles.items():
        rows = [r for r in reports if r.launch.shape == name]
        if not rows:
            continue
        print(f"\n## {title}")
        print("  ".join(h.ljust(w) for h, w in _COLUMNS))
        for r in rows:
            print("  ".join(c.ljust(w) for c, (_, w) in zip(_cells(r), _COLUMNS, strict=True)))
    bad = [r for r in reports if r.violations()]
    print(f"\nstatic gate: {len(reports) - len(bad)} of {len(reports)} launches pass")
    for r in bad:
        print(f"  FAIL {r.describe()}: {'; '.join(r.violations())}")


def _parse_custom(text: str, args: argparse.Namespace) -> Shape:
    try:
        n, d, v = (int(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--custom takes N,D,V as three integers, got {text!r}") from None
    return Shape(f"custom-{n}x{d}x{v}", n, d, v, args.dtype, args.softcap, args.bias)


def main(argv: list[str] | None = None) -> list[Report]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s.name for s in DEFAULT_SHAPES]
    p.add_argument(
        "--shape", action="append", choices=names, help="a default shape (repeatable; default all)"
    )
    p.add_argument(
        "--custom", action="append", default=[], metavar="N,D,V", help="a custom shape (repeatable)"
    )
    p.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="custom dtype"
    )
    p.add_argument("--softcap", type=float, default=None, help="custom shapes' soft-capping value")
    p.add_argument("--bias", action="store_true", help="custom shapes have an lm_head bias")
    p.add_argument("--arch", action="append", choices=sorted(ARCHS), help="target (repeatable; default both)")
    p.add_argument("--no-autotune", action="store_true", help="skip the FASTDPO_AUTOTUNE=1 candidates")
    p.add_argument("--no-loss", action="store_true", help="skip the shape-independent loss kernels")
    p.add_argument("--jobs", type=int, default=2, help="compile processes")
    p.add_argument("--json", help="write every report as JSON here")
    p.add_argument("--gate", action="store_true", help="exit with status 1 if any launch fails the gate")
    args = p.parse_args(argv)

    shapes = [s for s in DEFAULT_SHAPES if s.name in (args.shape or ([] if args.custom else names))]
    shapes += [_parse_custom(c, args) for c in args.custom]
    reason = ptxas_available()
    if reason:
        print(f"cannot compile ahead of time: {reason}", file=sys.stderr)
        raise SystemExit(NO_PTXAS_EXIT)
    start = time.perf_counter()
    launches = {
        arch: capture_launches(shapes, arch, autotune=not args.no_autotune, loss=not args.no_loss)
        for arch in (args.arch or sorted(ARCHS, reverse=True))
    }
    reports = compile_all(launches, jobs=args.jobs)
    print_tables(reports, shapes)
    print(f"({len(reports)} launches, {time.perf_counter() - start:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=1, default=str)
    if args.gate and any(r.violations() for r in reports):
        raise SystemExit(1)
    return reports


if __name__ == "__main__":
    main()
