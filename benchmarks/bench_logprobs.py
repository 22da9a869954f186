"""Head benchmark: per-token log-probs of ``hidden @ W.T`` (fwd, bwd, fwd+bwd time and peak memory).

Providers, all checked against a float64 reference on a slice of rows before they are timed:
  naive     full logits in the input dtype, fp32 log-softmax (what a plain PyTorch DPO loss does)
  trl       TRL's ChunkedLogProbFunction (trl/kernels/chunked_logprob.py), as its DPOTrainer calls it
  liger     Liger-Kernel's fused linear cross entropy, reduction="none" (GPU only)
  cce       Cut Cross-Entropy, linear_cross_entropy(..., reduction="none") (GPU only)
  fastdpo   fastdpo.linear_logprobs, gradient filtering on ("fastdpo") and off ("fastdpo-nofilter")
  fastdpo-chunked  fastdpo.linear_logprobs(impl="chunked"): torch.mm chunks and Triton folds
  torch-chunked    PyTorch's own torch.nn.functional.linear_cross_entropy, reduction="none", chunked path
                   (options=torch.nn.LinearCrossEntropyOptions()); no softcap
  mm4       the floor: the four dense matmuls any exact method does (logits, recompute, dH, dW)

GPU:  python benchmarks/bench_logprobs.py --csv out/head.csv --plot out/head.png
CPU:  python benchmarks/bench_logprobs.py            (reduced mode: small shapes, torch backend)
      python benchmarks/bench_logprobs.py --cpu-memory   (extra peak RSS and time of fwd+bwd, one process
                                                          each: naive, torch-chunked, fastdpo torch backend)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable

import torch
from common import format_row, median_ms, parse_providers, write_csv

SHAPES = {
    "llama3-8b": dict(hidden=4096, vocab=128256, softcap=None),
    "qwen2.5-7b": dict(hidden=3584, vocab=152064, softcap=None),
    "gemma2-9b": dict(hidden=3584, vocab=256000, softcap=30.0),
}
GPU_TOKENS = [4096, 16384, 65536]
CPU_SHAPE = dict(hidden=256, vocab=8192, softcap=None)
CPU_TOKENS = [512, 2048]
PROVIDERS = [
    "naive",
    "trl",
    "liger",
    "cce",
    "torch-chunked",
    "fastdpo",
    "fastdpo-nofilter",
    "fastdpo-chunked",
    "mm4",
]
CPU_MEMORY_PROVIDERS = ["naive", "torch-chunked", "fastdpo", "fastdpo-chunked"]


def _available(name: str, device: str) -> bool:
    try:
        if name == "trl":
            import trl.kernels.chunked_logprob  # noqa: F401
        elif name == "liger":
            if device != "cuda":
                return False
            import liger_kernel  # noqa: F401
        elif name == "cce":
            if device != "cuda":
                return False
            import cut_cross_entropy  # noqa: F401
        elif name == "torch-chunked":
            return hasattr(torch.nn, "LinearCrossEntropyOptions")
    except ImportError:
        return False
    return True


def make_provider(name: str, softcap: float | None) -> Callable:
    """Returns ``f(hidden, weight, targets) -> logp [N]`` (differentiable) for one provider."""
    if name == "naive":

        def naive(h, w, t):
            z = (h @ w.T).float()
            if softcap is not None:
                z = softcap * torch.tanh(z / softcap)
            return z.log_softmax(-1).gather(-1, t[:, None])[:, 0]

        return naive
    if name == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        return lambda h, w, t: ChunkedLogProbFunction.apply(h, w, None, t, 1.0, 32768, softcap, 1.0, ())[0]
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=softcap)
        return lambda h, w, t: -loss(w, h, t)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, t: -linear_cross_entropy(h, w, t, reduction="none", softcap=softcap)
    if name == "torch-chunked":
        if softcap is not None:
            raise ValueError("torch-chunked (F.linear_cross_entropy) has no softcap")
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, t: (
            -torch.nn.functional.linear_cross_entropy(h, w, t, reduction="none", options=options)
        )
    if name in ("fastdpo", "fastdpo-nofilter", "fastdpo-chunked"):
        from fastdpo import linear_logprobs

        eps = None if name == "fastdpo-nofilter" else "auto"
        impl = "chunked" if name == "fastdpo-chunked" else "fused"
        return lambda h, w, t: linear_logprobs(h, w, t, softcap=softcap, filter_eps=eps, impl=impl)
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def _mm4(h: torch.Tensor, w: torch.Tensor, chunk: int = 8192) -> None:
    """The four matmuls of an exact fused head, chunked over tokens so that 64k tokens fit in memory."""
    dw = torch.zeros_like(w)
    for n0 in range(0, h.shape[0], chunk):
        hc = h[n0 : n0 + chunk]
        torch.mm(hc, w.T)
        g = torch.mm(hc, w.T)
        torch.mm(g, w)
        dw.addmm_(g.T, hc)


def check_provider(fn, h, w, t, softcap, rows: int = 256) -> tuple[float, float]:
    """Max abs error of logp and dhidden on the first rows vs float64 (a row's dh depends on it alone)."""
    from fastdpo.reference import linear_logprobs_reference

    hs = h[:rows].detach().clone().requires_grad_()
    got = fn(hs, w.detach(), t[:rows])
    got.float().sum().backward()
    h64 = hs.detach().double().requires_grad_()
    ref = linear_logprobs_reference(h64, w.detach().double(), t[:rows], softcap=softcap)
    ref.sum().backward()
    return (got.double() - ref).abs().max().item(), (hs.grad.double() - h64.grad).abs().max().item()


def bench_one(name, n, d, v, softcap, dtype, device, reps, logit_std=3.0) -> dict:
    torch.manual_seed(0)
    h = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    w = (torch.randn(v, d, device=device) * logit_std / d**0.5).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), device=device)
    row = dict(provider=name, tokens=n, hidden=d, vocab=v, softcap=softcap or "", dtype=str(dtype)[6:])
    if name == "mm4":
        with torch.no_grad():
            row["fwd_bwd_ms"] = median_ms(lambda: _mm4(h, w), device, reps)
        return row
    fn = make_provider(name, softcap)
    row["logp_err"], row["dh_err"] = check_provider(fn, h, w, t, softcap)

    def zero():
        h.grad = None
        w.grad = None

    row["fwd_ms"] = median_ms(lambda: fn(h, w, t), device, reps)
    holder = {}

    def fwd():
        zero()
        holder["out"] = fn(h, w, t)

    row["bwd_ms"] = median_ms(lambda: holder["out"].sum().backward(), device, reps, setup=fwd)
    row["fwd_bwd_ms"] = median_ms(lambda: fn(h, w, t).sum().backward(), device, reps, setup=zero)
    if device == "cuda":
        zero()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(h, w, t).sum().backward()
        torch.cuda.synchronize()
        grads = h.numel() * h.element_size() + w.numel() * w.element_size() + n * 4
        row["peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base - grads) / 2**20, 1)
    return row


def _cpu_memory_child(name: str, n: int, d: int, v: int, reps: int) -> None:
    """Prints the JSON row of one provider: extra peak RSS of its first fwd+bwd, its error, its time."""
    os.environ["FASTDPO_BACKEND"] = "torch"
    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) / d**0.5).requires_grad_()
    t = torch.randint(0, v, (n,))
    fn = make_provider(name, None)
    h.grad = torch.zeros_like(h)
    w.grad = torch.zeros_like(w)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(h, w, t).sum().backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    logp_err, dh_err = check_provider(fn, h, w, t, None)
    fwd_bwd_ms = median_ms(lambda: fn(h, w, t).sum().backward(), "cpu", reps)
    extra_mb = round((after - before) / 1024, 1)
    row = dict(provider=name, tokens=n, hidden=d, vocab=v, extra_peak_rss_mb=extra_mb,
               fwd_bwd_ms=round(fwd_bwd_ms, 1), logp_err=logp_err, dh_err=dh_err,
               threads=torch.get_num_threads())  # fmt: skip
    print(json.dumps(row))


def cpu_memory(n: int, d: int, v: int, providers: list[str], reps: int) -> list[dict]:
    """Each provider in a fresh process, one at a time, then every row's ratios to naive and torch-chunked."""
    rows = []
    for name in providers:
        out = subprocess.run(
            [sys.executable, __file__, "--_child", name, str(n), str(d), str(v), str(reps)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(format_row(rows[-1]), flush=True)
    by_name = {r["provider"]: r for r in rows}
    for r in rows:
        for base in ("naive", "torch-chunked"):
            if base in by_name and r["provider"] != base:
                for col in ("extra_peak_rss_mb", "fwd_bwd_ms"):
                    r[f"{col}_over_{base}"] = round(r[col] / by_name[base][col], 4)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Adds each provider's fwd+bwd speedup over naive and its fraction of the 4-matmul floor."""
    for r in rows:
        same = {
            x["provider"]: x.get("fwd_bwd_ms")
            for x in rows
            if (x["shape"], x["tokens"]) == (r["shape"], r["tokens"])
        }
        if r.get("fwd_bwd_ms") and r["provider"] != "mm4":
            if same.get("naive"):
                r["speedup_vs_naive"] = round(same["naive"] / r["fwd_bwd_ms"], 3)
            if same.get("mm4"):
                r["time_over_mm4"] = round(r["fwd_bwd_ms"] / same["mm4"], 3)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["hidden"], r["vocab"]) for r in rows})
    fig, axes = plt.subplots(2, len(shapes), figsize=(5 * len(shapes), 8), squeeze=False)
    for col, (d, v) in enumerate(shapes):
        for metric, ax in zip(("fwd_bwd_ms", "peak_extra_mb"), axes[:, col], strict=True):
            for name in PROVIDERS:
                pts = [
                    (r["tokens"], r[metric])
                    for r in rows
                    if r["provider"] == name
                    and (r["hidden"], r["vocab"]) == (d, v)
                    and r.get(metric) not in (None, "")
                ]
                if pts:
                    ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"D={d} V={v}")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(metric)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", action="append", choices=sorted(SHAPES), help="model head shape (repeatable)")
    p.add_argument("--hidden", type=int, help="custom D (with --vocab)")
    p.add_argument("--vocab", type=int, help="custom V (with --hidden)")
    p.add_argument("--softcap", type=float, default=None, help="custom soft-capping value")
    p.add_argument("--tokens", type=int, action="append", help="N values (repeatable)")
    p.add_argument("--providers", help="comma-separated providers (default: all; with --cpu-memory, "
                   f"{','.join(CPU_MEMORY_PROVIDERS)})")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument(
        "--reps", type=int, help="timed runs after 2 warm-ups (default 10 GPU, 3 CPU, 1 --cpu-memory)"
    )
    p.add_argument(
        "--logit-std", type=float, default=3.0, help="std of the random logits; ~10 gives peaked softmaxes"
    )
    p.add_argument("--csv", help="write the rows as CSV here")
    p.add_argument("--plot", help="write a PNG of time and memory against N here")
    p.add_argument("--cpu-memory", action="store_true", help="extra peak RSS, torch backend vs naive (CPU)")
    p.add_argument("--_child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        _cpu_memory_child(args._child[0], *map(int, args._child[1:]))
        return []
    if args.cpu_memory:
        n, d, v = (args.tokens or [4096])[0], args.hidden or 256, args.vocab or 65536
        providers = parse_providers(p, args.providers, PROVIDERS) if args.providers else CPU_MEMORY_PROVIDERS
        rows = cpu_memory(n, d, v, providers, args.reps or 1)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, args.dtype)
        if (args.hidden is None) != (args.vocab is None):
            p.error("--hidden and --vocab go together")
        if args.hidden:
            shapes = {"custom": dict(hidden=args.hidden, vocab=args.vocab, softcap=args.softcap)}
        elif device == "cuda":
            shapes = {s: SHAPES[s] for s in (args.shape or SHAPES)}
        else:
            shapes = {"cpu-reduced": CPU_SHAPE}
        tokens = args.tokens or (GPU_TOKENS if device == "cuda" else CPU_TOKENS)
        if device == "cpu":
            print("CPU reduced mode: small shapes, torch backend, fp32; GPU numbers need a GPU.")
            dtype = torch.float32
        reps = args.reps or (10 if device == "cuda" else 3)
        wanted = parse_providers(p, args.providers or ",".join(PROVIDERS), PROVIDERS)
        providers = [x for x in wanted if x == "mm4" or _available(x, device)]
        skipped = sorted(set(wanted) - set(providers))
        if skipped:
            print(f"skipped (not installed or not on this device): {', '.join(skipped)}")
        rows = []
        for label, shape in shapes.items():
            for n in tokens:
                for name in providers:
                    if name == "torch-chunked" and shape["softcap"] is not None:
                        continue  # F.linear_cross_entropy has no softcap
                    try:
                        row = bench_one(
                            name,
                            n,
                            shape["hidden"],
                            shape["vocab"],
                            shape["softcap"],
                            dtype,
                            device,
                            reps,
                            args.logit_std,
                        )
                    except torch.OutOfMemoryError:
                        row = dict(
                            provider=name, tokens=n, hidden=shape["hidden"], vocab=shape["vocab"], error="OOM"
                        )
                        torch.cuda.empty_cache()
                    row["shape"] = label
                    rows.append(row)
                    print(format_row(row), flush=True)
        _add_ratios(rows)
        if args.plot:
            plot(rows, args.plot)
    write_csv(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()
