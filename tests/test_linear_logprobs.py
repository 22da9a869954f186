"""linear_logprobs against a float64 reference: values, every gradient and the statistics, all code paths.

Tolerance rule: the op's max error against float64 is at most twice plain PyTorch's own error in the same
dtype (full logits, log-softmax in fp32), plus a floor of a few ulp of the dtype at the output's scale.
Chunked paths run with small chunks (see ``small_chunks``), so that every test crosses chunk boundaries.
"""

import os

import pytest
import torch

from fastdpo import linear_logprobs
from fastdpo.ops import _head_chunked, _head_triton
from fastdpo.ops.linear_logprobs import (
    filter_threshold,
    logprobs_backward,
    logprobs_forward,
    resolve_impl,
)
from fastdpo.reference import linear_logprobs_reference, token_stats_reference

IGNORE = -100
# (backend, impl). The torch backend runs the chunked code for both impls; it is tested once as "chunked".
PATHS = [("torch", "chunked"), ("triton", "fused"), ("triton", "chunked")]
PATH_IDS = ["torch", "triton-fused", "triton-chunked"]
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cuda = pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs a CUDA GPU")
STAT_NAMES = ("entropy", "mean_logit", "log_sum_p2")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """64 tokens x 384 vocab per chunk: interpreter-sized problems still span several chunks.

    Not fewer tokens: the CPU BLAS sums matmuls of a handful of rows less accurately than larger ones
    (up to 4x plain PyTorch's error at 16 rows in fp32), which says nothing about the chunked code. The
    torch fold's row blocks (``_FOLD_BLOCK_ELEMENTS``) are cut to 13 rows of 384, so chunks span several.
    """
    monkeypatch.setattr(_head_chunked, "_CHUNK_M", 64)
    monkeypatch.setattr(_head_chunked, "_MAX_CHUNK_V", 384)
    monkeypatch.setattr(_head_chunked, "_FOLD_BLOCK_ELEMENTS", 13 * 384)


def _device(backend: str) -> str:
    return "cpu" if (backend == "torch" or _INTERPRET) else "cuda"


def _make(shape, d, v, dtype, device, *, bias=False, ignore_frac=0.3, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.25
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignore_frac] = IGNORE
    targets.view(-1, shape[-1])[0] = IGNORE  # one fully ignored row
    cast = [x.to(dtype).to(device) if x is not None else None for x in (hidden, weight, b)]
    return (*cast, targets.to(device))


def _grads(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*leaves)
    (out.double() * grad_out.to(out.device)).sum().backward()
    return out.detach().double().cpu(), [x.grad.double().cpu() if x is not None else None for x in leaves]


def _assert_close(name, got, want, base, dtype):
    """``got`` within twice plain PyTorch's error (``base``) against float64 ``want``, plus a floor."""
    err = (got - want).abs().max().item()
    plain_err = (base - want).abs().max().item()
    floor = 4 * torch.finfo(dtype).eps * max(want.abs().max().item(), 1.0)
    assert err <= 2 * plain_err + floor, f"{name}: error {err:.3g} vs plain PyTorch {plain_err:.3g}"


def _check(path, dtype, shape, d, v, *, bias=False, softcap=None, temperature=1.0, filter_eps=None):
    backend, impl = path
    device = _device(backend)
    hidden, weight, b, targets = _make(shape, d, v, dtype, device, bias=bias)
    grad_out = torch.randn(shape, dtype=torch.float64)
    opts = dict(ignore_index=IGNORE, temperature=temperature, softcap=softcap)

    out, grads = _grads(
        lambda h, w, bb: linear_logprobs(
            h, w, targets, bb, filter_eps=filter_eps, backend=backend, impl=impl, **opts
        ),
        (hidden, weight, b), grad_out,
    )  # fmt: skip
    as64 = [x.double() if x is not None else None for x in (hidden, weight, b)]
    ref, ref_grads = _grads(
        lambda h, w, bb: linear_logprobs_reference(h, w, targets, bb, **opts), as64, grad_out
    )
    plain, plain_grads = _grads(
        lambda h, w, bb: linear_logprobs_reference(h, w, targets, bb, **opts), (hidden, weight, b), grad_out
    )

    assert out.dtype == torch.float64 and out.shape == targets.shape
    ignored = (targets == IGNORE).cpu()
    assert torch.all(out[ignored] == 0.0), "ignored targets must give exactly 0.0"
    names = ("logp", "dhidden", "dweight", "dbias")
    for name, got, want, base in zip(
        names, [out, *grads], [ref, *ref_grads], [plain, *plain_grads], strict=True
    ):
        if want is not None:
            _assert_close(name, got, want, base, dtype)
    return out, grads


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v", [1000, 4099])
def test_matches_float64(path, dtype, v):
    _check(path, dtype, (3, 13), 48, v)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(bias=True),
        dict(softcap=3.0),
        dict(temperature=0.7),
        dict(bias=True, softcap=2.0, temperature=1.3),
    ],
)
def test_bias_softcap_temperature(path, opts):
    _check(path, torch.float32, (97,), 48, 1000, **opts)  # two token chunks after dropping ignored ones


def test_bfloat16_torch_backend():
    _check(("torch", "chunked"), torch.bfloat16, (2, 11), 48, 1000, bias=True)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_vocab_over_64k(path):
    _check(path, torch.float32, (7,), 24, 70001, bias=True)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, softcap=2.0, temperature=0.7)])
def test_stats_match_float64(path, opts):
    backend, impl = path
    bias = opts.pop("bias", False)
    hidden, weight, b, targets = _make((3, 37), 40, 1500, torch.float32, _device(backend), bias=bias)
    got = linear_logprobs(hidden, weight, targets, b, backend=backend, impl=impl, stats=True, **opts)
    as64 = [x.double() if x is not None else None for x in (hidden, weight, b)]
    ref = token_stats_reference(as64[0], as64[1], targets, as64[2], **opts)
    plain = token_stats_reference(hidden, weight, targets, b, **opts)
    logp_ref = linear_logprobs_reference(as64[0], as64[1], targets, as64[2], **opts)
    assert torch.allclose(got.logps.double(), logp_ref, atol=1e-5)
    for name in STAT_NAMES:
        value = getattr(got, name)
        assert value.dtype == torch.float32 and not value.requires_grad
        _assert_close(name, value.double().cpu(), ref[name].cpu(), plain[name].double().cpu(), torch.float32)
    ignored = targets == IGNORE
    assert got.is_argmax.dtype == torch.bool and not got.is_argmax[ignored].any()
    assert all(torch.all(getattr(got, n)[ignored] == 0) for n in STAT_NAMES)
    # Where float64's top two logits are clearly apart, the argmax flags must agree exactly.
    z = as64[0] @ as64[1].T + (as64[2] if as64[2] is not None else 0)
    top2 = z.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3
    assert torch.equal(got.is_argmax[clear], ref["is_argmax"][clear])


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_is_argmax_ties_go_to_the_first_maximum(path):
    """Two identical weight rows tie for the maximum: only the first counts, as in ``torch.argmax``."""
    backend, impl = path
    d, v = 16, 900
    hidden = torch.ones(4, d)
    weight = torch.randn(v, d, generator=torch.Generator().manual_seed(0)) * 0.01
    weight[[100, 700]] = 1.0  # rows 100 and 700 in different vocab chunks, tiles and splits
    targets = torch.tensor([100, 700, 5, IGNORE])
    dev = _device(backend)
    got = linear_logprobs(
        hidden.to(dev), weight.to(dev), targets.to(dev), backend=backend, impl=impl, stats=True
    )
    assert got.is_argmax.tolist() == [True, False, False, False]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("others", [0, 3], ids=["all-rows-tied", "few-rows-tied"])
def test_is_argmax_ties_inside_one_chunk(path, others):
    """Weight rows 400 and 500 tie inside one vocab chunk (the torch fold scans all rows, or copies few)."""
    backend, impl = path
    d, v = 16, 900
    hidden = torch.ones(2 + others, d)
    weight = torch.randn(v, d, generator=torch.Generator().manual_seed(1)) * 0.01
    weight[[400, 500]] = 1.0
    targets = torch.tensor([500, 400] + [5, 450, 899][:others])
    dev = _device(backend)
    got = linear_logprobs(
        hidden.to(dev), weight.to(dev), targets.to(dev), backend=backend, impl=impl, stats=True
    )
    assert got.is_argmax.tolist() == [False, True] + [False] * others


@pytest.mark.skipif(not _INTERPRET, reason="split count is forced only for the interpreter check")
def test_fused_vocab_splits_fold_exactly():
    """Several vocab splits (as on a large GPU) give the single-split result, statistics included."""
    from fastdpo.ops._head_common import combine_partials

    hidden, weight, _, targets = _make((50,), 48, 1000, torch.float32, "cpu", ignore_frac=0.0)
    targets[0] = 5
    kw = dict(temperature=1.0, softcap=None, stats=True, compute_dtype=torch.float32)
    one = combine_partials(
        _head_triton.fused_forward(hidden, weight, None, targets, num_splits=1, **kw), 1000
    )
    three = combine_partials(
        _head_triton.fused_forward(hidden, weight, None, targets, num_splits=3, **kw), 1000
    )
    for a, b in zip([*one[:2], *one[2]], [*three[:2], *three[2]], strict=True):
        assert torch.equal(a, b) if a.dtype == torch.bool else torch.allclose(a, b, atol=1e-5)


def test_stats_off_returns_a_plain_tensor():
    hidden, weight, _, targets = _make((9,), 16, 300, torch.float32, "cpu")
    assert isinstance(linear_logprobs(hidden, weight, targets, backend="torch"), torch.Tensor)
    assert len(logprobs_forward(hidden[:2], weight, None, targets[:2].clamp(min=0))) == 2


# --------------------------------------------------------------------------------------------------
# Mixed precision, determinism, fp16 underflow
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, amp_dtype",
    [(("torch", "chunked"), torch.bfloat16), (("triton", "chunked"), torch.bfloat16)]
    # The interpreter's bf16 dot is wrong (docs: FACTS), so the fused kernels are checked in fp16.
    + [(("triton", "fused"), torch.float16)],
    ids=["torch-bf16", "triton-chunked-bf16", "triton-fused-fp16"],
)
def test_autocast_takes_fp32_masters_and_returns_fp32_grads(path, amp_dtype):
    backend, impl = path
    hidden, weight, b, targets = _make((2, 9), 32, 1100, torch.float32, _device(backend), bias=True)
    grad_out = torch.randn(2, 9, dtype=torch.float64)

    def fast(h, w, bb):
        with torch.autocast(h.device.type, dtype=amp_dtype):
            return linear_logprobs(h, w, targets, bb, backend=backend, impl=impl, filter_eps=None)

    def plain(h, w, bb):
        return linear_logprobs_reference(h.to(amp_dtype), w.to(amp_dtype), targets, bb.to(amp_dtype))

    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, b)]
    with torch.autocast(hidden.device.type, dtype=amp_dtype):
        linear_logprobs(*leaves[:2], targets, leaves[2], backend=backend, impl=impl).sum().backward()
    assert all(x.grad.dtype == torch.float32 for x in leaves), "gradients come back in the dtypes passed"

    out, grads = _grads(fast, (hidden, weight, b), grad_out)
    as64 = [x.double() for x in (hidden, weight, b)]
    ref, ref_grads = _grads(lambda h, w, bb: linear_logprobs_reference(h, w, targets, bb), as64, grad_out)
    base, base_grads = _grads(plain, (hidden, weight, b), grad_out)
    for name, got, want, p in zip(
        ("logp", "dh", "dw", "db"), [out, *grads], [ref, *ref_grads], [base, *base_grads], strict=True
    ):
        _assert_close(name, got, want, p, amp_dtype)


def test_torch_backend_is_bitwise_trl_under_bf16_autocast(monkeypatch):
    """The torch backend rounds and sums as TRL 1.16's chunked head: bit-identical log-probs and gradients.

    The statistics differ from TRL's by a few ulp: their sums run in one pass, in fastdpo's own order.
    """
    chunked_logprob = pytest.importorskip("trl.kernels.chunked_logprob")
    monkeypatch.setattr(_head_chunked, "_CHUNK_M", 4096)
    monkeypatch.setattr(_head_chunked, "_MAX_CHUNK_V", 32768)
    hidden, weight, b, _ = _make((40,), 32, 33000, torch.float32, "cpu", bias=True)
    targets = torch.randint(0, 33000, (40,))  # TRL's CPU path scores every position: no ignored targets
    grad = torch.randn(40)
    results = []
    for run in ("trl", "fastdpo"):
        h, w, bb = (x.clone().requires_grad_() for x in (hidden, weight, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if run == "trl":
                names = chunked_logprob.OPTIONAL_OUTPUTS
                outs = chunked_logprob.ChunkedLogProbFunction.apply(
                    h, w, bb, targets, 0.9, 32768, 30.0, 1.0, names
                )
                logp, entropy, log_sum_p2, mean_logit, is_argmax = outs
            else:
                r = linear_logprobs(
                    h, w, targets, bb, temperature=0.9, softcap=30.0, backend="torch", stats=True
                )
                logp, entropy, log_sum_p2, mean_logit, is_argmax = (
                    r.logps, r.entropy, r.log_sum_p2, r.mean_logit, r.is_argmax
                )  # fmt: skip
        (logp * grad).sum().backward()
        results.append([logp, entropy, log_sum_p2, mean_logit, is_argmax, h.grad, w.grad, bb.grad])
    for name, a, c in zip(("logp", "ent", "lsp2", "mean", "argmax", "dh", "dw", "db"), *results, strict=True):
        if name in ("ent", "lsp2", "mean"):
            # The statistics' sums run in fastdpo's own order (one pass, csrc/softmax_moments.cpp).
            torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-6 * a.abs().max().item(), msg=name)
        else:
            assert torch.equal(a.detach(), c.detach()), name


@pytest.mark.parametrize("stats", [False, True])
def test_torch_fold_row_blocks_change_no_bit(monkeypatch, stats):
    """Every step of the torch fold is row-wise, so its row blocks (one row, or the whole chunk) are free."""
    hidden, weight, b, targets = _make((3, 37), 24, 1000, torch.float32, "cpu", bias=True)
    runs = []
    for block in (1, 10**9):
        monkeypatch.setattr(_head_chunked, "_FOLD_BLOCK_ELEMENTS", block)
        r = linear_logprobs(hidden, weight, targets, b, softcap=4.0, backend="torch", stats=stats)
        runs.append([r] if not stats else [r.logps, r.entropy, r.log_sum_p2, r.mean_logit, r.is_argmax])
    assert all(torch.equal(x, y) for x, y in zip(*runs, strict=True))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_is_bitwise_reproducible(backend):
    hidden, weight, b, targets = _make((2, 21), 40, 1300, torch.float32, _device(backend), bias=True)
    grad_out = torch.randn(2, 21, dtype=torch.float64)
    runs = [
        _grads(
            lambda h, w, bb: linear_logprobs(h, w, targets, bb, backend=backend, impl="chunked", softcap=5.0),
            (hidden, weight, b),
            grad_out,
        )  # fmt: skip
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(x, y) for x, y in zip(runs[0][1], runs[1][1], strict=True))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_fp16_dz_does_not_underflow(path):
    """Tiny upstream gradients times small probabilities fall below fp16's subnormals unless dz is scaled."""
    backend, impl = path
    dev = _device(backend)
    m, d, v = 12, 32, 800
    g = torch.Generator().manual_seed(1)
    # Hidden x64 and weight / 64 keep the logits but lift dW = dz.T @ H into fp16's normal range.
    hidden = torch.randn(m, d, generator=g, dtype=torch.float64) * 64
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / (64 * d**0.5)
    targets = torch.randint(0, v, (m,), generator=g)
    grad = torch.full((m,), 1e-5, dtype=torch.float64)  # g * p ~ 1e-8, below fp16's smallest subnormal
    h16, w16 = hidden.half().to(dev), weight.half().to(dev)
    logp, lse = logprobs_forward(h16, w16, None, targets.to(dev), backend=backend, impl=impl)
    _, dw, _ = logprobs_backward(
        grad.float().to(dev), h16, w16, None, targets.to(dev), lse, backend=backend, impl=impl,
        needs_input_grad=(False, True, False),
    )  # fmt: skip
    w64 = w16.double().cpu().requires_grad_()
    (linear_logprobs_reference(h16.double().cpu(), w64, targets) * grad).sum().backward()
    # Rows of the vocabulary that no token targets get only the tiny -g * p terms.
    untargeted = torch.ones(v, dtype=torch.bool)
    untargeted[targets] = False
    want = w64.grad[untargeted]
    rel = (dw.double().cpu()[untargeted] - want).abs().max() / want.abs().max()
    assert rel < 1e-2, f"dW relative error {rel:.3g} on untargeted rows: dz underflowed in fp16"


def test_resolve_impl(monkeypatch):
    monkeypatch.delenv("FASTDPO_IMPL", raising=False)
    assert resolve_impl() == "chunked"
    assert resolve_impl("fused") == "fused"
    monkeypatch.setenv("FASTDPO_IMPL", "fused")
    assert resolve_impl() == "fused"
    torch.use_deterministic_algorithms(True)
    try:
        assert resolve_impl() == "chunked", "deterministic mode picks the reproducible impl"
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("FASTDPO_IMPL", "tiled")
    with pytest.raises(ValueError, match="FASTDPO_IMPL"):
        resolve_impl()


# --------------------------------------------------------------------------------------------------
# Layout and special cases
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_non_contiguous_inputs(path):
    backend, impl = path
    hidden, weight, _, targets = _make((6, 20), 96, 777, torch.float32, _device(backend))
    h, w, t = hidden[:, ::2, ::2], weight[:, ::2], targets[:, ::2]
    assert not h.is_contiguous() and not w.is_contiguous()
    out = linear_logprobs(h, w, t, backend=backend, impl=impl)
    ref = linear_logprobs_reference(h.double(), w.double(), t)
    assert torch.allclose(out.double().cpu(), ref.cpu(), atol=2e-5)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_nan_prefilled_outputs_do_not_leak(path, nan_filled_empty):
    """Every output element is written: buffers pre-filled with NaN give the same result."""
    backend, impl = path
    hidden, weight, b, targets = _make((40,), 48, 1000, torch.float32, _device(backend), bias=True)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]

    def run():
        for x in leaves:
            x.grad = None
        out = linear_logprobs(*leaves[:2], targets, leaves[2], backend=backend, impl=impl, stats=True)
        out.logps.sum().backward()
        return [*out, *(x.grad for x in leaves)]

    expected = run()
    nan_filled_empty()
    got = run()
    assert all(not x.is_floating_point() or torch.isfinite(x).all() for x in got)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_all_targets_ignored_gives_zeros_and_zero_grads(path):
    backend, impl = path
    hidden, weight, _, targets = _make((4, 5), 48, 300, torch.float32, _device(backend))
    targets.fill_(IGNORE)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = linear_logprobs(hidden, weight, targets, backend=backend, impl=impl, stats=True)
    out.logps.sum().backward()
    assert all(torch.equal(x, torch.zeros_like(x)) for x in out)
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(
        weight.grad, torch.zeros_like(weight)
    )


@pytest.mark.skipif(
    not _INTERPRET, reason="CPU interpreter check; the GPU suite covers filtering at real shapes"
)
def test_gradient_filtering_changes_little_and_only_small_tiles():
    """Filtering skips tiles of tiny probabilities: a big threshold visibly changes dW, auto barely does."""
    torch.manual_seed(0)
    m, d, v = 64, 32, 2048
    hidden = torch.randn(m, d) * 3
    weight = torch.randn(v, d)
    targets = torch.randint(0, v, (m,))
    grad = torch.randn(m)
    kw = dict(backend="triton", impl="fused")
    logp, lse = logprobs_forward(hidden, weight, None, targets, **kw)
    exact = logprobs_backward(grad, hidden, weight, None, targets, lse, filter_eps=0.0, **kw)
    auto_eps = filter_threshold("auto", torch.bfloat16)
    auto = logprobs_backward(grad, hidden, weight, None, targets, lse, filter_eps=auto_eps, **kw)
    coarse = logprobs_backward(grad, hidden, weight, None, targets, lse, filter_eps=0.5, **kw)
    scale = exact[1].abs().max()
    auto_err = (auto[1] - exact[1]).abs().max() / scale
    coarse_err = (coarse[1] - exact[1]).abs().max() / scale
    assert auto_err < 2**-8, f"auto filtering moved dW by {auto_err:.3g} of its scale (bf16 resolution 2^-8)"
    assert coarse_err > 10 * auto_err, "a coarse threshold must visibly change the gradient"


def test_chunk_shape_respects_the_budget():
    cm, cv = _head_chunked.chunk_shape(100_000, 256_000, torch.device("cpu"))
    assert cm == 64 and cv == 384  # the fixture's small chunks
    assert _head_chunked.chunk_shape(5, 300, torch.device("cpu")) == (5, 300)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda h, w, t: (h[..., :-1], w, t), ValueError, "hidden size mismatch"),
        (lambda h, w, t: (h, w, t[:, :-1]), ValueError, "targets shape"),
        (lambda h, w, t: (h, w, t.float()), TypeError, "integer"),
        (lambda h, w, t: (h, w, torch.full_like(t, 300)), ValueError, r"outside \[0, V=300\)"),
        (lambda h, w, t: (h, w, torch.full_like(t, -5)), ValueError, "outside"),
        (lambda h, w, t: (h.half(), w, t), TypeError, "dtype"),
        (lambda h, w, t: (h.long(), w, t), TypeError, "float32, bfloat16 or float16"),
        (lambda h, w, t: (h[:0], w, t[:0]), ValueError, "empty"),
        (lambda h, w, t: (h, w[0], t), ValueError, r"\[V, D\]"),
    ],
)
def test_bad_input_errors(mutate, exc, match):
    hidden, weight, _, targets = _make((2, 5), 16, 300, torch.float32, "cpu")
    with pytest.raises(exc, match=match):
        linear_logprobs(*mutate(hidden, weight, targets))


def test_bad_options():
    hidden, weight, _, targets = _make((5,), 16, 300, torch.float32, "cpu")
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        linear_logprobs(hidden, weight, targets, softcap=-1.0)
    with pytest.raises(ValueError, match="bias"):
        linear_logprobs(hidden, weight, targets, torch.zeros(299))
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="impl"):
        linear_logprobs(hidden, weight, targets, impl="tiled")
    with pytest.raises(ValueError, match="filter_eps"):
        linear_logprobs(hidden, weight, targets, backend="torch", filter_eps="x")


# --------------------------------------------------------------------------------------------------
# GPU, real shapes
# --------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize(
    "d, v, softcap, dtype",
    [
        (4096, 128256, None, torch.bfloat16),
        (3584, 256000, 30.0, torch.bfloat16),
        (4096, 128256, None, torch.float16),
        (4096, 128256, None, torch.float32),
    ],
)
def test_gpu_real_shapes(d, v, softcap, dtype, impl, monkeypatch):
    """Against float64 at Llama-3 / Gemma-2 head shapes (float64 reference on the GPU, N kept small)."""
    if _INTERPRET:
        pytest.skip("real shapes run on the GPU only")
    monkeypatch.undo()  # production chunk sizes
    eps = "auto" if dtype != torch.float32 else None
    _check(("triton", impl), dtype, (1023,), d, v, softcap=softcap, filter_eps=eps)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_gpu_long_sequence_rows_match_float64(impl, monkeypatch):
    """64k tokens (N*V past 2^31): the first and last rows' values and dhidden match float64."""
    if _INTERPRET:
        pytest.skip("real shapes run on the GPU only")
    monkeypatch.undo()
    n, d, v = 65536, 4096, 128256
    hidden, weight, _, targets = _make((n,), d, v, torch.bfloat16, "cuda", ignore_frac=0.1)
    hidden.requires_grad_()
    out = linear_logprobs(hidden, weight, targets, backend="triton", impl=impl, filter_eps=None)
    out.sum().backward()
    for rows in (slice(0, 256), slice(n - 256, n)):
        h64 = hidden[rows].detach().double().requires_grad_()
        ref = linear_logprobs_reference(h64, weight.double(), targets[rows])
        ref.sum().backward()
        plain_h = hidden[rows].detach().clone().requires_grad_()
        plain = linear_logprobs_reference(plain_h, weight, targets[rows])
        plain.sum().backward()
        assert (out[rows].double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max() + 1e-6
        dh_err = (hidden.grad[rows].double() - h64.grad).abs().max()
        assert dh_err <= 2 * (plain_h.grad.double() - h64.grad).abs().max() + 1e-6
