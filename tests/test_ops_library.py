"""The fastdpo:: torch.library ops: opcheck on every op and backend, fakes, and compiled loss steps."""

import pytest
import torch

from fastdpo.metarun import plan_for
from fastdpo.ops import kto_loss as kto_ops
from fastdpo.ops import preference_loss as pl_ops
from fastdpo.ops._head import backward_workspace_bytes, forward_workspace_bytes
from fastdpo.ops._head_common import interpreting
from fastdpo.ops.linear_logprobs import linear_logprobs_bwd, linear_logprobs_fwd

# The Triton backend runs here only under the interpreter (conftest sets it on machines without a GPU).
BACKENDS = ["torch"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])
HEAD_PATHS = [(b, i) for b in BACKENDS for i in ("chunked", "fused")]
# Under the interpreter a triton_op's launch cannot be traced (its kernel runs numpy on the tensors'
# data pointers, which fake tensors have not got), so the AOT-dispatch checks run only on a GPU.
_LAUNCH_CHECKS = torch.library._OPCHECK_DEFAULT_UTILS
if interpreting():
    _LAUNCH_CHECKS = tuple(u for u in _LAUNCH_CHECKS if u != "test_aot_dispatch_dynamic")


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and not interpreting() else "cpu"


def _head_inputs(n=13, d=24, v=37, dtype=torch.float32, ignored=(0, 1, 5), bias=True, device="cpu"):
    """Non-power-of-two shapes; ``ignored`` rows (or ``"all"``) carry the ignore index -100."""
    g = torch.Generator().manual_seed(n * 31 + d)
    hidden = torch.randn(n, d, generator=g).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 0.3).to(dtype).to(device).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).to(device).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[list(range(n)) if ignored == "all" else list(ignored)] = -100
    return hidden, weight, b, targets.to(device)


def _fwd_args(backend, impl, stats, dtype=torch.float32, softcap=None, **kw):
    hidden, weight, bias, targets = _head_inputs(dtype=dtype, device=_device(backend), **kw)
    eps = 1e-7 if backend == "triton" and impl == "fused" else 0.0
    return (hidden, weight, bias, targets, -100, 0.9, softcap, eps, backend, impl, stats, dtype)


@pytest.mark.parametrize("backend,impl", HEAD_PATHS)
@pytest.mark.parametrize("stats", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(dtype=torch.float16, softcap=5.0),
        dict(ignored="all", bias=False),
        dict(ignored=(), bias=False),
    ],
    ids=["fp32", "fp16-softcap", "all-ignored", "none-ignored"],
)
def test_opcheck_linear_logprobs_fwd(backend, impl, stats, case):
    """Schema, fake shapes, autograd registration and the AOT-traced forward and backward of the head."""
    torch.library.opcheck(linear_logprobs_fwd, _fwd_args(backend, impl, stats, **case))


@pytest.mark.parametrize("backend,impl", HEAD_PATHS)
@pytest.mark.parametrize("needs", [[True, True, True], [True, False, False], [False, True, True]])
def test_opcheck_linear_logprobs_bwd(backend, impl, needs):
    hidden, weight, bias, targets, *options = _fwd_args(backend, impl, False)
    ignore_index, temperature, softcap, eps, _, _, _, dtype = options
    with torch.no_grad():
        _, lse, _, _ = linear_logprobs_fwd(hidden, weight, bias, targets, *options)
    grad = torch.randn(targets.shape[0], device=hidden.device)
    args = (grad, hidden.detach(), weight.detach(), bias.detach(), targets, lse, ignore_index, temperature,
            softcap, eps, backend, impl, needs, dtype)  # fmt: skip
    torch.library.opcheck(linear_logprobs_bwd, args)


def test_opcheck_fails_on_a_wrong_fake(monkeypatch):
    """The checks above can fail: a fake one row short is caught."""
    original = linear_logprobs_fwd._abstract_fn

    def short(hidden, *rest):
        logp, lse, extra, workspace = original(hidden, *rest)
        return logp[:-1].clone(), lse, extra, workspace

    monkeypatch.setattr(linear_logprobs_fwd, "_abstract_fn", short)
    with pytest.raises(Exception, match="(?i)shape|size"):
        torch.library.opcheck(linear_logprobs_fwd, _fwd_args("torch", "chunked", False))


def _pair_inputs(dtype, pairs=5, device="cpu"):
    g = torch.Generator().manual_seed(7)
    policy = (-torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 30).to(dtype).to(device)
    ref = (-torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 30).to(dtype).to(device)
    lengths = torch.randint(1, 20, (2 * pairs,), generator=g).to(dtype).to(device)
    return policy, ref, lengths


PAIR_CONFIGS = {
    "sigmoid": pl_ops.PreferenceLossConfig(),
    "ipo+orpo": pl_ops.PreferenceLossConfig(loss_types=("ipo", "orpo"), loss_weights=(0.5, 1.0)),
    "robust-js": pl_ops.PreferenceLossConfig(
        loss_types=("robust",), label_smoothing=0.1, f_divergence_type="js_divergence"
    ),
}


@pytest.mark.parametrize("name", list(PAIR_CONFIGS))
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_preference_loss_torch(name, with_ref, dtype):
    c = PAIR_CONFIGS[name]
    policy, ref, lengths = _pair_inputs(dtype)
    options = (c.beta, c.label_smoothing, c.discopop_tau, c.simpo_gamma, c.f_divergence_type)
    types = ",".join(c.loss_types)
    args = (
        policy,
        ref if with_ref else None,
        lengths,
        types,
        list(c.loss_weights),
        *options,
        c.f_alpha_divergence_coef,
    )
    torch.library.opcheck(pl_ops._torch_op, args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", list(PAIR_CONFIGS))
@pytest.mark.parametrize("with_ref", [True, False])
def test_opcheck_preference_loss_triton(name, with_ref, monkeypatch):
    c = PAIR_CONFIGS[name]
    policy, ref, lengths = _pair_inputs(torch.float32, device=_device("triton"))
    calls = []
    real_op = pl_ops._triton_op

    def capture(*args):
        calls.append(args)
        return real_op(*args)

    monkeypatch.setattr(pl_ops, "_triton_op", capture)
    pl_ops.preference_loss_triton(policy, ref if with_ref else None, lengths, c)
    torch.library.opcheck(real_op, calls[0], test_utils=_LAUNCH_CHECKS)


def _kto_inputs(dtype, seqs=7, device="cpu"):
    g = torch.Generator().manual_seed(3)
    policy = (-torch.rand(seqs, generator=g, dtype=torch.float64) * 30).to(dtype).to(device)
    ref = (-torch.rand(seqs, generator=g, dtype=torch.float64) * 30).to(dtype).to(device)
    desirable = torch.tensor([True, False, False, True, True, False, True][:seqs], device=device)
    return policy, ref, desirable, torch.tensor(0.25, dtype=dtype, device=device)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("with_ref", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_kto_loss_torch(loss_type, with_ref, dtype):
    policy, ref, desirable, kl = _kto_inputs(dtype)
    args = (policy, ref if with_ref else None, desirable, kl, loss_type, 0.2, 1.0, 1.5)
    torch.library.opcheck(kto_ops._torch_op, args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("with_ref", [True, False])
def test_opcheck_kto_loss_triton(with_ref):
    policy, ref, desirable, kl = _kto_inputs(torch.float32, device=_device("triton"))
    args = (policy, ref if with_ref else None, desirable, kl, 0.2, 1.0, 1.5)
    torch.library.opcheck(kto_ops._triton_op, args, test_utils=_LAUNCH_CHECKS)


@pytest.mark.parametrize("backend,impl", [("triton", "fused"), ("triton", "chunked"), ("torch", "chunked")])
def test_fakes_add_the_workspace_only_when_planning_for_cuda(backend, impl):
    """On meta, the ops' workspace output holds the real path's temporaries for a CUDA plan, none else."""
    hidden, weight, bias, targets = (
        t.detach().to("meta") if t is not None else None
        for t in _head_inputs(n=40, d=16, v=300, dtype=torch.bfloat16)
    )
    targets = torch.empty(40, dtype=torch.long, device="meta")  # values unknown: every row counts
    args = (hidden, weight, bias, targets, -100, 1.0, None, 0.0, backend, impl, True, torch.bfloat16)
    _, _, _, workspace = linear_logprobs_fwd(*args)
    assert workspace.numel() == 0
    with plan_for("cuda"):
        logp, lse, extra, workspace = linear_logprobs_fwd(*args)
        lse_real = torch.empty(40, device="meta")
        grads = linear_logprobs_bwd(logp, hidden, weight, bias, targets, lse_real, -100, 1.0, None, 0.0,
                                    backend, impl, [True, True, True], torch.bfloat16)  # fmt: skip
    assert [t.shape for t in (logp, lse, *extra)] == [(40,)] * 6
    kw = dict(backend=backend, impl=impl)
    fwd = forward_workspace_bytes(
        40, 40, 16, 300, torch.bfloat16, torch.bfloat16, torch.bfloat16, stats=True, **kw
    )
    bwd = backward_workspace_bytes(
        40, 40, 16, 300, torch.bfloat16, torch.bfloat16, torch.bfloat16, needs=(True, True, True), **kw
    )
    assert workspace.numel() == fwd > 0
    assert grads[3].numel() == bwd > 0
    assert [g.shape for g in grads[:3]] == [hidden.shape, weight.shape, bias.shape]


def _padded_batch(rows, t, d=16, v=37, seed=0):
    """``rows`` sequences of ``t`` tokens: the first few are prompt (ignored), one row wholly ignored."""
    g = torch.Generator().manual_seed(seed + rows * 100 + t)
    hidden = torch.randn(rows, t, d, generator=g).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    labels = torch.randint(0, v, (rows, t), generator=g)
    labels[:, : t // 3] = -100
    labels[-1, :] = -100  # a fully masked response: log-prob 0, as TRL
    return hidden, weight, labels


def _compare_compiled(step, batches):
    """Runs ``step`` eagerly and compiled (fullgraph, dynamic, aot_eager) on each batch; one compile.

    Tolerance: aot_eager runs the same aten kernels as eager and the head is the same opaque op, so the
    compiled numbers differ only where AOT decomposes an op (means into sum and division, the sigmoid's
    backward) or a count becomes a device fp32 value: a few fp32 ulps of O(1) values.
    """
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    frames = 0
    for hidden, weight, *rest in batches:
        want = step(hidden, weight, *rest)
        want_grads = torch.autograd.grad(want[0], (hidden, weight))
        got = compiled(hidden, weight, *rest)
        got_grads = torch.autograd.grad(got[0], (hidden, weight))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grads, want_grads, rtol=1e-5, atol=1e-6)
        assert want_grads[0].abs().sum() > 0
        frames = frames or counter.frame_count
    assert counter.frame_count == frames  # the second token count reuses what the first compiled


@pytest.mark.parametrize(
    "options",
    [{}, {"loss_type": ["ipo", "sigmoid"], "rpo_alpha": 0.5, "ld_alpha": 0.7}, {"stats": True}],
    ids=["sigmoid", "mix", "stats"],
)
def test_compiled_dpo_step_equals_eager(options):
    from fastdpo import FusedLinearDPOLoss

    loss_fn = FusedLinearDPOLoss(backend="torch", **options)

    def step(hidden, weight, labels, ref_chosen, ref_rejected):
        out = loss_fn(hidden, weight, labels, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        stats = tuple(out.token_stats) if out.token_stats is not None else ()
        metrics = (out.metrics, out.pair_metrics, stats)
        return out.loss, out.losses, out.chosen_rewards, out.rejected_logps, *metrics

    batches = []
    # Sizes all distinct, so that no two dimensions are guarded equal (duck sizing) and recompiled.
    for pairs, t in ((3, 11), (5, 14)):
        hidden, weight, labels = _padded_batch(2 * pairs, t)
        labels[-1, -1] = 3  # ipo divides by the length: every response keeps a token
        batches.append((hidden, weight, labels, *(-torch.rand(2, pairs) * 5)))
    _compare_compiled(step, batches)


@pytest.mark.parametrize("stats", [False, True])
def test_compiled_kto_step_equals_eager(stats):
    from fastdpo import FusedLinearKTOLoss

    loss_fn = FusedLinearKTOLoss(backend="torch", beta=0.2, stats=stats)

    def step(hidden, weight, labels, kl_hidden, desirable, ref, kl_ref):
        out = loss_fn(
            hidden, weight, labels, preference_labels=desirable, ref_logps=ref, kl_hidden=kl_hidden,
            kl_labels=labels, kl_ref_logps=kl_ref,
        )  # fmt: skip
        token_stats = tuple(out.token_stats) if out.token_stats is not None else ()
        return out.loss, out.losses, out.rewards, out.kl, out.metrics, token_stats

    batches = []
    for seqs, t in ((5, 11), (7, 14)):
        hidden, weight, labels = _padded_batch(seqs, t)
        kl_hidden = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seqs))
        desirable = torch.arange(seqs) % 2 == 0
        batches.append((hidden, weight, labels, kl_hidden, desirable, *(-torch.rand(2, seqs) * 5)))
    _compare_compiled(step, batches)


def test_compiled_step_asserts_on_the_device():
    """Compiled, a label outside the vocabulary fails on the device (eagerly: a ValueError naming it)."""
    from fastdpo import FusedLinearDPOLoss

    loss_fn = FusedLinearDPOLoss(backend="torch", reference_free=True)
    compiled = torch.compile(
        lambda h, w, labels: loss_fn(h, w, labels).loss, backend="aot_eager", fullgraph=True, dynamic=True
    )
    hidden, weight, labels = _padded_batch(4, 9)
    compiled(hidden, weight, labels)
    labels[0, -1] = weight.shape[0]
    with pytest.raises(ValueError, match="token ids"):
        loss_fn(hidden, weight, labels)
    with pytest.raises(RuntimeError, match="token ids"):
        compiled(hidden, weight, labels)


@pytest.mark.parametrize("stats", [False, True])
def test_compiled_linear_logprobs_equals_eager(stats):
    from fastdpo import linear_logprobs

    def head(h, w, t):
        out = linear_logprobs(h, w, t, backend="torch", softcap=4.0, stats=stats)
        logp = out.logps if stats else out
        return (logp.sum(), *(out if stats else (out,)))

    _compare_compiled(head, [_padded_batch(3, 11), _padded_batch(5, 14)])
