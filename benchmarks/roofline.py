"""A cost model of the head per phase and implementation on a datasheet GPU; every number is modeled.

For each phase and implementation it prints the FLOPs, the HBM bytes modeled from the real tile order,
and ``time = max(compute, memory)`` (the fused backward adds its atomics' HBM traffic on top), beside the
4-matmul floor (``8 N V D`` FLOPs at peak). Implementations:

  fused    fastdpo's fused kernels, configs and program order read from ``fastdpo.ops._head_triton``
  chunked  fastdpo's ``impl="chunked"``: torch.mm into one buffer, Triton folds (``_head_chunked``)
  trl      TRL 1.16's cuBLAS-chunked head (the same structure, TRL's chunk sizes)
  naive    full logits in the input dtype, fp32 log-softmax, autograd (what a plain PyTorch loss does)

How bytes are modeled: the fused kernels are replayed wave by wave (``SMs x CTAs per SM`` programs at
once, in program-id order) through an LRU L2 of the GPU's size at tile granularity; a miss reads the tile
from HBM, an evicted dirty accumulator tile writes it back. Chunked and naive steps are separate kernels,
each reading its operands and writing its result once, each at ``max(FLOPs / peak, bytes / bandwidth)``.
Not modeled: exp/SFU throughput, L2-side atomic throughput, launch gaps, tensor-core efficiency below
peak, and gradient filtering (the model is unfiltered).

    python benchmarks/roofline.py                                  # Llama-3-8B head, H100
    python benchmarks/roofline.py --shape gemma2 --gpu a100
    python benchmarks/roofline.py --csv out/head.csv --gpu h100    # measured beside modeled
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from gpu_specs import DEFAULT_SHAPES, GPU, GPUS, Shape

DTYPE_BYTES = {"bfloat16": 2, "float16": 2}
FP32 = 4
# bench_logprobs.py provider -> the implementation modeled here (fastdpo's fused impl unfiltered, as modeled).
PROVIDER_IMPL = {"fastdpo-nofilter": "fused", "fastdpo-chunked": "chunked", "trl": "trl", "naive": "naive"}


@dataclass
class Cost:
    """FLOPs and HBM bytes of one step; ``atomic_bytes`` are the fused backward's accumulator traffic."""

    flops: float = 0.0
    bytes: float = 0.0
    atomic_bytes: float = 0.0

    def time_ms(self, gpu: GPU) -> float:
        compute = self.flops / (gpu.bf16_tflops * 1e12)
        return 1e3 * (
            max(compute, self.bytes / (gpu.hbm_tb_s * 1e12)) + self.atomic_bytes / (gpu.hbm_tb_s * 1e12)
        )

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.flops + other.flops, self.bytes + other.bytes, self.atomic_bytes + other.atomic_bytes
        )


def _kernels_time(steps: Iterable[Cost], gpu: GPU) -> tuple[Cost, float]:
    """Total cost and time of kernels run one after another."""
    total, ms = Cost(), 0.0
    for step in steps:
        total += step
        ms += step.time_ms(gpu)
    return total, ms


class L2:
    """An LRU cache of whole tiles; counts HBM reads on misses and writes of evicted dirty tiles."""

    def __init__(self, capacity: float):
        self.capacity = capacity
        self.used = 0.0
        self.tiles: OrderedDict = OrderedDict()  # key -> (bytes, dirty)
        self.read = 0.0
        self.written = 0.0

    def access(self, key, size: float, write: bool = False) -> float:
        """Touches a tile; returns the bytes read from HBM (0 on a hit)."""
        if key in self.tiles:
            _, dirty = self.tiles.pop(key)
            self.tiles[key] = (size, dirty or write)
            return 0.0
        self.read += size
        self.tiles[key] = (size, write)
        self.used += size
        while self.used > self.capacity and len(self.tiles) > 1:
            _, (old, dirty) = self.tiles.popitem(last=False)
            self.used -= old
            self.written += old if dirty else 0.0
        return size

    def flush(self) -> None:
        self.written += sum(size for size, dirty in self.tiles.values() if dirty)
        self.tiles.clear()
        self.used = 0.0


def _grouped_pid(pid: int, num_m: int, num_v: int, group_m: int) -> tuple[int, int]:
    """(token block, vocab block or split): the program order of ``_grouped_pid`` in
    ``kernels/linear_logprobs.py``, which both fused kernels use."""
    in_group = group_m * num_v
    first_m = (pid // in_group) * group_m
    size_m = min(num_m - first_m, group_m)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


def fused_costs(
    shape: Shape, gpu: GPU, ctas: tuple[int, int], fwd_splits: int | None = None, group_m: int | None = None
) -> dict[str, Cost]:
    """The fused kernels' modeled costs: the forward and the backward (dH and dW), at ``ctas`` (forward,
    backward) CTAs per SM.

    ``fwd_splits`` and ``group_m`` (both kernels) replace the launchers' choices, to model a change.
    """
    import torch

    from fastdpo.ops import _head_triton as launch

    es = DTYPE_BYTES[shape.dtype]
    n, d, v = shape.n, shape.d, shape.v
    l2 = gpu.l2_mb * 1e6

    cfg = launch.FWD_CONFIG
    old, launch.num_sms = launch.num_sms, lambda device: gpu.sms
    try:
        splits = fwd_splits or launch.vocab_splits(n, v, cfg, torch.device("cuda"), ctas=ctas[0])
    finally:
        launch.num_sms = old
    v_per_split = math.ceil(math.ceil(v / splits) / cfg.block_v) * cfg.block_v
    splits = math.ceil(v / v_per_split)
    num_m = math.ceil(n / cfg.block_m)
    tiles_per_split = math.ceil(v_per_split / cfg.block_v)
    cache = L2(l2)
    programs = [_grouped_pid(pid, num_m, splits, group_m or cfg.group_m) for pid in range(num_m * splits)]
    slots = gpu.sms * ctas[0]
    for w0 in range(0, len(programs), slots):
        wave = programs[w0 : w0 + slots]
        for k in range(tiles_per_split):
            for m, s in wave:
                cache.access(("h", m), cfg.block_m * d * es)
                cache.access(("w", s * tiles_per_split + k), cfg.block_v * d * es)
    fwd = Cost(flops=2.0 * n * v * d, bytes=cache.read + splits * n * FP32 * 2 * 2)

    cfg = launch.BWD_CONFIG
    num_m, num_v = math.ceil(n / cfg.block_m), math.ceil(v / cfg.block_v)
    cache = L2(l2)
    h_tile, w_tile = cfg.block_m * d * es, cfg.block_v * d * es
    dh_tile, dw_tile = cfg.block_m * d * FP32, cfg.block_v * d * FP32
    atomic_read = 0.0
    slots = gpu.sms * ctas[1]
    for w0 in range(0, num_m * num_v, slots):
        wave = [
            _grouped_pid(pid, num_m, num_v, group_m or cfg.group_m)
            for pid in range(w0, min(w0 + slots, num_m * num_v))
        ]
        for m, vb in wave:  # the logits recompute
            cache.access(("h", m), h_tile)
            cache.access(("w", vb), w_tile)
        for m, vb in wave:  # dH += dz @ W, dW += dz.T @ H, both as atomic read-modify-writes in L2
            atomic_read += cache.access(("dh", m), dh_tile, write=True)
            cache.access(("w", vb), w_tile)
            atomic_read += cache.access(("dw", vb), dw_tile, write=True)
            cache.access(("h", m), h_tile)
    cache.flush()
    acc = (n + v) * d * FP32
    # zeroing the fp32 accumulators before, casting them to the input dtype after
    extra = acc + acc + acc * es / FP32
    bwd = Cost(
        flops=6.0 * n * v * d,
        bytes=cache.read - atomic_read + extra,
        atomic_bytes=atomic_read + cache.written,
    )
    return {"fwd": fwd, "bwd": bwd}


def chunked_costs(shape: Shape, cm: int, cv: int) -> dict[str, list[Cost]]:
    """Kernel-by-kernel costs of the chunked structure (fastdpo's chunked impl and TRL's head)."""
    es = DTYPE_BYTES[shape.dtype]
    n, d, v = shape.n, shape.d, shape.v
    fwd, bwd = [], []
    bwd.append(Cost(bytes=(n + v) * d * FP32))  # zeroing dH and dW
    for m0 in range(0, n, cm):
        rows = min(cm, n - m0)
        for v0 in range(0, v, cv):
            cols = min(cv, v - v0)
            tile = rows * cols * es
            mm = Cost(flops=2.0 * rows * cols * d, bytes=(rows + cols) * d * es + tile)
            fwd += [mm, Cost(bytes=tile)]  # logits chunk, fold
            bwd += [mm, Cost(bytes=2 * tile)]  # recompute, fold into dz in place
            bwd.append(Cost(flops=2.0 * rows * cols * d, bytes=tile + cols * d * es + 2 * rows * d * FP32))
            bwd.append(Cost(flops=2.0 * rows * cols * d, bytes=tile + rows * d * es + 2 * cols * d * FP32))
    bwd.append(Cost(bytes=(n + v) * d * (FP32 + es)))  # casting the accumulators
    return {"fwd": fwd, "bwd": bwd}


def naive_costs(shape: Shape) -> dict[str, list[Cost]]:
    """Full logits: matmul in the input dtype, ``.float()``, log-softmax, gather; autograd backward."""
    es = DTYPE_BYTES[shape.dtype]
    n, d, v = shape.n, shape.d, shape.v
    nv = n * v
    fwd = [
        Cost(flops=2.0 * nv * d, bytes=(n + v) * d * es + nv * es),
        Cost(bytes=nv * (es + FP32)),  # .float()
        Cost(bytes=2 * nv * FP32),  # log_softmax
    ]
    bwd = [
        Cost(bytes=nv * FP32),  # gather's backward: a zero-filled [N, V] with one entry per row
        Cost(bytes=3 * nv * FP32),  # log_softmax backward
        Cost(bytes=nv * (FP32 + es)),  # .float() backward
        Cost(flops=2.0 * nv * d, bytes=nv * es + v * d * es + n * d * es),  # dH
        Cost(flops=2.0 * nv * d, bytes=nv * es + n * d * es + v * d * es),  # dW
    ]
    return {"fwd": fwd, "bwd": bwd}


def model(shape: Shape, gpu: GPU, ctas: tuple[int, int] = (1, 1), **what_if: int | None) -> list[dict]:
    """One row per (impl, phase) with modeled FLOPs, bytes and time, plus the floor."""
    if shape.dtype not in DTYPE_BYTES:
        raise ValueError(f"the model covers bf16/fp16 tensor-core math, got dtype {shape.dtype!r}")
    import torch

    from fastdpo.ops._head_chunked import chunk_shape

    peak = gpu.bf16_tflops * 1e12
    nvd = shape.n * shape.v * shape.d
    rows = [
        dict(impl="floor", phase="fwd", tflop=2 * nvd / 1e12, hbm_gb=0.0, ms=1e3 * 2 * nvd / peak),
        dict(impl="floor", phase="bwd", tflop=6 * nvd / 1e12, hbm_gb=0.0, ms=1e3 * 6 * nvd / peak),
    ]
    for phase, cost in fused_costs(shape, gpu, ctas, **what_if).items():
        hbm_gb, atomic_gb = (cost.bytes + cost.atomic_bytes) / 1e9, cost.atomic_bytes / 1e9
        rows.append(dict(impl="fused", phase=phase, tflop=cost.flops / 1e12, hbm_gb=hbm_gb,
                         atomic_gb=atomic_gb, ms=cost.time_ms(gpu)))  # fmt: skip
    chunked = {"chunked": chunk_shape(shape.n, shape.v, torch.device("cuda"))}
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        chunked["trl"] = (min(shape.n, TOKEN_CHUNK_SIZE), _CHUNKED_LOGPROB_CHUNK_SIZE)
    except ImportError:
        pass
    steps = {impl: chunked_costs(shape, *cmcv) for impl, cmcv in chunked.items()} | {
        "naive": naive_costs(shape)
    }
    for impl, phases in steps.items():
        for phase, kernels in phases.items():
            total, ms = _kernels_time(kernels, gpu)
            rows.append(
                dict(impl=impl, phase=phase, tflop=total.flops / 1e12, hbm_gb=total.bytes / 1e9, ms=ms)
            )
    for impl in dict.fromkeys(r["impl"] for r in rows):
        fwd, bwd = (next(r for r in rows if r["impl"] == impl and r["phase"] == p) for p in ("fwd", "bwd"))
        both = {k: fwd[k] + bwd[k] for k in ("tflop", "hbm_gb", "atomic_gb", "ms") if k in fwd}
        rows.append(dict(impl=impl, phase="fwd+bwd", **both))
    floor = {r["phase"]: r["ms"] for r in rows if r["impl"] == "floor"}
    for r in rows:
        r["over_floor"] = r["ms"] / floor[r["phase"]]
    return rows


def measured(path: str, shape: Shape) -> dict[tuple[str, str], float]:
    """``(impl, phase) -> ms`` from a ``bench_logprobs.py`` CSV, for rows of this shape."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            impl = PROVIDER_IMPL.get(
                row.get("provider", ""), "floor" if row.get("provider") == "mm4" else None
            )
            same = (int(row["tokens"]), int(row["hidden"]), int(row["vocab"])) == (shape.n, shape.d, shape.v)
            if impl is None or not same:
                continue
            for phase, col in (("fwd", "fwd_ms"), ("bwd", "bwd_ms"), ("fwd+bwd", "fwd_bwd_ms")):
                if row.get(col):
                    out[(impl, phase)] = float(row[col])
    return out


def print_table(rows: list[dict], shape: Shape, gpu: GPU, measured_ms: dict | None = None) -> None:
    title = f"{shape.name}: N={shape.n} D={shape.d} V={shape.v} {shape.dtype}"
    spec = f"{gpu.bf16_tflops:g} TFLOP/s, {gpu.hbm_tb_s:g} TB/s, {gpu.l2_mb:g} MB L2"
    print(f"\n### Modeled on {gpu.name} ({spec}), {title}\n")
    head = ["impl", "phase", "TFLOP", "HBM GB (modeled)", "of it atomics GB", "time ms (modeled)", "x floor"]
    if measured_ms is not None:
        head += ["measured ms", "measured / modeled"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        atomic = f"{r['atomic_gb']:.1f}" if "atomic_gb" in r else "-"
        cells = [r["impl"], r["phase"], f"{r['tflop']:.1f}", f"{r['hbm_gb']:.1f}", atomic, f"{r['ms']:.1f}",
                 f"{r['over_floor']:.2f}"]  # fmt: skip
        if measured_ms is not None:
            got = measured_ms.get((r["impl"], r["phase"]))
            cells += [f"{got:.1f}", f"{got / r['ms']:.2f}"] if got else ["not measured", "-"]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s.name for s in DEFAULT_SHAPES]
    p.add_argument("--shape", choices=names, default="llama3-8b", help="a default head shape")
    p.add_argument("--custom", metavar="N,D,V", help="a custom shape instead")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--ctas-per-sm", type=int, nargs=2, default=[1, 1], metavar=("FWD", "BWD"),
                   help="CTAs per SM of the fused forward and backward (static_report.py)")  # fmt: skip
    p.add_argument("--csv", help="a bench_logprobs.py CSV: print measured beside modeled")
    p.add_argument("--fwd-splits", type=int, help="what-if: the fused forward's vocab splits")
    p.add_argument("--group-m", type=int, help="what-if: the fused kernels' GROUP_M")
    args = p.parse_args(argv)
    if args.custom:
        try:
            n, d, v = (int(x) for x in args.custom.split(","))
        except ValueError:
            p.error(f"--custom takes N,D,V as three integers, got {args.custom!r}")
        shape = Shape(f"custom-{n}x{d}x{v}", n, d, v, args.dtype)
    else:
        base = next(s for s in DEFAULT_SHAPES if s.name == args.shape)
        shape = Shape(base.name, base.n, base.d, base.v, args.dtype, base.softcap)
    gpu = GPUS[args.gpu]
    rows = model(shape, gpu, tuple(args.ctas_per_sm), fwd_splits=args.fwd_splits, group_m=args.group_m)
    if args.fwd_splits or args.group_m:
        print(f"what-if: fused forward splits {args.fwd_splits or 'as launched'}, "
              f"GROUP_M {args.group_m or 'as launched'}")  # fmt: skip
    print_table(rows, shape, gpu, measured(args.csv, shape) if args.csv else None)
    return rows


if __name__ == "__main__":
    main()
