"""Ahead-of-time compiles of fastdpo's Triton kernels for real GPUs, on a machine without one.

The launchers run for real on fake CUDA tensors (``FakeTensorMode``: shapes, strides and dtypes, no memory),
with ``JITFunction.run`` replaced so that nothing executes: each launch is captured through Triton's own
binder, so its specialization (ints equal to 1 become constexprs, multiples of 16 get divisibility hints)
is what a real launch would compile. Each distinct launch is then compiled with ``triton.compile`` for an
explicit ``GPUTarget`` and read back: ``ptxas -v`` (run by Triton, with Triton's flags) for registers,
spills, stack frame; Triton's metadata for shared memory; the TTGIR/PTX for the MMA kind and the atomics.

Shared by ``static_report.py`` (tables), ``roofline.py`` (GPU figures) and ``tests/test_gpu_compile.py``.
Import this before anything imports triton with ``TRITON_INTERPRET=1``: interpreted kernels cannot compile.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import multiprocessing
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from unittest import mock

from fake_cuda import fake_cuda
from gpu_specs import (
    ARCH_GPU,
    ARCHS,
    GPUS,
    IMPLS,
    MAX_CTAS_PER_SM,
    MAX_THREADS_PER_SM,
    REGS_PER_SM,
    RESERVED_SMEM_PER_CTA,
    Shape,
)


@dataclass
class Launch:
    """One captured launch: what ``triton.compile`` needs, plus the grid and where it came from."""

    shape: str
    variant: str
    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    grid: tuple[int, int, int]

    def config(self) -> str:
        """The tuning knobs of this launch: its block-size constexprs, warps and stages."""
        names = list(self.signature)
        knobs = [
            f"{names[path[0]]}={value}"
            for path, value in self.constexprs.items()
            if re.match(r"(BLOCK|GROUP|NUM|CHUNK)(_|$)", names[path[0]])
        ]
        return " ".join(knobs + [f"w{self.options['num_warps']}", f"s{self.options['num_stages']}"])

    def compile_key(self, arch: str) -> tuple:
        return (arch, self.module, self.kernel, repr(self.signature), repr(self.constexprs),
                repr(self.attrs), repr(sorted(self.options.items())))  # fmt: skip


@dataclass
class Report:
    """What the compiled kernel shows, for one launch on one arch."""

    launch: Launch
    arch: str
    sms: int
    error: str | None = None
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0
    num_warps: int = 0
    dots: int = 0
    wgmma_dots: int = 0
    mma_kind: str = "-"
    atomics: dict = field(default_factory=dict)

    @property
    def ctas_per_sm(self) -> int:
        """Resident CTAs per SM, from threads, registers (allocated per warp in 256s) and shared memory."""
        if self.error or not self.num_warps:
            return 0
        by_threads = MAX_THREADS_PER_SM // (32 * self.num_warps)
        regs_per_warp = math.ceil(max(self.regs, 1) * 32 / 256) * 256
        by_regs = (REGS_PER_SM // regs_per_warp) // self.num_warps
        by_smem = ARCHS[self.arch].smem_per_sm // (self.shared + RESERVED_SMEM_PER_CTA)
        return min(by_threads, by_regs, by_smem, MAX_CTAS_PER_SM)

    @property
    def waves(self) -> float:
        ctas = self.ctas_per_sm
        return math.prod(self.launch.grid) / (self.sms * ctas) if ctas else float("inf")

    def describe(self) -> str:
        """Names the launch for a failure message: kernel, arch, shape, variant and config."""
        x = self.launch
        return f"{x.kernel} on {self.arch}, shape {x.shape}, {x.variant}, config [{x.config()}]"

    def violations(self) -> list[str]:
        """Why this compile fails the static gate (empty when it passes)."""
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded")
        if self.stack:
            out.append(f"{self.stack} B stack frame")
        limit = ARCHS[self.arch].smem_per_block
        if self.shared > limit:
            out.append(f"shared memory {self.shared} B over the {limit} B per-block limit")
        if self.arch == "sm90a" and self.dots > self.wgmma_dots:
            out.append(f"{self.dots - self.wgmma_dots} of {self.dots} dots did not lower to wgmma")
        return out

    def to_dict(self) -> dict:
        row = asdict(self)
        row["launch"] = {
            k: v for k, v in row["launch"].items() if k not in ("constexprs", "attrs", "options")
        }
        row.update(config=self.launch.config(), ctas_per_sm=self.ctas_per_sm, waves=self.waves,
                   violations=self.violations(), describe=self.describe())  # fmt: skip
        return row


# --------------------------------------------------------------------------------------------------
# Capture: the launchers' own launches, on fake CUDA tensors
# --------------------------------------------------------------------------------------------------


class _Pointer:
    """What Triton's specializer needs of a tensor argument: its dtype and an address with its alignment.

    Fake tensors have no address; CUDA allocations are 512-byte aligned, so the address is the base plus
    the storage offset, which keeps the 16-byte divisibility hint faithful for views.
    """

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._ptr = 1 << 20 | tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._ptr


def _ops_modules() -> list:
    import fastdpo.ops

    for info in pkgutil.iter_modules(fastdpo.ops.__path__):
        importlib.import_module(f"fastdpo.ops.{info.name}")
    return [m for name, m in sorted(sys.modules.items()) if name.startswith("fastdpo.ops.") and m]


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class Capture:
    """Runs launcher calls for one arch with every Triton launch recorded instead of executed."""

    def __init__(self, arch: str):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.sms = GPUS[ARCH_GPU[arch]].sms
        self.backend = make_backend(GPUTarget("cuda", ARCHS[arch].capability, 32))
        self.launches: list[Launch] = []
        self.shape = "-"
        self.variant = "-"
        self._binders: dict = {}

    def _run(self, fn, *args, grid, warmup, **kwargs):
        from triton.runtime.jit import create_function_from_signature

        if fn not in self._binders:
            self._binders[fn] = create_function_from_signature(fn.signature, fn.params, self.backend)
        args = [_Pointer(a) if hasattr(a, "storage_offset") else a for a in args]
        kwargs = {k: _Pointer(v) if hasattr(v, "storage_offset") else v for k, v in kwargs.items()}
        kwargs.setdefault("debug", fn.debug or False)
        bound, specialization, options = self._binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(
            self.backend, kwargs, bound, specialization, options
        )
        if warmup:  # a compile-only call (e.g. to read the occupancy); the launch that follows is captured
            return None
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        self.launches.append(
            Launch(self.shape, self.variant, fn.__module__, fn.__name__, signature, constexprs, attrs,
                   dict(options.__dict__), grid)
        )  # fmt: skip
        return None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Patches launches, the launchers' SM count and autotune timing; builds tensors as fake CUDA ones."""
        import torch
        import triton.testing
        from torch._library.custom_ops import CustomOpDef
        from triton.runtime.jit import JITFunction

        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise RuntimeError(
                "ahead-of-time compiles need TRITON_INTERPRET unset (interpreted kernels cannot)"
            )
        capture = self
        timings = iter(range(1, 1 << 30))

        def run(fn, *args, grid, warmup, **kwargs):
            return capture._run(fn, *args, grid=grid, warmup=warmup, **kwargs)

        def fake_bench(fn, *args, **kwargs):
            fn()
            return float(next(timings))

        with contextlib.ExitStack() as stack:
            stack.enter_context(_patched(JITFunction, "run", run))
            stack.enter_context(_patched(triton.testing, "do_bench", fake_bench))
            for module in _ops_modules():
                if callable(getattr(module, "num_sms", None)):
                    stack.enter_context(_patched(module, "num_sms", lambda device: self.sms))
                if callable(getattr(module, "do_bench", None)):
                    stack.enter_context(_patched(module, "do_bench", fake_bench))
                # Autotune caches are per process; a second arch must see every candidate again.
                for name, value in vars(module).items():
                    if "autotune" in name.lower() and isinstance(value, dict):
                        value.clear()
                # On fake tensors a registered op runs its fake and launches nothing: the ops' own bodies
                # run instead, and wrap_triton's launches as plain ones (its traced launch would be a
                # no-op on fake tensors too).
                for name, value in list(vars(module).items()):
                    if isinstance(value, CustomOpDef):
                        stack.enter_context(_patched(module, name, value._init_fn))
            stack.enter_context(_patched(torch.library, "wrap_triton", lambda kernel: kernel))
            stack.enter_context(fake_cuda())
            yield

    def record(self, shape: str, variant: str, call: Callable[[], object]) -> None:
        self.shape, self.variant = shape, variant
        call()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _head_variants(shape: Shape, impls: tuple[str, ...]) -> list[tuple[str, Callable[[], object]]]:
    """(variant, call) for every head launch of ``impls``: forward with and without statistics; backward
    filtered, unfiltered and dH-only (a frozen head). The chunked impl's backward fold ignores both."""
    import torch

    from fastdpo.ops import _head
    from fastdpo.ops.linear_logprobs import filter_threshold, logprobs_backward, logprobs_forward

    dtype = getattr(torch, shape.dtype)
    h = torch.empty(shape.n, shape.d, dtype=dtype, device="cuda")
    w = torch.empty(shape.v, shape.d, dtype=dtype, device="cuda")
    b = torch.empty(shape.v, dtype=dtype, device="cuda") if shape.bias else None
    t = torch.empty(shape.n, dtype=torch.long, device="cuda")
    g = torch.empty(shape.n, dtype=torch.float32, device="cuda")
    eps = filter_threshold("auto", dtype)
    out = []
    for impl in impls:
        kw = dict(temperature=1.0, softcap=shape.softcap, backend="triton", impl=impl)

        def fwd(stats, kw=kw):
            return lambda: logprobs_forward(h, w, b, t, stats=stats, **kw)

        def bwd(filter_eps, needs, kw=kw):
            def call():
                # fp16's dz scale reads the gradient's peak (``.item()``), which fake tensors do not hold;
                # it reaches the kernels as a plain fp32 argument, so its value does not change the code.
                scale = 2.0**10 if dtype == torch.float16 else 1.0
                with mock.patch.object(_head, "dz_scale", lambda *_: scale):
                    return logprobs_backward(
                        g, h, w, b, t, g, filter_eps=filter_eps, needs_input_grad=needs, **kw
                    )

            return call

        out += [(f"{impl} fwd", fwd(False)), (f"{impl} fwd stats", fwd(True))]
        out += [(f"{impl} bwd", bwd(eps if impl == "fused" else 0.0, (True, True, True)))]
        if impl == "fused":
            out += [(f"{impl} bwd-nofilter", bwd(0.0, (True, True, True))), (f"{impl} bwd-dh-only",
                    bwd(eps, (True, False, False)))]  # fmt: skip
    return out


def _loss_variants() -> list[tuple[str, Callable[[], object]]]:
    """The sequence-level loss kernels: DPO-family for the default loss and for every fused type at once;
    KTO with and without a reference."""
    import torch

    from fastdpo.ops import kto_loss as kto
    from fastdpo.ops import preference_loss as pl

    seqs = torch.empty(64, dtype=torch.float32, device="cuda")
    desirable = torch.empty(64, dtype=torch.bool, device="cuda")
    kl = torch.empty(1, dtype=torch.float32, device="cuda")
    types = tuple(pl.KERNEL_LOSS_BITS)
    every = pl.PreferenceLossConfig(loss_types=types, loss_weights=(1.0,) * len(types), label_smoothing=0.1)
    return [
        ("loss sigmoid", lambda: pl.preference_loss_triton(seqs, seqs, seqs, pl.PreferenceLossConfig())),
        ("loss all types", lambda: pl.preference_loss_triton(seqs, seqs, seqs, every)),
        ("loss kto", lambda: kto.kto_loss_triton(seqs, seqs, desirable, kl, kto.KTOLossConfig())),
        ("loss kto no ref", lambda: kto.kto_loss_triton(seqs, None, desirable, kl, kto.KTOLossConfig())),
    ]


def capture_launches(
    shapes: list[Shape], arch: str, autotune: bool = True, loss: bool = True
) -> list[Launch]:
    """Every launch the launchers make at ``shapes`` on ``arch``; with ``autotune``, every candidate too."""
    cap = Capture(arch)
    with cap.active():
        for shape in shapes:
            for variant, call in _head_variants(shape, IMPLS):
                cap.record(shape.name, variant, call)
            if autotune:
                with _env("FASTDPO_AUTOTUNE", "1"):
                    for variant, call in _head_variants(shape, ("fused",)):
                        cap.record(shape.name, f"autotune {variant}", call)
        if loss:
            for variant, call in _loss_variants():
                cap.record("-", variant, call)
    unique = {(x.shape, x.variant, x.compile_key(arch), x.grid): x for x in cap.launches}
    return list(unique.values())


# --------------------------------------------------------------------------------------------------
# Compile and read back
# --------------------------------------------------------------------------------------------------

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_ATOMIC_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom|red)\.([\w.]+)", re.M)
_SEMANTICS = ("relaxed", "acquire", "release", "acq_rel", "sc")


def _atomics(ptx: str) -> dict:
    """Static counts of atomic instructions by opcode and memory semantics, e.g. ``{"red.relaxed": 4}``."""
    counts: dict[str, int] = {}
    for op, rest in _ATOMIC_RE.findall(ptx):
        sem = next((s for s in rest.split(".") if s in _SEMANTICS), "relaxed")
        counts[f"{op}.{sem}"] = counts.get(f"{op}.{sem}", 0) + 1
    return counts


def _compile(fn, launch: Launch, target):
    """``(compiled, ptxas -v log)``. Triton runs ptxas with its own flags and prints the log when asked; on
    a disk-cache hit it runs nothing, so then its ``make_cubin`` is rerun on the cached PTX for the log."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend

    buf = io.StringIO()
    with _patched(knobs.nvidia, "dump_ptxas_log", True), contextlib.redirect_stdout(buf):
        compiled = triton.compile(
            ASTSource(fn, launch.signature, launch.constexprs, launch.attrs),
            target=target,
            options=launch.options,
        )
        if "Compiling entry function" not in buf.getvalue():
            backend = make_backend(target)
            backend.make_cubin(compiled.asm["ptx"], {}, backend.parse_options(launch.options), target.arch)
    return compiled, buf.getvalue()


def _first_and_last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""


def compile_launch(job: tuple[Launch, str, int]) -> Report:
    """Compiles one launch for one arch and reads back registers, spills, memory, MMA and atomics."""
    from triton.backends.compiler import GPUTarget

    launch, arch, sms = job
    report = Report(launch, arch, sms)
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    try:
        compiled, log = _compile(fn, launch, GPUTarget("cuda", ARCHS[arch].capability, 32))
    except Exception as e:  # noqa: BLE001 - the gate reports any failure of the toolchain as a compile error
        report.error = f"{type(e).__name__}: {_first_and_last_line(str(e))}"[:500]
        return report
    for name, pattern in _PTXAS_RE.items():
        found = pattern.search(log)
        setattr(report, name, int(found.group(1)) if found else 0)
    report.shared = int(compiled.metadata.shared)
    report.num_warps = int(compiled.metadata.num_warps)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    report.wgmma_dots = len(re.findall(r"\bttng\.warp_group_dot\b", ttgir))
    report.dots = report.wgmma_dots + len(re.findall(r"\btt\.dot\b(?!_)", ttgir))
    if "wgmma.mma_async" in ptx:
        report.mma_kind = "wgmma"
    elif "mma.sync" in ptx:
        report.mma_kind = "mma.sync"
    elif report.dots:
        report.mma_kind = "fma"
    report.atomics = _atomics(ptx)
    return report


def ptxas_available() -> str | None:
    """The reason ahead-of-time compiles cannot run here, or None when the wheel's ptxas is usable."""
    from triton import knobs

    for tool in (knobs.nvidia.ptxas, knobs.nvidia.ptxas_blackwell):
        try:
            path = tool.path
        except Exception as e:  # noqa: BLE001 - a missing tool raises from deep inside knobs
            return f"the triton wheel ships no usable ptxas ({e})"
        if not path or not os.path.exists(path):
            return f"the triton wheel ships no ptxas at {path!r}"
    return None


def compile_all(launches_by_arch: dict[str, list[Launch]], jobs: int = 2) -> list[Report]:
    """Compiles every distinct launch once (a process pool of ``jobs``); one report per launch."""
    unique: dict[tuple, tuple[Launch, str, int]] = {}
    for arch, launches in launches_by_arch.items():
        for launch in launches:
            unique.setdefault(launch.compile_key(arch), (launch, arch, GPUS[ARCH_GPU[arch]].sms))
    jobs_list = list(unique.values())
    if jobs > 1 and len(jobs_list) > 1:
        # fork: children inherit the imported kernels; they only compile, so torch's threads play no part.
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            compiled = list(pool.map(compile_launch, jobs_list))
    else:
        compiled = [compile_launch(j) for j in jobs_list]
    by_key = {key: rep for key, rep in zip(unique, compiled, strict=True)}
    out = []
    for arch, launches in launches_by_arch.items():
        for launch in launches:
            rep = by_key[launch.compile_key(arch)]
            out.append(Report(**{**rep.__dict__, "launch": launch}))
    return out
