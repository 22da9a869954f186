"""KTO: the per-sequence loss op (kernel vs float64 torch vs TRL's formulas) and ``FusedLinearKTOLoss``."""

import os

import pytest
import torch
import torch.nn.functional as F

from fastdpo.losses.kto import FusedLinearKTOLoss
from fastdpo.ops.kto_loss import (
    KTO_LOSS_TYPES,
    KTOLossConfig,
    check_preference_labels,
    kto_loss,
    kto_loss_torch,
)
from fastdpo.reference import linear_logprobs_reference

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ("triton", "torch")


def _device(backend: str) -> str:
    return "cpu" if (backend == "torch" or _INTERPRET) else "cuda"


def _seq_inputs(num_seqs: int, seed: int | None = None):
    """Float64 ``(policy, ref, desirable)`` with both labels present."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    ref = -30.0 * torch.rand(num_seqs, generator=g, dtype=torch.float64) - 1.0
    policy = ref + 3.0 * torch.randn(num_seqs, generator=g, dtype=torch.float64)
    desirable = torch.rand(num_seqs, generator=g) < 0.5
    desirable[0], desirable[1] = True, False
    return policy, ref, desirable


def _trl_loss(policy, ref, desirable, kl, config: KTOLossConfig) -> torch.Tensor:
    """TRL 1.16 ``KTOTrainer._compute_loss`` as written there: split, weight, concatenate, mean."""
    beta = config.beta
    chosen = (policy - ref)[desirable]
    rejected = (policy - ref)[~desirable]
    if config.loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected))
    else:
        chosen_losses = 1 - F.sigmoid(beta * chosen)
        rejected_losses = F.sigmoid(beta * rejected)
    losses = torch.cat(
        (config.desirable_weight * chosen_losses, config.undesirable_weight * rejected_losses), 0
    )
    return losses.nanmean()


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_torch_op_matches_trl_formulas(loss_type):
    policy, ref, desirable = _seq_inputs(11)
    kl = torch.tensor(0.37, dtype=torch.float64)
    config = KTOLossConfig(loss_type=loss_type, beta=0.3, desirable_weight=1.4, undesirable_weight=0.6)
    leaf = policy.clone().requires_grad_(True)
    want = _trl_loss(leaf, ref, desirable, kl, config)
    (want_grad,) = torch.autograd.grad(want, leaf)
    got = kto_loss_torch(policy, ref, desirable, kl, config)
    assert got.losses.dtype == torch.float64 and got.losses.shape == (11,)
    torch.testing.assert_close(got.losses.mean(), want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.coefs, want_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.rewards, 0.3 * (policy - ref), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
@pytest.mark.parametrize("num_seqs", [1, 13, 1500])
def test_triton_matches_float64_torch(loss_type, num_seqs):
    policy, ref, desirable = _seq_inputs(max(num_seqs, 2))
    policy, ref, desirable = policy[:num_seqs], ref[:num_seqs], desirable[:num_seqs]
    kl = torch.tensor(1.7, dtype=torch.float64)
    config = KTOLossConfig(loss_type=loss_type, beta=0.2, desirable_weight=1.3, undesirable_weight=0.7)
    want = kto_loss_torch(policy, ref, desirable, kl, config)
    dev = _device("triton")
    got = kto_loss(
        policy.float().to(dev),
        ref.float().to(dev),
        desirable.to(dev),
        kl.float().to(dev),
        config,
        backend="triton",
    )
    for name in ("losses", "coefs", "rewards"):
        g, w = getattr(got, name).double().cpu(), getattr(want, name)
        # fp32 inputs: the rounding of policy - ref (|logps| ~ 30) dominates.
        err = (g - w).abs().max().item()
        assert err <= 2e-6 * max(1.0, w.abs().max().item()), f"{name}: max error {err:.3g}"


def test_apo_zero_unpaired_ignores_kl_and_kto_uses_it():
    policy, ref, desirable = _seq_inputs(9)
    apo = KTOLossConfig(loss_type="apo_zero_unpaired")
    kto = KTOLossConfig(loss_type="kto")
    for backend in BACKENDS:
        a = kto_loss(policy.float(), ref.float(), desirable, torch.tensor(5.0), apo, backend=backend)
        b = kto_loss(policy.float(), ref.float(), desirable, torch.tensor(0.0), apo, backend=backend)
        c = kto_loss(policy.float(), ref.float(), desirable, torch.tensor(0.0), kto, backend=backend)
        d = kto_loss(policy.float(), ref.float(), desirable, torch.tensor(5.0), kto, backend=backend)
        torch.testing.assert_close(a.losses, b.losses)
        torch.testing.assert_close(a.losses, c.losses)  # apo_zero_unpaired is kto with kl = 0
        assert (d.losses - c.losses).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("only", [True, False])
def test_single_label_batches_are_valid(backend, only):
    policy, ref, _ = _seq_inputs(6)
    desirable = torch.full((6,), only)
    config = KTOLossConfig(desirable_weight=2.0, undesirable_weight=0.5)
    got = kto_loss(policy.float(), ref.float(), desirable, torch.tensor(0.2), config, backend=backend)
    want = _trl_loss(policy, ref, desirable, torch.tensor(0.2, dtype=torch.float64), config)
    torch.testing.assert_close(got.losses.double().mean(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_saturated_losses_keep_relative_precision(backend):
    # beta * r = +-40: the loss is ~4e-18, which 1 - sigmoid(40) rounds to 0 in fp32.
    policy = torch.tensor([400.0, -400.0, 0.0])
    desirable = torch.tensor([True, False, True])
    got = kto_loss(policy, None, desirable, torch.tensor(0.0), KTOLossConfig(beta=0.1), backend=backend)
    want = torch.sigmoid(torch.tensor([-40.0, -40.0, 0.0], dtype=torch.float64))
    if backend == "triton":
        torch.testing.assert_close(got.losses.double(), want, rtol=1e-5, atol=0)
    else:
        # The torch path is TRL's literal formula in the input dtype: fp32 rounds the tail to 0 like TRL.
        torch.testing.assert_close(got.losses.double(), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["policy", "ref", "kl"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_inputs_never_give_a_finite_loss(backend, where, bad):
    policy, ref, desirable = _seq_inputs(5)
    policy, ref = policy.float(), ref.float()
    kl = torch.tensor(0.1)
    if where == "policy":
        policy[2] = bad
    elif where == "ref":
        ref[3] = bad
    else:
        kl = torch.tensor(bad)
    got = kto_loss(policy, ref, desirable, kl, KTOLossConfig(), backend=backend)
    assert not torch.isfinite(got.losses.mean())
    assert not torch.isfinite(got.coefs).all()


def test_check_preference_labels():
    assert check_preference_labels(torch.tensor([1, 0, 1]), 3, torch.device("cpu")).tolist() == [
        True,
        False,
        True,
    ]
    assert check_preference_labels(torch.tensor([1.0, 0.0]), 2, torch.device("cpu")).dtype == torch.bool
    with pytest.raises(ValueError, match=r"preference_labels entries must be bool or 0/1.*2"):
        check_preference_labels(torch.tensor([1, 2, 0]), 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"preference_labels entries.*0\.5"):
        check_preference_labels(torch.tensor([0.5, 1.0]), 2, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"preference_labels has shape \(2,\); expected \[S\]=\[3\]"):
        check_preference_labels(torch.tensor([True, False]), 3, torch.device("cpu"))
    with pytest.raises(TypeError, match="preference_labels must be a torch.Tensor"):
        check_preference_labels([True, False], 2, torch.device("cpu"))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown KTO loss_type 'bco'"):
        KTOLossConfig(loss_type="bco")
    with pytest.raises(ValueError, match="beta must be > 0"):
        KTOLossConfig(beta=0.0)
    with pytest.raises(ValueError, match="desirable_weight must be a finite number"):
        KTOLossConfig(desirable_weight=float("nan"))
    with pytest.raises(ValueError, match="must be >= 0"):
        KTOLossConfig(undesirable_weight=-1.0)


# ------------------------------------------------------------------------------------------------------
# FusedLinearKTOLoss against a float64 full-logits reference of TRL 1.16's KTOTrainer
# ------------------------------------------------------------------------------------------------------

IGNORE = -100
KL_MODES = ("none", "scalar", "completions_logps", "completions_hidden")


def make_batch(num_seqs=5, t=9, d=16, v=37, *, masked=(), seed=None):
    """Float64 padded batch (prompt and right padding ignored) with its KL completions and references."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def rows(t_):
        hidden = torch.randn(num_seqs, t_, d, generator=g, dtype=torch.float64)
        labels = torch.randint(0, v, (num_seqs, t_), generator=g)
        for r in range(num_seqs):
            prompt = int(torch.randint(1, 3, (1,), generator=g))
            end = int(torch.randint(prompt + 1, t_ + 1, (1,), generator=g))
            labels[r, :prompt] = IGNORE
            labels[r, end:] = IGNORE
        ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
        return hidden, labels, ref_hidden

    hidden, labels, ref_hidden = rows(t)
    kl_hidden, kl_labels, _ = rows(t - 2)
    # Sharper reference logits give random labels lower log-probs, so the KL estimate is positive (unclamped).
    kl_ref_hidden = 2.0 * kl_hidden
    for r in masked:
        labels[r] = IGNORE
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    bias = 0.3 * torch.randn(v, generator=g, dtype=torch.float64)
    desirable = torch.tensor([i % 3 != 1 for i in range(num_seqs)])
    return dict(
        hidden=hidden, labels=labels, ref_hidden=ref_hidden, kl_hidden=kl_hidden, kl_labels=kl_labels,
        kl_ref_hidden=kl_ref_hidden, weight=weight, bias=bias, desirable=desirable,
    )  # fmt: skip


def ref_logps_of(hidden, weight, bias, labels, *, average=False, temperature=1.0, softcap=None):
    tok = linear_logprobs_reference(
        hidden, weight, labels, bias, ignore_index=IGNORE, temperature=temperature, softcap=softcap
    )
    logps = tok.sum(-1)
    return logps / (labels != IGNORE).sum(-1) if average else logps


def _fp32_round(t):
    return t.float().double()


def check_against_reference(backend, loss_type="kto", kl_mode="completions_hidden", *, batch=None,
                            average_log_prob=False, temperature=1.0, softcap=None, with_bias=True, impl=None,
                            **weights):  # fmt: skip
    bt = batch if batch is not None else make_batch()
    config = KTOLossConfig(loss_type=loss_type, beta=0.3, **weights)
    head = dict(average=average_log_prob, temperature=temperature, softcap=softcap)
    bias = bt["bias"] if with_bias else None
    # The op gets fp32 reference values; the reference gets exactly those values.
    ref_logps = _fp32_round(ref_logps_of(bt["ref_hidden"], bt["weight"], bias, bt["labels"], **head))
    kl_ref = _fp32_round(ref_logps_of(bt["kl_ref_hidden"], bt["weight"], bias, bt["kl_labels"], **head))
    kl_policy = ref_logps_of(bt["kl_hidden"], bt["weight"], bias, bt["kl_labels"], **head)
    kl = torch.tensor(0.0, dtype=torch.float64)
    if kl_mode == "scalar":
        kl = torch.tensor(0.8, dtype=torch.float64)
    elif kl_mode.startswith("completions"):
        kl = (kl_policy - kl_ref).mean().clamp(min=0)

    dev = _device(backend)
    h = bt["hidden"].float().to(dev).requires_grad_()
    w = bt["weight"].float().to(dev).requires_grad_()
    b = bias.float().to(dev).requires_grad_() if with_bias else None
    extra = {}
    if kl_mode == "scalar":
        extra["kl"] = 0.8
    elif kl_mode.startswith("completions"):
        extra.update(kl_hidden=bt["kl_hidden"].float().to(dev), kl_labels=bt["kl_labels"].to(dev))
        if kl_mode == "completions_logps":
            extra["kl_ref_logps"] = kl_ref.to(dev)
        else:
            extra["kl_ref_hidden"] = bt["kl_ref_hidden"].float().to(dev)
    if kl_mode == "completions_hidden":
        extra["ref_hidden"] = bt["ref_hidden"].float().to(dev)
    else:
        extra["ref_logps"] = ref_logps.to(dev)
    loss_fn = FusedLinearKTOLoss(
        beta=0.3, loss_type=loss_type, average_log_prob=average_log_prob, backend=backend,
        temperature=temperature, softcap=softcap, impl=impl, **weights,
    )  # fmt: skip
    out = loss_fn(h, w, bt["labels"].to(dev), b, preference_labels=bt["desirable"].to(dev), **extra)
    out.loss.backward()

    leaves = [
        x.clone().requires_grad_() if x is not None else None for x in (bt["hidden"], bt["weight"], bias)
    ]
    logps = ref_logps_of(leaves[0], leaves[1], leaves[2], bt["labels"], **head)
    kl_used = kl if loss_type == "kto" else torch.zeros_like(kl)
    loss = _trl_loss(logps, ref_logps, bt["desirable"], kl_used, config)
    loss.backward()
    rewards = 0.3 * (logps.detach() - ref_logps)

    _check_close("loss", out.loss, loss.detach(), rtol=2e-5)
    _check_close("logps", out.logps, logps.detach(), rtol=1e-5)
    _check_close("ref_logps", out.ref_logps, ref_logps, rtol=1e-5)
    _check_close("rewards", out.rewards, rewards, rtol=1e-5)
    _check_close("kl", out.kl, kl_used, rtol=1e-5)
    assert out.losses.shape == (bt["desirable"].shape[0],) and out.kl.shape == ()
    d = bt["desirable"]
    want_metrics = {"kl": kl_used, "count/chosen": d.sum().double(), "count/rejected": (~d).sum().double()}
    # Sums and means of rewards cancel: their fp32 error scales with the terms' sizes, not with the result.
    reward_sizes = 0.3 * (logps.detach().abs() + ref_logps.abs())
    terms = {"rewards": (rewards, reward_sizes), "logps": (logps.detach(),) * 2}
    scales = {}
    for name, mask in (("chosen", d), ("rejected", ~d)):
        for kind, (values, size) in terms.items():
            want_metrics[f"{kind}/{name}_sum"] = values[mask].sum()
            scales[f"{kind}/{name}_sum"] = size[mask].abs().sum().item()
            if mask.any():
                want_metrics[f"{kind}/{name}"] = values[mask].mean()
                scales[f"{kind}/{name}"] = size[mask].abs().mean().item()
    if d.any() and (~d).any():
        want_metrics["rewards/margins"] = rewards[d].mean() - rewards[~d].mean()
        scales["rewards/margins"] = scales["rewards/chosen"] + scales["rewards/rejected"]
    assert set(out.metrics) == set(want_metrics), sorted(set(out.metrics) ^ set(want_metrics))
    for key, want in want_metrics.items():
        # A few fp32 ulps of the terms' sizes where those set the scale.
        rtol = 1e-5 if key not in scales else 2e-6
        _check_close(key, out.metrics[key], want, rtol=rtol, scale=scales.get(key))
    grads = (h.grad, w.grad, None if b is None else b.grad)
    for name, got, leaf in zip(("dhidden", "dweight", "dbias"), grads, leaves, strict=True):
        if leaf is not None:
            _check_close(name, got, leaf.grad, rtol=2e-4)
    return out


def _check_close(name, got, want, rtol=1e-4, atol=1e-6, scale=None):
    """Max error within ``atol + rtol * scale``; ``scale`` defaults to the largest ``|want|``."""
    got = got.detach().double().cpu()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= atol + rtol * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl_mode", KL_MODES)
def test_kto_matches_float64(backend, kl_mode):
    out = check_against_reference(backend, "kto", kl_mode, desirable_weight=1.33, undesirable_weight=0.75)
    if kl_mode != "none":
        assert out.kl.item() != 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_apo_zero_unpaired_matches_float64(backend):
    check_against_reference(backend, "apo_zero_unpaired", "none", desirable_weight=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_options_and_a_fully_masked_sequence(backend):
    batch = make_batch(num_seqs=6, masked=(3,))
    check_against_reference(backend, batch=batch, temperature=0.7, softcap=4.0, with_bias=False)
    out = check_against_reference(backend, batch=make_batch(), average_log_prob=True, kl_mode="scalar")
    assert out.logps.abs().max() < 10  # averaged, not summed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("only", [True, False])
def test_single_label_batch_matches_float64(backend, only):
    batch = make_batch(num_seqs=4)
    batch["desirable"] = torch.full((4,), only)
    out = check_against_reference(backend, batch=batch, undesirable_weight=1.5)
    assert (
        f"rewards/{'rejected' if only else 'chosen'}" not in out.metrics
    ) and "rewards/margins" not in out.metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_both_head_impls_match_float64(backend, impl):
    check_against_reference(backend, impl=impl, batch=make_batch(num_seqs=4, masked=(1,)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_give_trl_token_metrics(backend):
    bt = make_batch(num_seqs=5, masked=(4,))
    dev = _device(backend)
    args = (bt["hidden"].float().to(dev), bt["weight"].float().to(dev), bt["labels"].to(dev))
    common = dict(
        preference_labels=bt["desirable"].to(dev), ref_hidden=bt["ref_hidden"].float().to(dev), kl=0.2
    )
    plain = FusedLinearKTOLoss(backend=backend)(*args, **common)
    out = FusedLinearKTOLoss(backend=backend, stats=True)(*args, **common)
    assert plain.token_stats is None and "entropy" not in plain.metrics
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)

    logits = bt["hidden"] @ bt["weight"].T
    valid = bt["labels"] != IGNORE
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    mean_logit = logits.mean(-1)
    rows = bt["desirable"][:, None].expand_as(valid)
    want = {
        "entropy": entropy[valid].mean(),
        "logits/chosen": mean_logit[valid & rows].mean(),
        "logits/rejected": mean_logit[valid & ~rows].mean(),
    }
    for key, value in want.items():
        _check_close(key, out.metrics[key], value, rtol=1e-5)
    assert out.token_stats.entropy.shape == (int(valid.sum()),)
    _check_close("token entropy", out.token_stats.entropy, entropy[valid], rtol=1e-5)


def test_autocast_keeps_fp32_masters_and_bf16_accuracy():
    bt = make_batch(num_seqs=5)
    h = bt["hidden"].float().requires_grad_()
    w = bt["weight"].float().requires_grad_()
    common = dict(preference_labels=bt["desirable"], ref_hidden=bt["ref_hidden"].float(), kl=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = FusedLinearKTOLoss(backend="torch")(h, w, bt["labels"], **common)
    out.loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32

    config = KTOLossConfig()
    kl = torch.tensor(0.3, dtype=torch.float64)

    def plain(dtype):
        """Plain PyTorch in ``dtype`` (bf16 logits, fp32 log-softmax), as autocast's linear would run it."""
        hh = bt["hidden"].detach().to(dtype).requires_grad_()
        logps = ref_logps_of(hh, bt["weight"].to(dtype), None, bt["labels"]).double()
        ref = ref_logps_of(bt["ref_hidden"].to(dtype), bt["weight"].to(dtype), None, bt["labels"]).double()
        loss = _trl_loss(logps, ref, bt["desirable"], kl, config)
        loss.backward()
        return loss.detach(), hh.grad.double()

    exact_loss, exact_grad = plain(torch.float64)
    bf16_loss, bf16_grad = plain(torch.bfloat16)
    own_loss_err = (bf16_loss - exact_loss).abs().item()
    own_grad_err = (bf16_grad - exact_grad).norm().item()
    assert own_grad_err > 0
    assert abs(out.loss.item() - exact_loss.item()) <= 2 * own_loss_err + 1e-6
    assert (h.grad.double() - exact_grad).norm().item() <= 2 * own_grad_err


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_above_64k(backend):
    check_against_reference(backend, batch=make_batch(num_seqs=3, t=5, d=8, v=65_600), kl_mode="scalar")


def _to_packed(hidden, labels):
    """Padded rows -> packed tokens (each row up to its last label, then one ignored separator)."""
    parts_h, parts_l, parts_s, src = [], [], [], []
    t = labels.shape[1]
    for r in range(labels.shape[0]):
        valid = (labels[r] != IGNORE).nonzero()
        end = int(valid.max()) + 1 if valid.numel() else 1
        parts_h += [hidden[r, :end], torch.zeros(1, hidden.shape[-1], dtype=hidden.dtype)]
        parts_l += [labels[r, :end], torch.tensor([IGNORE])]
        parts_s += [torch.where(labels[r, :end] != IGNORE, r, -1), torch.tensor([-1])]
        src += [torch.arange(r * t, r * t + end), torch.tensor([-1])]
    return torch.cat(parts_h), torch.cat(parts_l), torch.cat(parts_s), torch.cat(src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded(backend):
    bt = make_batch(num_seqs=5, masked=(2,))
    dev = _device(backend)
    w = bt["weight"].float().to(dev)
    loss_fn = FusedLinearKTOLoss(beta=0.2, desirable_weight=1.2, backend=backend)
    common = dict(preference_labels=bt["desirable"].to(dev))
    hp = bt["hidden"].float().to(dev).requires_grad_()
    padded = loss_fn(
        hp, w, bt["labels"].to(dev), ref_hidden=bt["ref_hidden"].float().to(dev),
        kl_hidden=bt["kl_hidden"].float().to(dev), kl_labels=bt["kl_labels"].to(dev),
        kl_ref_hidden=bt["kl_ref_hidden"].float().to(dev), **common,
    )  # fmt: skip
    padded.loss.backward()

    ph, pl, ps, src = _to_packed(bt["hidden"], bt["labels"])
    rh, _, _, _ = _to_packed(bt["ref_hidden"], bt["labels"])
    kh, kl_l, ks, _ = _to_packed(bt["kl_hidden"], bt["kl_labels"])
    krh, _, _, _ = _to_packed(bt["kl_ref_hidden"], bt["kl_labels"])
    hk = ph.float().to(dev).requires_grad_()
    packed = loss_fn(
        hk, w, pl.to(dev), ref_hidden=rh.float().to(dev), kl_hidden=kh.float().to(dev),
        kl_labels=kl_l.to(dev), kl_ref_hidden=krh.float().to(dev), seq_index=ps.to(dev), num_seqs=5,
        kl_seq_index=ks.to(dev), **common,
    )  # fmt: skip
    packed.loss.backward()

    assert padded.kl.item() > 0
    for name in ("loss", "losses", "logps", "ref_logps", "rewards", "kl"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-6, atol=1e-6)
    assert set(packed.metrics) == set(padded.metrics)
    for key in padded.metrics:
        torch.testing.assert_close(packed.metrics[key], padded.metrics[key], rtol=1e-6, atol=1e-6)
    kept = src >= 0
    dh_padded = hp.grad.reshape(-1, bt["hidden"].shape[-1]).cpu()
    torch.testing.assert_close(hk.grad.cpu()[kept], dh_padded[src[kept]], rtol=1e-5, atol=1e-7)
    assert torch.all(hk.grad.cpu()[~kept] == 0)


def _simple_call(backend, bt=None, **overrides):
    bt = bt if bt is not None else make_batch()
    dev = _device(backend)
    args = dict(
        hidden=bt["hidden"].float().to(dev), weight=bt["weight"].float().to(dev), labels=bt["labels"].to(dev),
        preference_labels=bt["desirable"].to(dev), ref_hidden=bt["ref_hidden"].float().to(dev),
        kl_hidden=bt["kl_hidden"].float().to(dev), kl_labels=bt["kl_labels"].to(dev),
        kl_ref_hidden=bt["kl_ref_hidden"].float().to(dev),
    )  # fmt: skip
    args.update(overrides)
    args = {k: v for k, v in args.items() if v is not None}
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    return FusedLinearKTOLoss(backend=backend)(hidden, weight, labels, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_prefilled_outputs_do_not_leak(backend, nan_filled_empty):
    bt = make_batch()
    expected = _simple_call(backend, bt)
    nan_filled_empty()
    got = _simple_call(backend, bt)
    for name in ("loss", "losses", "logps", "ref_logps", "rewards", "kl"):
        assert torch.isfinite(getattr(got, name)).all(), name
        assert torch.equal(getattr(got, name), getattr(expected, name)), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "ref_hidden", "kl_hidden", "kl_ref_hidden", "ref_logps"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_never_give_a_finite_loss(backend, where, bad):
    bt = make_batch()
    overrides = {}
    if where == "ref_logps":
        overrides = dict(ref_hidden=None, ref_logps=torch.tensor([-3.0, bad, -2.0, -1.0, -4.0]))
    else:
        key = "labels" if where in ("hidden", "ref_hidden") else "kl_labels"
        r, t = (bt[key] != IGNORE).nonzero()[0].tolist()
        bt[where][r, t, 0] = bad
    out = _simple_call(backend, bt, **overrides)
    assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["kl_hidden", "kl_ref_hidden", "kl"])
def test_a_non_finite_kl_term_is_trls_and_never_gives_a_finite_loss(backend, where):
    """TRL 1.16 averages the KL log-prob differences with a plain mean (its ``nanmean`` is on the losses):
    one NaN KL completion makes the KL term NaN, so every loss is NaN. No error, nothing silently dropped."""
    bt = make_batch(num_seqs=4)
    r = 2
    t = int((bt["kl_labels"][r] != IGNORE).nonzero()[0])
    overrides = {}
    if where == "kl":
        overrides = dict(kl=float("nan"), kl_hidden=None, kl_labels=None, kl_ref_hidden=None)
    else:
        bt[where][r, t] = float("nan")
    got = _simple_call(backend, bt, **overrides)
    # Float64 reference, TRL's formulas as written there.
    ref_logps = ref_logps_of(bt["ref_hidden"], bt["weight"], None, bt["labels"])
    logps = ref_logps_of(bt["hidden"], bt["weight"], None, bt["labels"])
    kl_diff = ref_logps_of(bt["kl_hidden"], bt["weight"], None, bt["kl_labels"]) - ref_logps_of(
        bt["kl_ref_hidden"], bt["weight"], None, bt["kl_labels"]
    )
    kl = torch.tensor(float("nan"), dtype=torch.float64) if where == "kl" else kl_diff.mean().clamp(min=0)
    want = _trl_loss(logps, ref_logps, bt["desirable"], kl, KTOLossConfig())
    assert torch.isnan(kl) and torch.isnan(want)
    assert torch.isnan(got.kl.cpu()) and torch.isnan(got.metrics["kl"].cpu())
    assert torch.isnan(got.loss.cpu()) and torch.isnan(got.losses.cpu()).all()
    # The policy's own numbers stay finite and equal to the reference's: only the KL term is poisoned.
    torch.testing.assert_close(got.logps.double().cpu(), logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.ref_logps.double().cpu(), ref_logps, rtol=1e-5, atol=1e-5)


def test_nan_at_an_ignored_position_does_not_matter():
    bt = make_batch()
    expected = _simple_call("torch", bt)
    r, t = (bt["labels"] == IGNORE).nonzero()[0].tolist()
    bt["hidden"][r, t] = float("nan")
    got = _simple_call("torch", bt)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=0)


def test_kl_estimate_is_clamped_at_zero_and_averaged_over_ranks(monkeypatch):
    bt = make_batch()
    # A flatter reference gives random labels higher log-probs: the raw estimate is negative.
    flat = _simple_call("torch", bt, kl_ref_hidden=(0.2 * bt["kl_hidden"]).float())
    assert flat.kl.item() == 0.0 and flat.metrics["kl"].item() == 0.0
    local = _simple_call("torch", bt).kl.item()

    dist = torch.distributed
    other_rank = 2.5
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, **kw: t.add_(other_rank))
    averaged = _simple_call("torch", bt).kl.item()
    assert averaged == pytest.approx((local + other_rank) / 2, rel=1e-6)


def test_module_builds_no_token_graph():
    bt = make_batch()
    h = bt["hidden"].float().requires_grad_()
    out = _simple_call("torch", bt, hidden=h)
    assert out.loss.grad_fn is not None and out.loss.grad_fn.next_functions[0][0] is not None
    assert type(out.loss.grad_fn).__name__.startswith("_FusedLinear")
    for name in ("losses", "logps", "ref_logps", "rewards", "kl"):
        assert not getattr(out, name).requires_grad, name


def _bad_call(case):
    bt = make_batch(num_seqs=3)
    one = make_batch(num_seqs=1)
    calls = {
        "label_2": dict(preference_labels=torch.tensor([1, 2, 0])),
        "label_half": dict(preference_labels=torch.tensor([0.5, 1.0, 0.0])),
        "label_length": dict(preference_labels=torch.tensor([True, False])),
        "one_sequence_kl": dict(bt=one, preference_labels=torch.tensor([True])),
        "kl_vector": dict(kl=torch.tensor([0.1, 0.2]), kl_hidden=None, kl_labels=None, kl_ref_hidden=None),
        "kl_string": dict(kl="0.1", kl_hidden=None, kl_labels=None, kl_ref_hidden=None),
        "kl_and_completions": dict(kl=0.1),
        "no_reference": dict(ref_hidden=None),
        "two_references": dict(ref_logps=torch.zeros(3)),
        "kl_without_labels": dict(kl_labels=None),
        "kl_without_reference": dict(kl_ref_hidden=None),
        "kl_rows": dict(kl_hidden=bt["kl_hidden"][:2].float(), kl_labels=bt["kl_labels"][:2]),
        "ref_logps_shape": dict(ref_hidden=None, ref_logps=torch.zeros(4)),
        "packed_without_num_seqs": dict(
            hidden=bt["hidden"].float().reshape(-1, 16),
            labels=bt["labels"].reshape(-1),
            seq_index=torch.zeros(bt["labels"].numel(), dtype=torch.long),
            ref_hidden=None,
            ref_logps=torch.zeros(3),
        ),  # fmt: skip
    }
    kwargs = calls[case]
    return _simple_call("torch", kwargs.pop("bt", bt), **kwargs)


@pytest.mark.parametrize(
    "case, match",
    [
        ("label_2", r"preference_labels entries must be bool or 0/1"),
        ("label_half", r"preference_labels entries must be bool or 0/1"),
        ("label_length", r"preference_labels has shape \(2,\); expected \[S\]=\[3\]"),
        ("one_sequence_kl", r"KL estimate from mismatched completions needs a batch of at least 2"),
        ("kl_vector", r"kl must be a scalar \(a float or one-element float tensor\)"),
        ("kl_string", r"kl must be a scalar \(a float or one-element float tensor\)"),
        ("kl_and_completions", r"pass either kl or the KL completions"),
        ("no_reference", r"KTO needs a reference: pass exactly one of ref_logps"),
        ("two_references", r"KTO needs a reference: pass exactly one of ref_logps"),
        ("kl_without_labels", r"KL estimate needs kl_hidden and kl_labels"),
        ("kl_without_reference", r"KTO needs a reference: pass exactly one of kl_ref_logps"),
        ("kl_rows", r"kl_hidden holds 2 sequences; expected one KL completion per sequence \(S=3\)"),
        ("ref_logps_shape", r"ref_logps has shape \(4,\); expected \[S\]=\[3\]"),
        ("packed_without_num_seqs", r"packed layout needs num_seqs"),
    ],
)
def test_bad_calls(case, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(case)


def test_apo_zero_unpaired_rejects_a_kl_term():
    bt = make_batch(num_seqs=3)
    loss_fn = FusedLinearKTOLoss(loss_type="apo_zero_unpaired")
    args = (bt["hidden"].float(), bt["weight"].float(), bt["labels"])
    common = dict(preference_labels=bt["desirable"], ref_hidden=bt["ref_hidden"].float())
    with pytest.raises(ValueError, match="apo_zero_unpaired' has no KL term; drop \\['kl'\\]"):
        loss_fn(*args, kl=0.3, **common)
    with pytest.raises(ValueError, match="has no KL term; drop \\['kl_hidden', 'kl_labels'"):
        loss_fn(*args, kl_hidden=bt["kl_hidden"].float(), kl_labels=bt["kl_labels"], **common)
    with pytest.raises(ValueError, match="unknown KTO loss_type 'sigmoid'"):
        FusedLinearKTOLoss(loss_type="sigmoid")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_matches_liger_kto_loss(backend, average_log_prob):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    bt = make_batch(num_seqs=6)
    dev = _device(backend)
    weight, bias = bt["weight"].float(), bt["bias"].float()
    kl = torch.tensor(0.6)
    results = []
    for impl in ("liger", "fastdpo"):
        h = bt["hidden"].float().clone().requires_grad_()
        w = weight.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        if impl == "liger":
            fn = liger.LigerFusedLinearKTOLoss(
                ignore_index=IGNORE, beta=0.3, compiled=False, use_ref_model=True,
                average_log_prob=average_log_prob,
            )  # fmt: skip
            loss, _ = fn(h, w, bt["labels"], b, bt["desirable"], bt["ref_hidden"].float(), weight, bias, kl)
        else:
            fn = FusedLinearKTOLoss(beta=0.3, average_log_prob=average_log_prob, backend=backend)
            loss = fn(
                h.to(dev), w.to(dev), bt["labels"].to(dev), b.to(dev),
                preference_labels=bt["desirable"].to(dev), ref_hidden=bt["ref_hidden"].float().to(dev),
                kl=kl.to(dev),
            ).loss  # fmt: skip
        loss.backward()
        results.append((loss.detach().cpu(), h.grad.cpu(), w.grad.cpu(), b.grad.cpu()))
    (want, *want_grads), (got, *got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name, g, w_ in zip(("dhidden", "dweight", "dbias"), got_grads, want_grads, strict=True):
        _check_close(name, g, w_.double(), rtol=1e-4)
