"""Softmax moments (the torch backend's statistics pass): C++ == numpy twin bit for bit, float64 reference."""

import os

import numpy as np
import pytest
import torch

from fastdpo.ops import _moments
from fastdpo.ops._moments import softmax_moments, softmax_moments_numpy

HAS_CPP = _moments._C is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastdpo._C not built")


def _chunk(n, c, seed, *, row_pad=0):
    """fp32 logits ``[n, c]`` (rows strided if ``row_pad``) and ``e = exp(z - max)``, as the fold has them."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, c + row_pad, generator=g) * 4)[:, :c]
    e = torch.empty(n, c + row_pad)[:, :c]
    if n and c:
        torch.sub(z, z.amax(-1, keepdim=True), out=e).exp_()
    return z, e


def _reference(z, e):
    z64, e64 = z.double(), e.double()
    return torch.stack([z64.sum(-1), (e64 * z64).sum(-1), (e64 * e64).sum(-1)])


def _plain(z, e):
    return torch.stack([z.sum(-1), (e * z).sum(-1), (e * e).sum(-1)])


def test_extension_is_built_unless_opted_out():
    """The C++ tests below skip without the extension; CI must not skip them by accident."""
    if os.environ.get("FASTDPO_NO_EXT") == "1":
        pytest.skip("built with FASTDPO_NO_EXT=1")
    assert HAS_CPP, "fastdpo._C is missing: pip install -e . builds it (pybind11 is a build requirement)"


@needs_cpp
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("c", [1, 15, 16, 17, 255, 256, 257, 1000, 4099])
def test_cpp_equals_numpy_twin_bitwise(c, seed):
    n = (1, 3, 37)[seed % 3]
    z, e = _chunk(n, c, seed, row_pad=seed % 2 * 5)
    out = torch.empty(3, n)
    _moments._C.softmax_moments(z.numpy(), e.numpy(), out.numpy(), 1 + seed % 2)
    np.testing.assert_array_equal(out.numpy(), softmax_moments_numpy(z.numpy(), e.numpy()))


@needs_cpp
def test_cpp_equals_twin_on_special_values_and_threads():
    """NaN, infinities and signed zeros take the same path; splitting rows over threads changes no bit."""
    z, e = _chunk(300, 4000, 7)
    z[0, 5], z[1, 9], z[2, 3], z[3] = float("nan"), float("inf"), float("-inf"), -0.0
    e[4, 100], e[5] = float("inf"), -0.0
    twin = softmax_moments_numpy(z.numpy(), e.numpy())
    for threads in (1, 2, 3):
        out = torch.empty(3, 300)
        _moments._C.softmax_moments(z.numpy(), e.numpy(), out.numpy(), threads)
        np.testing.assert_array_equal(out.numpy(), twin)
    assert np.isnan(twin[:2, 0]).all() and twin[0, 3] == 0 and not np.signbit(twin[0, 3])


def test_without_extension_the_twin_answers(monkeypatch):
    z, e = _chunk(5, 300, 3)
    monkeypatch.setattr(_moments, "_C", None)
    np.testing.assert_array_equal(softmax_moments(z, e).numpy(), softmax_moments_numpy(z.numpy(), e.numpy()))


@pytest.mark.parametrize("ext", [True, False], ids=["extension", "twin"])
def test_out_takes_a_column_slice(monkeypatch, ext):
    """``out=`` writes into a slice of a wider ``[3, N]`` (the fold's row blocks) and leaves the rest."""
    if ext and not HAS_CPP:
        pytest.skip("fastdpo._C not built")
    if not ext:
        monkeypatch.setattr(_moments, "_C", None)
    z, e = _chunk(7, 300, 4)
    wide = torch.full((3, 12), float("nan"))
    got = softmax_moments(z, e, out=wide[:, 2:9])
    assert got.data_ptr() == wide[:, 2:9].data_ptr()
    np.testing.assert_array_equal(wide[:, 2:9].numpy(), softmax_moments_numpy(z.numpy(), e.numpy()))
    assert wide[:, :2].isnan().all() and wide[:, 9:].isnan().all()


@pytest.mark.parametrize("n, c", [(0, 100), (4, 0), (3, 70001), (129, 4099)])
def test_matches_float64(n, c):
    """Within twice plain fp32 torch's own error (plus a few ulp) of the float64 sums."""
    z, e = _chunk(n, c, n + c)
    out, want, base = softmax_moments(z, e).double(), _reference(z, e), _plain(z, e).double()
    assert out.shape == (3, n) and out.dtype == torch.float64
    for k in range(3):
        err = (out[k] - want[k]).abs().max().item() if n else 0.0
        plain_err = (base[k] - want[k]).abs().max().item() if n else 0.0
        # Sums of mixed signs (k=0) are judged against the sum of magnitudes, as their error scales with it.
        scale = (z.double().abs().sum(-1).max().item() if k == 0 else want[k].abs().max().item()) if n else 1
        assert err <= 2 * plain_err + 4 * torch.finfo(torch.float32).eps * max(scale, 1.0), k


def test_refuses_arrays_it_cannot_read():
    if not HAS_CPP:
        pytest.skip("fastdpo._C not built")
    z, e = _chunk(4, 32, 0)
    out = torch.empty(3, 4)
    with pytest.raises(ValueError, match="same shape"):
        _moments._C.softmax_moments(z.numpy(), e[:, :16].numpy(), out.numpy(), 1)
    with pytest.raises(ValueError, match="contiguous rows"):
        _moments._C.softmax_moments(z.t().contiguous().t().numpy(), e.numpy(), out.numpy(), 1)
    with pytest.raises(ValueError, match=r"\[3, rows\]"):
        _moments._C.softmax_moments(z.numpy(), e.numpy(), torch.empty(2, 4).numpy(), 1)
    with pytest.raises(TypeError):
        _moments._C.softmax_moments(z.double().numpy(), e.numpy(), out.numpy(), 1)
