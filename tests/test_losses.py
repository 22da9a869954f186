"""FusedLinearDPOLoss against a float64 re-implementation of TRL 1.16's formulas: values, rewards, metrics and
gradients w.r.t. hidden, weight and bias, for every loss type and option, both backends and both layouts."""

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastdpo.losses import LOSS_TYPES, FusedLinearDPOLoss, fused_linear_dpo_loss, sequence_logps
from fastdpo.ops.preference_loss import KERNEL_LOSS_BITS, PAIR_LOSS_TYPES

IGNORE = -100
BACKENDS = ["torch", "triton"]
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
cuda = pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs a CUDA GPU")
REFERENCE_FREE = {"simpo", "orpo"}
# One default for every loss type: beta moderate, smoothing valid for robust and exo_pair.
OPTS = dict(beta=0.2, label_smoothing=0.1, discopop_tau=0.05, simpo_gamma=0.3)


def _device(backend: str) -> str:
    return "cpu" if (backend == "torch" or _INTERPRET) else "cuda"


# ------------------------------------------------------------------------------------------------------
# Float64 reference, written from TRL 1.16 DPOTrainer._compute_loss, CPOTrainer (simpo) and ORPOTrainer
# ------------------------------------------------------------------------------------------------------


def ref_token_logps(hidden, weight, bias, labels, temperature=1.0, softcap=None):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = (logits / temperature).log_softmax(-1)
    mask = labels != IGNORE
    return logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask, mask


def ref_sequence_logps(tok, mask, ld_alpha=None, average=False):
    if ld_alpha is None:
        logps = tok.sum(-1)
    else:
        comp_pos = mask.long().cumsum(-1)
        lens = mask.sum(-1)
        chosen_lens, rejected_lens = lens.chunk(2)
        shared = torch.minimum(chosen_lens, rejected_lens).repeat(2)[:, None]
        shared_mask = (comp_pos > 0) & (comp_pos <= shared)
        tail_mask = comp_pos > shared
        logps = (tok * shared_mask).sum(-1) + ld_alpha * (tok * tail_mask).sum(-1)
    if average:
        logps = logps / mask.sum(-1)
    return logps


def _log1mexp(x):
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def ref_loss(tok, mask, logps, ref_logps, *, loss_types, loss_weights=None, beta, label_smoothing=0.0,
             discopop_tau=0.05, simpo_gamma=0.5, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
             rpo_alpha=None, pair_weights=None):  # fmt: skip
    """Returns (loss, chosen_rewards, rejected_rewards, metrics) as TRL computes them (WPO: pair_weights)."""
    eps = label_smoothing
    weights = loss_weights or [1.0] * len(loss_types)
    chosen_logps, rejected_logps = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    chosen_logratios = chosen_logps - ref_chosen
    rejected_logratios = rejected_logps - ref_rejected
    if f_divergence_type == "reverse_kl":
        cs, rs = chosen_logratios, rejected_logratios
    elif f_divergence_type == "forward_kl":
        cs, rs = 1 - torch.exp(-chosen_logratios), 1 - torch.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        cs, rs = math.log(2) + F.logsigmoid(chosen_logratios), math.log(2) + F.logsigmoid(rejected_logratios)
    else:
        a = f_alpha_divergence_coef
        cs = (torch.exp(torch.clamp((a - 1) * chosen_logratios, max=80.0)) - 1) / (a - 1)
        rs = (torch.exp(torch.clamp((a - 1) * rejected_logratios, max=80.0)) - 1) / (a - 1)
    delta = cs - rs
    chosen_mask, rejected_mask = mask.chunk(2)
    chosen_tok, _ = tok.chunk(2)
    nll = -chosen_tok[chosen_mask].mean()
    cr, rr = beta * chosen_logratios, beta * rejected_logratios

    loss = 0.0
    metrics = {}
    for loss_type, w in zip(loss_types, weights, strict=True):
        if loss_type == "sigmoid":
            per = -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":
            per = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            d = cs / chosen_mask.sum(1).clamp(min=1.0) - rs / rejected_mask.sum(1).clamp(min=1.0)
            per = (d - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            z = beta * delta
            per = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - math.log(eps)
            )
        elif loss_type == "nca_pair":
            per = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
        elif loss_type == "robust":
            per = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (
                1 - 2 * eps
            )
        elif loss_type == "bco_pair":
            per = -F.logsigmoid(cr) - F.logsigmoid(-rr)
        elif loss_type == "sppo_hard":
            per = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                d = torch.sort(chosen_logps - rejected_logps)[0] - torch.sort(ref_chosen - ref_rejected)[0]
            else:
                d = torch.sort(chosen_logratios)[0] - torch.sort(rejected_logratios)[0]
            per = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
        elif loss_type == "apo_zero":
            per = 1 - torch.sigmoid(cr) + torch.sigmoid(rr)
        elif loss_type == "apo_down":
            per = torch.sigmoid(cr) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
        elif loss_type == "discopop":
            z = beta * delta
            mod = torch.sigmoid(z / discopop_tau)
            per = -F.logsigmoid(z) * (1 - mod) + torch.exp(-z) * mod
        elif loss_type == "sft":
            per = nll.expand(chosen_logps.shape[0])
        elif loss_type == "sigmoid_norm":
            d = cs / chosen_mask.sum(1).clamp(min=1.0) - rs / rejected_mask.sum(1).clamp(min=1.0)
            per = -F.logsigmoid(beta * d)
        elif loss_type == "simpo":
            logits = chosen_logps - rejected_logps - simpo_gamma / beta
            per = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
        elif loss_type == "orpo":
            log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
            ratio = F.logsigmoid(log_odds)
            per = nll - beta * ratio
            metrics["log_odds_ratio"] = ratio.mean()
            metrics["log_odds_chosen"] = log_odds.mean()
        if pair_weights is not None:
            per = per * pair_weights
        loss = loss + per.mean() * w
    if rpo_alpha is not None:
        loss = loss + rpo_alpha * nll
    if rpo_alpha is not None or "sft" in loss_types or "orpo" in loss_types:
        metrics["nll_loss"] = nll
    metrics.update(
        {
            "rewards/chosen": cr.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracies": (cr > rr).float().mean(),
            "rewards/margins": (cr - rr).mean(),
            "logps/chosen": chosen_logps.mean(),
            "logps/rejected": rejected_logps.mean(),
        }
    )
    return loss, cr, rr, metrics


# ------------------------------------------------------------------------------------------------------
# Batches and the comparison harness
# ------------------------------------------------------------------------------------------------------


def make_batch(num_pairs=3, t=9, d=16, v=37, *, bias=True, masked=(), seed=None):
    """Float64 padded batch: prompts and right padding ignored; ``masked`` rows fully ignored."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    rows = 2 * num_pairs
    hidden = torch.randn(rows, t, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5
    b = 0.3 * torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (rows, t), generator=g)
    for r in range(rows):
        prompt = int(torch.randint(1, 3, (1,), generator=g))
        end = int(torch.randint(prompt + 1, t + 1, (1,), generator=g))
        labels[r, :prompt] = IGNORE
        labels[r, end:] = IGNORE
    for r in masked:
        labels[r] = IGNORE
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=g, dtype=torch.float64)
    return hidden, weight, b, labels, ref_hidden


def _run_op(backend, hidden, weight, b, labels, *, ref=None, ref_mode="logps", **kwargs):
    """Runs the fused loss in fp32 and returns (output, dhidden, dweight, dbias) in float64 on the CPU."""
    dev = _device(backend)
    h = hidden.float().to(dev).requires_grad_()
    w = weight.float().to(dev).requires_grad_()
    bb = b.float().to(dev).requires_grad_() if b is not None else None
    lab = labels.to(dev)
    extra = {}
    if ref is not None and ref_mode == "logps":
        rc, rr = ref.chunk(2)
        extra = dict(ref_chosen_logps=rc.to(dev), ref_rejected_logps=rr.to(dev))
    elif ref is not None:
        extra = dict(ref_hidden=ref.float().to(dev))
    out = fused_linear_dpo_loss(h, w, lab, bb, backend=backend, **extra, **kwargs)
    out.loss.backward()
    grads = [x.grad.double().cpu() if x is not None else None for x in (h, w, bb)]
    return out, *grads


def _check_close(name, got, want, rtol=1e-4, atol=1e-6):
    got = got.detach().double().cpu()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= atol + rtol * scale, f"{name}: max error {err:.3g} at scale {scale:.3g}"


def check_against_reference(backend, loss_type, *, batch=None, ref_mode="logps", ld_alpha=None,
                            average_log_prob=False, reference_free=False, temperature=1.0, softcap=None,
                            impl=None, **kwargs):  # fmt: skip
    hidden, weight, b, labels, ref_hidden = batch if batch is not None else make_batch()
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    no_ref = reference_free or bool(set(loss_types) & REFERENCE_FREE)
    average = average_log_prob or bool(set(loss_types) & REFERENCE_FREE)
    opts = {**OPTS, **kwargs}

    # The op gets fp32 reference log-probs; the reference gets exactly those values.
    ref_tok, mask = ref_token_logps(ref_hidden, weight, b, labels, temperature, softcap)
    ref_logps = ref_sequence_logps(ref_tok, mask, ld_alpha, average).float().double()
    op_ref = None if no_ref else (ref_logps if ref_mode == "logps" else ref_hidden)
    out, dh, dw, db = _run_op(
        backend, hidden, weight, b, labels, ref=op_ref, ref_mode=ref_mode, loss_type=loss_type,
        ld_alpha=ld_alpha, average_log_prob=average_log_prob, reference_free=reference_free,
        temperature=temperature, softcap=softcap, impl=impl, **opts,
    )  # fmt: skip

    leaves = [x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, b)]
    tok, mask = ref_token_logps(*leaves, labels, temperature, softcap)
    logps = ref_sequence_logps(tok, mask, ld_alpha, average)
    used_ref = torch.zeros_like(ref_logps) if no_ref else ref_logps
    loss, cr, rr, metrics = ref_loss(tok, mask, logps, used_ref, loss_types=loss_types, **opts)
    loss.backward()

    _check_close("loss", out.loss, loss.detach(), rtol=2e-5)
    chosen, rejected = logps.detach().chunk(2)
    _check_close("chosen_logps", out.chosen_logps, chosen, rtol=1e-5)
    _check_close("rejected_logps", out.rejected_logps, rejected, rtol=1e-5)
    _check_close("chosen_rewards", out.chosen_rewards, cr.detach(), rtol=1e-5)
    _check_close("rejected_rewards", out.rejected_rewards, rr.detach(), rtol=1e-5)
    _check_close("ref_chosen_logps", out.ref_chosen_logps, used_ref.chunk(2)[0], rtol=1e-5)
    assert set(out.metrics) == set(metrics), sorted(set(out.metrics) ^ set(metrics))
    for key, want in metrics.items():
        _check_close(key, out.metrics[key], want.detach(), rtol=1e-5)
    for name, got, leaf in zip(("dhidden", "dweight", "dbias"), (dh, dw, db), leaves, strict=True):
        if leaf is not None:
            _check_close(name, got, leaf.grad, rtol=2e-4)
    return out


# ------------------------------------------------------------------------------------------------------
# Every loss type and option
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
def test_every_loss_type_matches_float64(backend, loss_type):
    out = check_against_reference(backend, loss_type)
    assert out.loss.dtype == torch.float32 and out.loss.ndim == 0
    assert out.chosen_logps.shape == (3,) and out.losses.shape == (3,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "exo_pair", "discopop", "sft"])
def test_f_divergences(backend, loss_type, f_divergence):
    check_against_reference(
        backend, [loss_type, "sigmoid_norm"] if loss_type == "sft" else loss_type,
        f_divergence_type=f_divergence, f_alpha_divergence_coef=0.3,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_combination_with_rpo_and_ld_alpha(backend):
    check_against_reference(
        backend, ["sigmoid", "bco_pair", "sft", "aot"], loss_weights=[0.8, 0.2, 1.0, 0.5], rpo_alpha=0.5,
        ld_alpha=0.3,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_average_log_prob_and_reference_free(backend):
    check_against_reference(backend, ["sigmoid", "ipo"], average_log_prob=True)
    check_against_reference(backend, ["hinge", "apo_zero"], reference_free=True)
    check_against_reference(backend, ["simpo", "sft"], loss_weights=[1.0, 0.1], ld_alpha=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_from_hidden_states(backend):
    batch = make_batch(v=100)
    check_against_reference(backend, "sigmoid", batch=batch, ref_mode="hidden", ld_alpha=0.4)
    # A separate reference lm_head: the loss equals the one from precomputed log-probs.
    hidden, weight, b, labels, ref_hidden = batch
    ref_w = weight + 0.05 * torch.randn_like(weight)
    ref_b = torch.randn_like(b)
    tok, mask = ref_token_logps(ref_hidden, ref_w, ref_b, labels)
    ref_logps = tok.sum(-1).float()
    dev = _device(backend)
    args = (hidden.float().to(dev), weight.float().to(dev), labels.to(dev), b.float().to(dev))
    from_hidden = fused_linear_dpo_loss(
        *args, ref_hidden=ref_hidden.float().to(dev), ref_weight=ref_w.float().to(dev),
        ref_bias=ref_b.float().to(dev), backend=backend,
    )  # fmt: skip
    from_logps = fused_linear_dpo_loss(
        *args,
        ref_chosen_logps=ref_logps[:3].to(dev),
        ref_rejected_logps=ref_logps[3:].to(dev),
        backend=backend,
    )
    torch.testing.assert_close(from_hidden.loss, from_logps.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_hidden.ref_chosen_logps.cpu(), ref_logps[:3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_softcap_and_no_bias(backend):
    hidden, weight, _, labels, ref_hidden = make_batch(bias=False)
    batch = (hidden, 3 * weight, None, labels, ref_hidden)
    check_against_reference(backend, "sigmoid", batch=batch, temperature=0.7, softcap=2.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_token_valid(backend):
    hidden, weight, b, labels, ref_hidden = make_batch()
    labels = torch.randint(0, weight.shape[0], labels.shape)
    check_against_reference(
        backend, ["ipo", "sft"], batch=(hidden, weight, b, labels, ref_hidden), ld_alpha=0.5
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "aot", "sft", "nca_pair"])
def test_fully_masked_sequence_has_zero_log_prob(backend, loss_type):
    batch = make_batch(masked=(1, 4))
    out = check_against_reference(backend, loss_type, batch=batch)
    assert out.chosen_logps[1] == 0 and out.rejected_logps[1] == 0


@pytest.mark.parametrize(
    "kwargs",
    [dict(loss_type="ipo"), dict(loss_type="sigmoid_norm"), dict(loss_type="simpo"), dict(loss_type="orpo"),
     dict(loss_type="sigmoid", average_log_prob=True)],
)  # fmt: skip
def test_fully_masked_sequence_errors_where_a_length_is_needed(kwargs):
    hidden, weight, b, labels, _ = make_batch(masked=(4,))
    ref = {} if kwargs["loss_type"] in REFERENCE_FREE else dict(reference_free=True)
    with pytest.raises(ValueError, match=r"sequences \[4\] have no valid label"):
        fused_linear_dpo_loss(hidden.float(), weight.float(), labels, **ref, **kwargs)


# ------------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------------


def to_packed(hidden, labels, seed=0):
    """Packs padded rows pair by pair (chosen j, rejected j), dropping right padding and adding an ignored
    filler token between sequences. Returns (hidden [N, D], labels [N], seq_index [N], source row of each)."""
    g = torch.Generator().manual_seed(seed)
    rows, t, d = hidden.shape
    num_pairs = rows // 2
    flat = hidden.reshape(-1, d)
    parts_h, parts_l, parts_s, src = [], [], [], []
    for j in range(num_pairs):
        for r in (j, num_pairs + j):
            valid = (labels[r] != IGNORE).nonzero()
            end = int(valid.max()) + 1 if valid.numel() else 1
            parts_h += [flat[r * t : r * t + end], torch.randn(1, d, generator=g, dtype=hidden.dtype)]
            parts_l += [labels[r, :end], torch.tensor([IGNORE])]
            parts_s += [torch.where(labels[r, :end] != IGNORE, r, -1), torch.tensor([-1])]
            src += [torch.arange(r * t, r * t + end), torch.tensor([-1])]
    return torch.cat(parts_h), torch.cat(parts_l), torch.cat(parts_s), torch.cat(src)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kwargs",
    [dict(loss_type="sigmoid"), dict(loss_type=["ipo", "sft", "aot_unpaired"], ld_alpha=0.5, rpo_alpha=0.2),
     dict(loss_type="orpo")],
)  # fmt: skip
def test_packed_equals_padded(backend, kwargs):
    hidden, weight, b, labels, _ = make_batch()
    dev = _device(backend)
    ref = {} if kwargs["loss_type"] == "orpo" else dict(reference_free=True)
    w = weight.float().to(dev)
    hp = hidden.float().to(dev).requires_grad_()
    padded = fused_linear_dpo_loss(hp, w, labels.to(dev), backend=backend, **ref, **kwargs)
    padded.loss.backward()

    ph, pl, ps, src = to_packed(hidden, labels)
    hk = ph.float().to(dev).requires_grad_()
    packed = fused_linear_dpo_loss(
        hk, w, pl.to(dev), seq_index=ps.to(dev), num_pairs=3, backend=backend, **ref, **kwargs
    )
    packed.loss.backward()

    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-6, atol=1e-6)
    for name in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "losses"):
        torch.testing.assert_close(getattr(packed, name), getattr(padded, name), rtol=1e-6, atol=1e-6)
    for key in padded.metrics:
        torch.testing.assert_close(packed.metrics[key], padded.metrics[key], rtol=1e-6, atol=1e-6)
    kept = src >= 0
    dh_padded = hp.grad.reshape(-1, hidden.shape[-1]).cpu()
    torch.testing.assert_close(hk.grad.cpu()[kept], dh_padded[src[kept]], rtol=1e-5, atol=1e-7)
    assert torch.all(hk.grad.cpu()[~kept] == 0)


# ------------------------------------------------------------------------------------------------------
# API surface
# ------------------------------------------------------------------------------------------------------


def test_metrics_are_batch_means_with_trl_names():
    out = check_against_reference("torch", "sigmoid")
    cr, rr = out.chosen_rewards, out.rejected_rewards
    assert set(out.metrics) == {
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected",
    }  # fmt: skip
    assert out.metrics["rewards/accuracies"] == (cr > rr).float().mean()
    assert out.metrics["rewards/margins"] == (cr - rr).mean()
    assert out.metrics["logps/chosen"] == out.chosen_logps.mean()
    assert all(m.ndim == 0 and not m.requires_grad for m in out.metrics.values())


def test_module_matches_functional_and_builds_no_token_graph():
    hidden, weight, b, labels, _ = make_batch()
    module = FusedLinearDPOLoss(
        beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], reference_free=True
    )
    h = hidden.float().requires_grad_()
    out = module(h, weight.float(), labels, b.float())
    twin = fused_linear_dpo_loss(
        hidden.float(), weight.float(), labels, b.float(), beta=0.3, loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.5], reference_free=True,
    )  # fmt: skip
    assert out.loss.item() == twin.loss.item()
    assert type(out.loss.grad_fn).__name__ == "_FusedLinearPreferenceLossFunctionBackward"
    assert "sft" in repr(module)
    assert not out.chosen_logps.requires_grad and not out.chosen_rewards.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logps_matches_reference_and_feeds_the_loss(backend):
    hidden, weight, b, labels, ref_hidden = make_batch()
    dev = _device(backend)
    tok, mask = ref_token_logps(ref_hidden, weight, b, labels)
    for ld_alpha, average in ((None, False), (0.25, False), (None, True)):
        chosen, rejected = sequence_logps(
            ref_hidden.float().to(dev), weight.float().to(dev), labels.to(dev), b.float().to(dev),
            ld_alpha=ld_alpha, average_log_prob=average, backend=backend,
        )  # fmt: skip
        want = ref_sequence_logps(tok, mask, ld_alpha, average)
        _check_close("chosen", chosen, want[:3], rtol=1e-5)
        _check_close("rejected", rejected, want[3:], rtol=1e-5)
    chosen, rejected = sequence_logps(
        ref_hidden.float().to(dev), weight.float().to(dev), labels.to(dev), b.float().to(dev), ld_alpha=0.25,
        backend=backend,
    )  # fmt: skip
    args = (hidden.float().to(dev), weight.float().to(dev), labels.to(dev), b.float().to(dev))
    a = fused_linear_dpo_loss(*args, ref_chosen_logps=chosen, ref_rejected_logps=rejected, ld_alpha=0.25)
    c = fused_linear_dpo_loss(*args, ref_hidden=ref_hidden.float().to(dev), ld_alpha=0.25)
    torch.testing.assert_close(a.loss, c.loss)


def test_autocast_casts_to_the_autocast_dtype():
    hidden, weight, b, labels, ref_hidden = make_batch()
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_dpo_loss(h, w, labels, ref_hidden=ref_hidden.float(), backend="torch")
    out.loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    exact = fused_linear_dpo_loss(
        hidden.float().to(torch.bfloat16), weight.float().to(torch.bfloat16), labels,
        ref_hidden=ref_hidden.to(torch.bfloat16), backend="torch",
    )  # fmt: skip
    assert out.loss.item() == exact.loss.item()
    tok, mask = ref_token_logps(hidden, weight, None, labels)
    ref_tok, _ = ref_token_logps(ref_hidden, weight, None, labels)
    want, *_ = ref_loss(tok, mask, tok.sum(-1), ref_tok.sum(-1), loss_types=["sigmoid"], beta=0.1)
    assert abs(out.loss.item() - want.item()) < 0.05 * abs(want.item())


def test_autocast_gradients_are_fp32_accumulations():
    """Under bf16 autocast: bf16 logits and dz, products summed in fp32, fp32 gradients (TRL's numerics)."""
    hidden, weight, b, labels, _ = make_batch(num_pairs=3, t=11, d=24, v=300)
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    bb = b.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_dpo_loss(h, w, labels, bb, loss_type="sft", backend="torch")
    out.loss.backward()
    assert h.grad.dtype == w.grad.dtype == bb.grad.dtype == torch.float32

    # Float64 twin of that recipe: the logits chunk rounded to bf16 as a bf16 matmul output and again after
    # the bias, d loss / d logits rounded to bf16, then exact products.
    hb, wb, bf = (x.float().bfloat16().double() for x in (hidden, weight, b))
    z = ((hb @ wb.T).bfloat16().double() + bf).bfloat16().double().requires_grad_()
    tok, mask = ref_token_logps(z, torch.eye(z.shape[-1], dtype=torch.float64), None, labels)
    (-tok.chunk(2)[0][mask.chunk(2)[0]].mean()).backward()
    dz = z.grad.bfloat16().double()
    want = {"dhidden": dz @ wb, "dweight": torch.einsum("rtv,rtd->vd", dz, hb), "dbias": dz.sum((0, 1))}
    for name, got in zip(want, (h.grad, w.grad, bb.grad), strict=True):
        # A dz entry may round the other way than in the fp32 run (up to ~2e-5 seen over 30 seeds), while
        # gradients rounded to bf16 are off by 1e-3 or more.
        _check_close(name, got, want[name], rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_autocast_returns_fp32_gradients_on_every_path(backend, impl):
    """fp16 autocast (the interpreter's bf16 dots are unreliable): every path takes fp32 masters, returns fp32
    gradients, and agrees with the torch backend to fp16 precision."""
    dev = _device(backend)
    hidden, weight, b, labels, _ = make_batch(num_pairs=2, t=7, d=16, v=100)
    grads = []
    for key in ((backend, impl), ("torch", "chunked")):
        leaves = [x.float().to(dev).requires_grad_() for x in (hidden, weight, b)]
        with torch.autocast(dev, dtype=torch.float16):
            out = fused_linear_dpo_loss(
                leaves[0],
                leaves[1],
                labels.to(dev),
                leaves[2],
                reference_free=True,
                backend=key[0],
                impl=key[1],
            )
        out.loss.backward()
        assert all(x.grad.dtype == torch.float32 for x in leaves), key
        grads.append([x.grad.double().cpu() for x in leaves])
    for name, got, want in zip(("dhidden", "dweight", "dbias"), *grads, strict=True):
        _check_close(name, got, want, rtol=1e-3)


def _wpo_weights(tok, mask, token_lsp2):
    """TRL 1.16's WPO pair weights: exp(mean over the response of logp - log sum p^2), chosen x rejected."""
    aligned = ((tok - token_lsp2) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    w = torch.exp(aligned)
    return w.chunk(2)[0] * w.chunk(2)[1]


def _ref_logits(hidden, weight, bias, softcap=None, temperature=1.0):
    z = hidden @ weight.T + (bias if bias is not None else 0)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def ref_token_stats(hidden, weight, bias, labels, softcap=None, temperature=1.0):
    """Float64 per-token (entropy, mean logit, label is argmax, log sum p^2) over all positions."""
    z = _ref_logits(hidden, weight, bias, softcap, temperature)
    logp = z.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy, z.mean(-1), z.argmax(-1) == labels, torch.logsumexp(2 * logp, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", [["sigmoid"], ["hinge", "bco_pair"], ["sigmoid", "sft"]])
def test_wpo_matches_float64(backend, loss_type):
    hidden, weight, b, labels, ref_hidden = make_batch(num_pairs=3, t=9, d=16, v=37, masked=(1,))
    tok, mask = ref_token_logps(hidden, weight, b, labels)
    lsp2 = ref_token_stats(hidden, weight, b, labels)[3]
    weights = _wpo_weights(tok.detach(), mask, lsp2)
    ref_tok, _ = ref_token_logps(ref_hidden, weight, b, labels)
    ref_logps = ref_tok.sum(-1).float().double()
    out, dh, dw, db = _run_op(
        backend, hidden, weight, b, labels, ref=ref_logps, loss_type=loss_type, use_weighting=True, beta=0.2
    )
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, b)]
    tok, mask = ref_token_logps(*leaves, labels)
    loss, *_ = ref_loss(
        tok, mask, tok.sum(-1), ref_logps, loss_types=loss_type, beta=0.2, pair_weights=weights
    )
    loss.backward()
    _check_close("loss", out.loss, loss.detach(), rtol=2e-5)
    for name, got, leaf in zip(("dhidden", "dweight", "dbias"), (dh, dw, db), leaves, strict=True):
        _check_close(name, got, leaf.grad, rtol=2e-4)
    unweighted = _run_op(backend, hidden, weight, b, labels, ref=ref_logps, loss_type=loss_type, beta=0.2)[0]
    assert abs(unweighted.loss.item() - out.loss.item()) > 1e-3 * abs(out.loss.item())


@pytest.mark.parametrize(
    "backend, v, softcap, temperature", [("torch", 70_001, None, 1.0), ("torch", 300, 2.0, 0.7),
                                         ("triton", 157, 2.0, 0.7)],
)  # fmt: skip
def test_stats_match_float64(backend, v, softcap, temperature):
    hidden, weight, b, labels, _ = make_batch(num_pairs=2, t=7, d=16, v=v, masked=(2,))
    weight = 4 * weight  # peaked distributions
    logits = _ref_logits(hidden, weight, b, softcap, temperature)
    # Every other scored token's label becomes the (float64) argmax: flags True at some, False at others.
    every_other = ((labels != IGNORE).flatten().cumsum(0) % 2 == 0).view_as(labels)
    labels = torch.where(labels == IGNORE, IGNORE, logits.argmax(-1).where(every_other, labels))
    opts = dict(loss_type="sft", stats=True, softcap=softcap, temperature=temperature)
    out, *_ = _run_op(backend, hidden, weight, b, labels, **opts)
    want = ref_token_stats(hidden, weight, b, labels, softcap, temperature)
    valid = labels != IGNORE
    got = out.token_stats
    for name, g, ref in zip(("entropy", "mean_logit", "log_sum_p2"), (got[0], got[1], got[3]),
                            (want[0], want[1], want[3]), strict=True):  # fmt: skip
        _check_close(name, g, ref[valid], rtol=1e-5, atol=1e-5)
    # Where float64's top two logits are clearly apart the flag is no rounding call, and must agree; the
    # accuracy metrics are then checked as reductions of the op's own flags.
    top2 = logits.topk(2, dim=-1).values
    clear = ((top2[..., 0] - top2[..., 1]) > 1e-5)[valid]
    flags = got.is_argmax.cpu()
    assert torch.equal(flags[clear], want[2][valid][clear])
    assert 0 < int(flags.sum()) < int(valid.sum()) and clear.any()
    is_argmax = torch.zeros_like(valid).masked_scatter_(valid, flags)
    chosen = valid.clone()
    chosen[2:] = False
    metrics = {
        "entropy": want[0][valid].mean(),
        "logits/chosen": want[1][chosen].mean(),
        "logits/rejected": want[1][valid & ~chosen].mean(),
        "mean_token_accuracy": is_argmax[chosen].double().mean(),
    }
    for key, value in metrics.items():
        _check_close(key, out.metrics[key], value, rtol=1e-5, atol=1e-6)
    entropy, count = (want[0] * valid).sum(-1), valid.sum(-1).double()
    pair_entropy = (entropy[:2] + entropy[2:]) / (count[:2] + count[2:])
    _check_close("pair entropy", out.pair_metrics["entropy"], pair_entropy, rtol=1e-5)
    accuracy = is_argmax.sum(-1)[:2] / count[:2]
    _check_close("pair accuracy", out.pair_metrics["mean_token_accuracy"], accuracy, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_impls_match_float64(backend, impl):
    check_against_reference(backend, ["sigmoid", "sft"], impl=impl, ld_alpha=0.5)
    hidden, weight, b, labels, _ = make_batch()
    chosen, _ = sequence_logps(hidden.float(), weight.float(), labels, b.float(), impl=impl)
    want = ref_token_logps(hidden, weight, b, labels)[0].sum(-1)[:3]
    _check_close("sequence_logps", chosen, want, rtol=1e-5)


def test_deterministic_algorithms_pick_chunked(monkeypatch):
    calls = []
    fused = importlib.import_module("fastdpo.losses.fused")
    forward = fused.linear_logprobs_fwd
    # The head op's arguments: (hidden, weight, bias, targets, ignore_index, temperature, softcap,
    # filter_eps, backend, impl, stats, compute_dtype).
    monkeypatch.setattr(fused, "linear_logprobs_fwd", lambda *a: calls.append(a[9]) or forward(*a))
    monkeypatch.delenv("FASTDPO_IMPL", raising=False)
    hidden, weight, b, labels, _ = make_batch()
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        fused_linear_dpo_loss(hidden.float(), weight.float(), labels, reference_free=True, backend="torch")
    finally:
        torch.use_deterministic_algorithms(previous)
    fused_linear_dpo_loss(hidden.float(), weight.float(), labels, reference_free=True, impl="fused")
    assert calls == ["chunked", "fused"]


# ------------------------------------------------------------------------------------------------------
# Bad calls and non-finite inputs
# ------------------------------------------------------------------------------------------------------


def _bad_call(case):
    hidden, weight, b, labels, ref_hidden = make_batch(seed=1)
    h, w = hidden.float(), weight.float()
    rc, rr = torch.zeros(3), torch.zeros(3)
    ref = dict(ref_chosen_logps=rc, ref_rejected_logps=rr)
    seq = torch.where(labels.reshape(-1) != IGNORE, torch.arange(6).repeat_interleave(9), -1)
    flat_h, flat_l = h.reshape(-1, 16), labels.reshape(-1)
    row = torch.arange(6)[:, None]
    loss = fused_linear_dpo_loss
    calls = {
        "odd_rows": lambda: loss(h[:5], w, labels[:5], reference_free=True),
        "labels_shape": lambda: loss(h, w, labels[:, :-1], reference_free=True),
        "ref_size": lambda: loss(h, w, labels, ref_chosen_logps=torch.zeros(4), ref_rejected_logps=rr),
        "one_ref": lambda: loss(h, w, labels, ref_chosen_logps=rc),
        "masked_ipo": lambda: loss(h, w, torch.where(row == 2, IGNORE, labels), loss_type="ipo", **ref),
        "unknown_type": lambda: loss(h, w, labels, loss_type="dpo", **ref),
        "empty_types": lambda: loss(h, w, labels, loss_type=[], **ref),
        "robust_smoothing": lambda: loss(h, w, labels, loss_type="robust", label_smoothing=0.6, **ref),
        "exo_no_smoothing": lambda: loss(h, w, labels, loss_type="exo_pair", **ref),
        "weights_length": lambda: loss(h, w, labels, loss_type=["sigmoid", "ipo"], loss_weights=[1.0], **ref),
        "missing_ref": lambda: loss(h, w, labels, loss_type=["sft", "hinge"]),
        "ref_and_free": lambda: loss(h, w, labels, reference_free=True, **ref),
        "simpo_with_ref": lambda: loss(h, w, labels, loss_type="simpo", **ref),
        "simpo_with_sigmoid": lambda: loss(h, w, labels, loss_type=["simpo", "sigmoid"], **ref),
        "fdiv_unsupported": lambda: loss(
            h, w, labels, loss_type="bco_pair", f_divergence_type="forward_kl", **ref
        ),
        "fdiv_unknown": lambda: loss(h, w, labels, f_divergence_type="kl", **ref),
        "dtype_mismatch": lambda: loss(h.bfloat16(), w, labels, **ref),
        "float_labels": lambda: loss(h, w, labels.float(), **ref),
        "packed_no_pairs": lambda: loss(flat_h, w, flat_l, seq_index=seq, **ref),
        "seq_out_of_range": lambda: loss(flat_h, w, flat_l, seq_index=seq + 1, num_pairs=3, **ref),
        "label_beyond_vocab": lambda: loss(h, w, labels.masked_fill(labels == labels.max(), 37), **ref),
        "weight_dim": lambda: loss(h, w[:, :8], labels, **ref),
        "ref_hidden_shape": lambda: loss(h, w, labels, ref_hidden=h[:, :-1]),
        "ref_weight_alone": lambda: loss(h, w, labels, ref_weight=w, **ref),
        "ref_both": lambda: loss(h, w, labels, ref_hidden=h, **ref),
        "ld_alpha": lambda: loss(h, w, labels, ld_alpha=1.5, **ref),
        "rpo_alpha": lambda: loss(h, w, labels, rpo_alpha=-1.0, **ref),
        "num_pairs_padded": lambda: loss(h, w, labels, num_pairs=2, **ref),
        "not_a_tensor": lambda: loss(h.tolist(), w, labels, **ref),
        "sft_no_chosen": lambda: loss(h, w, torch.where(row < 3, IGNORE, labels), loss_type="sft"),
        "backend": lambda: loss(h, w, labels, backend="cuda", **ref),
        "impl": lambda: loss(h, w, labels, impl="tiled", **ref),
        "wpo_aot": lambda: loss(h, w, labels, loss_type="aot", use_weighting=True, **ref),
    }
    return calls[case]


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("odd_rows", ValueError, "even, non-zero number of rows"),
        ("labels_shape", ValueError, "labels shape"),
        ("ref_size", ValueError, r"ref_chosen_logps has shape \(4,\); expected \[B\]=\[3\]"),
        ("one_ref", ValueError, "pass both ref_chosen_logps and ref_rejected_logps"),
        ("masked_ipo", ValueError, r"sequences \[2\] have no valid label.*'ipo'"),
        ("unknown_type", ValueError, r"unknown loss_type \['dpo'\]; expected any of \['sigmoid', 'hinge'"),
        ("empty_types", ValueError, "loss_type is empty"),
        ("robust_smoothing", ValueError, r"\[0, 0.5\) for the 'robust' loss"),
        ("exo_no_smoothing", ValueError, "exo_pair"),
        ("weights_length", ValueError, "loss_weights has 1 entries for 2 loss types"),
        ("missing_ref", ValueError, r"loss types \['hinge'\] need a reference"),
        ("ref_and_free", ValueError, "reference_free=True, yet a reference"),
        ("simpo_with_ref", ValueError, "reference-free; do not pass a reference"),
        ("simpo_with_sigmoid", ValueError, "cannot be combined"),
        ("fdiv_unsupported", ValueError, "only defined for loss types"),
        ("fdiv_unknown", ValueError, "unknown f_divergence_type"),
        ("dtype_mismatch", TypeError, "weight dtype torch.float32 differs from hidden dtype torch.bfloat16"),
        ("float_labels", TypeError, "labels must be an integer tensor"),
        ("packed_no_pairs", ValueError, "packed layout needs num_pairs"),
        ("seq_out_of_range", ValueError, r"seq_index must lie in \[0, 2B=6\)"),
        ("label_beyond_vocab", ValueError, r"token ids in \[0, V=37\)"),
        ("weight_dim", ValueError, r"weight must be \[V, D\] with D=16"),
        ("ref_hidden_shape", ValueError, "ref_hidden shape"),
        ("ref_weight_alone", ValueError, "only used with ref_hidden"),
        ("ref_both", ValueError, "either reference log-probs or ref_hidden"),
        ("ld_alpha", ValueError, r"ld_alpha must be None or in \[0, 1\]"),
        ("rpo_alpha", ValueError, "rpo_alpha must be None or >= 0"),
        ("num_pairs_padded", ValueError, "num_pairs=2 disagrees"),
        ("not_a_tensor", TypeError, "hidden must be a torch.Tensor"),
        ("sft_no_chosen", ValueError, "needs chosen tokens"),
        ("backend", ValueError, "backend must be"),
        ("impl", ValueError, "impl must be None, 'fused' or 'chunked'"),
        ("wpo_aot", ValueError, r"use_weighting \(WPO\).*\['aot'\]"),
    ],
)
def test_bad_calls(case, exc, match):
    with pytest.raises(exc, match=match):
        _bad_call(case)()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, on NaN arithmetic
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["hidden", "weight", "ref_logps", "ref_hidden"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "apo_zero"])
def test_non_finite_inputs_never_give_a_finite_loss(backend, where, loss_type):
    hidden, weight, b, labels, ref_hidden = make_batch()
    dev = _device(backend)
    h, w, rh = hidden.float(), weight.float(), ref_hidden.float()
    valid = (labels != IGNORE).nonzero()
    r, t = valid[len(valid) // 2].tolist()
    if where == "hidden":
        h[r, t, 0] = float("nan")
    elif where == "weight":
        w[int(labels[r, t]), 3] = float("inf")
    elif where == "ref_hidden":
        rh[r, t, 1] = float("nan")
    h = h.to(dev).requires_grad_()
    ref = dict(ref_hidden=rh.to(dev))
    if where == "ref_logps":
        ref = dict(ref_chosen_logps=torch.tensor([-3.0, float("-inf"), -2.0], device=dev),
                   ref_rejected_logps=torch.full((3,), -4.0, device=dev))  # fmt: skip
    out = fused_linear_dpo_loss(h, w.to(dev), labels.to(dev), loss_type=loss_type, backend=backend, **ref)
    assert not torch.isfinite(out.loss), f"non-finite {where} gave a finite loss"
    out.loss.backward()
    assert not torch.isfinite(h.grad).all()


def test_nan_at_an_ignored_position_does_not_matter():
    hidden, weight, b, labels, ref_hidden = make_batch()
    h = hidden.float()
    clean = fused_linear_dpo_loss(h, weight.float(), labels, reference_free=True)
    ignored = (labels == IGNORE).nonzero()[0].tolist()
    h[ignored[0], ignored[1]] = float("nan")
    dirty = fused_linear_dpo_loss(h, weight.float(), labels, reference_free=True)
    assert dirty.loss.item() == clean.loss.item()


def test_registry_matches_the_op():
    assert set(LOSS_TYPES) == set(PAIR_LOSS_TYPES) | {"sft"}
    assert {t for t, info in LOSS_TYPES.items() if info.fused} == set(KERNEL_LOSS_BITS)
    trl_types = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]  # fmt: skip
    assert list(LOSS_TYPES)[: len(trl_types)] == trl_types


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "orpo"])
def test_gpu_half_precision(dtype, loss_type):
    hidden, weight, b, labels, ref_hidden = make_batch(num_pairs=8, t=64, d=256, v=1000, masked=())
    h = hidden.to("cuda", dtype).requires_grad_()
    w = weight.to("cuda", dtype).requires_grad_()
    ref = {} if loss_type == "orpo" else dict(ref_hidden=ref_hidden.to("cuda", dtype))
    out = fused_linear_dpo_loss(h, w, labels.cuda(), loss_type=loss_type, backend="triton", **ref)
    out.loss.backward()
    plain = fused_linear_dpo_loss(
        h.detach().float(), w.detach().float(), labels.cuda(), loss_type=loss_type, backend="torch",
        **{k: v.float() for k, v in ref.items()},
    )  # fmt: skip
    assert h.grad.dtype == dtype and torch.isfinite(h.grad).all()
    assert abs(out.loss.item() - plain.loss.item()) < 0.05 * abs(plain.loss.item()) + 1e-3
