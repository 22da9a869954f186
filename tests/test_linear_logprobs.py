"""linear_logprobs against a float64 reference: values and every gradient, both backends.

Tolerance rule: the op's max error against float64 is at most twice plain PyTorch's own error in the same
dtype (full logits, log-softmax in fp32), plus a floor of a few ulp of the dtype at the output's scale.
"""

import os

import pytest
import torch

from fastdpo import linear_logprobs
from fastdpo.ops.linear_logprobs import filter_threshold, logprobs_backward, logprobs_forward
from fastdpo.reference import linear_logprobs_reference

IGNORE = -100
BACKENDS = ["torch", "triton"]
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cuda = pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs a CUDA GPU")


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


def _check(backend, dtype, shape, d, v, *, bias=False, softcap=None, temperature=1.0, filter_eps=None):
    device = _device(backend)
    hidden, weight, b, targets = _make(shape, d, v, dtype, device, bias=bias)
    grad_out = torch.randn(shape, dtype=torch.float64)
    opts = dict(ignore_index=IGNORE, temperature=temperature, softcap=softcap)

    out, grads = _grads(
        lambda h, w, bb: linear_logprobs(h, w, targets, bb, filter_eps=filter_eps, backend=backend, **opts),
        (hidden, weight, b), grad_out,
    )  # fmt: skip
    ref, ref_grads = _grads(
        lambda h, w, bb: linear_logprobs_reference(h, w, targets, bb, **opts),
        [x.double() if x is not None else None for x in (hidden, weight, b)], grad_out,
    )  # fmt: skip
    plain, plain_grads = _grads(
        lambda h, w, bb: linear_logprobs_reference(h, w, targets, bb, **opts), (hidden, weight, b), grad_out
    )

    assert out.dtype == torch.float64 and out.shape == targets.shape
    ignored = (targets == IGNORE).cpu()
    assert torch.all(out[ignored] == 0.0), "ignored targets must give exactly 0.0"
    eps = torch.finfo(dtype).eps
    for name, got, want, base in [("logp", out, ref, plain)] + [
        (n, g, r, p)
        for n, g, r, p in zip(("dhidden", "dweight", "dbias"), grads, ref_grads, plain_grads, strict=True)
    ]:
        if want is None:
            continue
        err = (got - want).abs().max().item()
        plain_err = (base - want).abs().max().item()
        floor = 4 * eps * want.abs().max().item()
        assert err <= 2 * plain_err + floor, f"{name}: error {err:.3g} vs plain PyTorch {plain_err:.3g}"
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v", [1000, 4099])
def test_matches_float64(backend, dtype, v):
    _check(backend, dtype, (3, 13), 48, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(bias=True),
        dict(softcap=3.0),
        dict(temperature=0.7),
        dict(bias=True, softcap=2.0, temperature=1.3),
    ],
)
def test_bias_softcap_temperature(backend, opts):
    _check(backend, torch.float32, (29,), 48, 1000, **opts)


def test_bfloat16_torch_backend():
    _check("torch", torch.bfloat16, (2, 11), 48, 1000, bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = _device(backend)
    hidden, weight, _, targets = _make((6, 20), 96, 777, torch.float32, device)
    h = hidden[:, ::2, ::2]
    w = weight[:, ::2]
    t = targets[:, ::2]
    assert not h.is_contiguous() and not w.is_contiguous()
    out = linear_logprobs(h, w, t, backend=backend)
    ref = linear_logprobs_reference(h.double(), w.double(), t)
    assert torch.allclose(out.double().cpu(), ref.cpu(), atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_prefilled_outputs_do_not_leak(backend, monkeypatch):
    """Every output element is written: buffers pre-filled with NaN give the same result."""
    device = _device(backend)
    hidden, weight, _, targets = _make((40,), 48, 1000, torch.float32, device)
    expected = linear_logprobs(hidden, weight, targets, backend=backend)
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_empty_like(*args, **kwargs):
        out = real_empty_like(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    got = linear_logprobs(hidden, weight, targets, backend=backend)
    assert torch.isfinite(got).all()
    assert torch.equal(got, expected)


def test_triton_vocab_splits_fold_exactly():
    """Several vocab splits (as on a large GPU) give the single-split result."""
    from fastdpo.ops.linear_logprobs import _triton_forward

    if not _INTERPRET:
        pytest.skip("split count is forced only for the interpreter check")
    hidden, weight, _, targets = _make((50,), 48, 1000, torch.float32, "cpu", ignore_frac=0.0)
    targets[0] = 5
    one = _triton_forward(hidden, weight, None, targets, 1.0, None, num_splits=1)
    three = _triton_forward(hidden, weight, None, targets, 1.0, None, num_splits=3)
    for a, b in zip(one, three, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_all_targets_ignored_gives_zeros_and_zero_grads():
    hidden, weight, _, targets = _make((4, 5), 48, 300, torch.float32, "cpu")
    targets.fill_(IGNORE)
    hidden.requires_grad_()
    weight.requires_grad_()
    out = linear_logprobs(hidden, weight, targets, backend="torch")
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(
        weight.grad, torch.zeros_like(weight)
    )


def test_gradient_filtering_changes_little_and_only_small_tiles():
    """Filtering skips tiles of tiny probabilities: a big threshold visibly changes dW, auto barely does."""
    if not _INTERPRET:
        pytest.skip("CPU interpreter check; the GPU suite covers filtering at real shapes")
    torch.manual_seed(0)
    m, d, v = 64, 32, 2048
    hidden = torch.randn(m, d) * 3
    weight = torch.randn(v, d)
    targets = torch.randint(0, v, (m,))
    grad = torch.randn(m)
    logp, lse = logprobs_forward(hidden, weight, None, targets, backend="triton")
    exact = logprobs_backward(grad, hidden, weight, None, targets, lse, backend="triton", filter_eps=0.0)
    auto = logprobs_backward(
        grad, hidden, weight, None, targets, lse, backend="triton",
        filter_eps=filter_threshold("auto", torch.bfloat16),
    )  # fmt: skip
    coarse = logprobs_backward(grad, hidden, weight, None, targets, lse, backend="triton", filter_eps=0.5)
    scale = exact[1].abs().max()
    auto_err = (auto[1] - exact[1]).abs().max() / scale
    coarse_err = (coarse[1] - exact[1]).abs().max() / scale
    assert auto_err < 2**-8, f"auto filtering moved dW by {auto_err:.3g} of its scale (bf16 resolution 2^-8)"
    assert coarse_err > 10 * auto_err, "a coarse threshold must visibly change the gradient"


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
    with pytest.raises(ValueError, match="filter_eps"):
        linear_logprobs(hidden, weight, targets, backend="triton" if _INTERPRET else "torch", filter_eps="x")


# --------------------------------------------------------------------------------------------------
# GPU, real shapes
# --------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(
    "d, v, softcap, dtype",
    [
        (4096, 128256, None, torch.bfloat16),
        (3584, 256000, 30.0, torch.bfloat16),
        (4096, 128256, None, torch.float16),
        (4096, 128256, None, torch.float32),
    ],
)
def test_gpu_real_shapes(d, v, softcap, dtype):
    """Against float64 at Llama-3 / Gemma-2 head shapes (float64 reference on the GPU, N kept small)."""
    if _INTERPRET:
        pytest.skip("real shapes run on the GPU only")
    _check(
        "triton", dtype, (1023,), d, v, softcap=softcap, filter_eps="auto" if dtype != torch.float32 else None
    )


@cuda
@pytest.mark.gpu
def test_gpu_long_sequence_rows_match_float64():
    """64k tokens (N*V past 2^31): the first and last rows' values and dhidden match float64."""
    if _INTERPRET:
        pytest.skip("real shapes run on the GPU only")
    n, d, v = 65536, 4096, 128256
    hidden, weight, _, targets = _make((n,), d, v, torch.bfloat16, "cuda", ignore_frac=0.1)
    hidden.requires_grad_()
    out = linear_logprobs(hidden, weight, targets, backend="triton", filter_eps=None)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_over_64k(backend):
    _check(backend, torch.float32, (7,), 24, 70001, bias=True)
