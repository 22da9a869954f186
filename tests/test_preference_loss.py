"""The pair-loss op: the Triton kernel against the float64 torch path, dispatch, validation, NaN handling."""

import os

import pytest
import torch

from fastdpo.ops.preference_loss import (
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCE_TYPES,
    KERNEL_LOSS_BITS,
    PAIR_LOSS_TYPES,
    PreferenceLossConfig,
    preference_loss,
    preference_loss_torch,
    preference_loss_triton,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
REFERENCE_FREE = ("simpo", "orpo")


def _device(backend: str) -> str:
    return "cpu" if (backend == "torch" or _INTERPRET) else "cuda"


def _inputs(num_pairs: int, loss_type: str, *, scale: float = 1.0, seed: int | None = None):
    """Float64 ``(policy, ref, lengths)``; reference-free types get averaged log-probs and no reference."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    lengths = torch.randint(1, 40, (2 * num_pairs,), generator=g).double()
    ref = -lengths * (1.0 + 2.0 * torch.rand(2 * num_pairs, generator=g, dtype=torch.float64))
    policy = ref + scale * torch.randn(2 * num_pairs, generator=g, dtype=torch.float64)
    if loss_type in REFERENCE_FREE:
        return -torch.rand(2 * num_pairs, generator=g, dtype=torch.float64) * 3 - 0.01, None, lengths
    return policy, ref, lengths


def _config(loss_type: str, **kw) -> PreferenceLossConfig:
    opts = dict(beta=0.3, label_smoothing=0.1, simpo_gamma=0.4, discopop_tau=0.05)
    opts.update(kw)
    return PreferenceLossConfig(loss_types=(loss_type,), loss_weights=(0.7,), **opts)


def _assert_matches(got, want, *, rtol=2e-5, atol=2e-6):
    for name in ("losses", "coefs", "rewards", "log_odds"):
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert g is None, name
            continue
        g = g.double().cpu()
        scale = w.abs().max().item()
        err = (g - w).abs().max().item()
        assert err <= atol + rtol * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_triton_matches_float64_torch(loss_type):
    policy, ref, lengths = _inputs(13, loss_type)
    config = _config(loss_type)
    want = preference_loss_torch(policy, ref, lengths, config)
    assert want.losses.dtype == torch.float64 and torch.isfinite(want.losses).all()
    dev = _device("triton")
    got = preference_loss(
        policy.float().to(dev),
        None if ref is None else ref.float().to(dev),
        lengths.float().to(dev),
        config,
        backend="triton",
    )
    assert got.losses.shape == (13,) and got.coefs.shape == (26,) and got.rewards.shape == (26,)
    _assert_matches(got, want)


@pytest.mark.parametrize("f_divergence", [f for f in F_DIVERGENCE_TYPES if f != "reverse_kl"])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSS_TYPES - {"sft"}))
def test_f_divergences_triton_matches_torch(loss_type, f_divergence):
    policy, ref, lengths = _inputs(9, loss_type, scale=0.5)
    config = _config(loss_type, f_divergence_type=f_divergence, f_alpha_divergence_coef=0.3)
    want = preference_loss_torch(policy, ref, lengths, config)
    dev = _device("triton")
    got = preference_loss(policy.to(dev), ref.to(dev), lengths.to(dev), config, backend="triton")
    _assert_matches(got, want)


def test_coefficients_are_the_gradient_of_the_mean_loss():
    policy, ref, lengths = _inputs(6, "sigmoid")
    config = PreferenceLossConfig(loss_types=("sigmoid",), loss_weights=(1.0,), beta=0.5)
    out = preference_loss_torch(policy, ref, lengths, config)
    leaf = policy.clone().requires_grad_()
    c, r = leaf.chunk(2)
    rc, rr = ref.chunk(2)
    loss = -torch.nn.functional.logsigmoid(0.5 * ((c - rc) - (r - rr))).mean()
    loss.backward()
    torch.testing.assert_close(out.coefs, leaf.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.losses.mean(), loss.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weighted_combination_is_the_weighted_sum(backend):
    policy, ref, lengths = _inputs(8, "sigmoid")
    types = ("sigmoid", "bco_pair", "aot", "ipo")
    weights = (0.8, 0.2, 0.5, 1.5)
    dev = _device(backend)
    args = (policy.float().to(dev), ref.float().to(dev), lengths.float().to(dev))
    combined = preference_loss(
        *args, PreferenceLossConfig(loss_types=types, loss_weights=weights), backend=backend
    )
    losses = torch.zeros(8, dtype=torch.float64)
    coefs = torch.zeros(16, dtype=torch.float64)
    for t, w in zip(types, weights, strict=True):
        single = preference_loss_torch(
            policy, ref, lengths, PreferenceLossConfig(loss_types=(t,), loss_weights=(w,))
        )
        losses += single.losses
        coefs += single.coefs
    torch.testing.assert_close(combined.losses.double().cpu(), losses, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(combined.coefs.double().cpu(), coefs, rtol=2e-5, atol=2e-7)


def test_many_pairs_span_several_programs():
    policy, ref, lengths = _inputs(1500, "sigmoid")
    config = PreferenceLossConfig(loss_types=("sigmoid", "apo_down"), loss_weights=(1.0, 0.5))
    want = preference_loss_torch(policy, ref, lengths, config)
    dev = _device("triton")
    got = preference_loss_triton(policy.to(dev), ref.to(dev), lengths.to(dev), config)
    _assert_matches(got, want)


def test_reference_free_is_zero_reference():
    policy, ref, lengths = _inputs(5, "sigmoid")
    config = _config("sigmoid")
    for backend in ("torch", "triton"):
        dev = _device(backend)
        a = preference_loss(policy.to(dev), None, lengths.to(dev), config, backend=backend)
        b = preference_loss(
            policy.to(dev), torch.zeros_like(policy).to(dev), lengths.to(dev), config, backend=backend
        )
        torch.testing.assert_close(a.losses, b.losses)
        torch.testing.assert_close(a.coefs, b.coefs)


def test_alpha_divergence_at_one_is_reverse_kl_and_clamps_like_trl():
    policy, ref, lengths = _inputs(6, "sigmoid")
    rkl = preference_loss_torch(policy, ref, lengths, _config("sigmoid"))
    alpha1 = _config("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0)
    _assert_matches(preference_loss_torch(policy, ref, lengths, alpha1), rkl, rtol=1e-12, atol=0)
    # (alpha - 1) * logratio beyond 80 is clamped: finite scores, zero gradient from that sequence.
    huge = ref.clone()
    huge[0] = ref[0] - 300.0
    config = _config("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    want = preference_loss_torch(huge, ref, lengths, config)
    got = preference_loss(huge, ref, lengths, config, backend="triton")
    assert want.coefs[0] == 0 and got.coefs[0] == 0
    assert torch.isfinite(got.losses).all()
    _assert_matches(got, want)


def test_orpo_stays_accurate_near_zero_log_probs():
    policy = torch.tensor([-1e-4, -3e-3, -0.5, -2.0, -2e-3, -0.69, -0.7, -1e-5], dtype=torch.float64)
    lengths = torch.ones(8, dtype=torch.float64)
    config = _config("orpo")
    want = preference_loss_torch(policy, None, lengths, config)
    got = preference_loss(policy.float(), None, lengths.float(), config, backend="triton")
    torch.testing.assert_close(got.log_odds.double(), want.log_odds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.coefs.double(), want.coefs, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN arithmetic
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_nan_and_inf_propagate(backend, loss_type):
    policy, ref, lengths = _inputs(4, loss_type)
    dev = _device(backend)
    policy = policy.float().to(dev)
    ref = None if ref is None else ref.float().to(dev)
    lengths = lengths.float().to(dev)
    config = _config(loss_type)
    bad = policy.clone()
    bad[1] = float("nan")
    out = preference_loss(bad, ref, lengths, config, backend=backend)
    assert not torch.isfinite(out.losses.mean()), "NaN policy log-prob gave a finite loss"
    if ref is not None:
        bad_ref = ref.clone()
        bad_ref[5] = float("inf")
        out = preference_loss(policy, bad_ref, lengths, config, backend=backend)
        assert not torch.isfinite(out.losses.mean()), "Inf reference log-prob gave a finite loss"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_types=("dpo",), loss_weights=(1.0,)), "unknown pair loss type"),
        (dict(loss_types=("sigmoid", "sigmoid"), loss_weights=(1.0, 1.0)), "duplicates"),
        (dict(loss_types=("sigmoid", "hinge"), loss_weights=(1.0,)), "loss_weights has 1 entries"),
        (dict(f_divergence_type="kl"), "unknown f_divergence_type"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
        (dict(loss_types=("robust",), loss_weights=(1.0,), label_smoothing=0.5), r"\[0, 0.5\)"),
        (dict(loss_types=("exo_pair",), loss_weights=(1.0,)), "exo_pair"),
        (dict(loss_types=("nca_pair",), loss_weights=(1.0,), f_divergence_type="forward_kl"), "only defined"),
        (dict(discopop_tau=0.0), "discopop_tau"),
    ],
)
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreferenceLossConfig(**kwargs)


def test_bad_inputs():
    config = _config("sigmoid")
    good = torch.randn(6)
    with pytest.raises(ValueError, match="even, non-zero length"):
        preference_loss(torch.randn(5), torch.randn(5), torch.ones(5), config)
    with pytest.raises(ValueError, match="ref_logps has shape"):
        preference_loss(good, torch.randn(4), torch.ones(6), config)
    with pytest.raises(ValueError, match="lengths has shape"):
        preference_loss(good, good, torch.ones(3), config)
    with pytest.raises(TypeError, match="floating"):
        preference_loss(torch.arange(6), good, torch.ones(6), config)
    with pytest.raises(ValueError, match="have no kernel"):
        preference_loss_triton(good, good, torch.ones(6), _config("aot"))
    with pytest.raises(ValueError, match="backend must be"):
        preference_loss(good, good, torch.ones(6), config, backend="cuda")


def test_kernel_table_covers_every_elementwise_type():
    assert set(PAIR_LOSS_TYPES) - set(KERNEL_LOSS_BITS) == {"aot", "aot_unpaired"}
    assert sorted(KERNEL_LOSS_BITS.values()) == list(range(len(KERNEL_LOSS_BITS)))
