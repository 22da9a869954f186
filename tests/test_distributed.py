"""Two gloo ranks on the CPU against one process: vocab-parallel head, DDP and FSDP2 steps, DCP checkpoints.

The two ranks are spawned once for the module (importing torch and transformers dominates a spawn) and run
one task at a time; tasks only compute and return numbers, the assertions run here, so a failing check never
leaves one rank waiting in a collective. The dead-rank test spawns its own pair.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import queue
import re
import shutil
import socket
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from fastdpo.checkpoint import (
    CheckpointError,
    consolidate,
    latest_sharded,
    load_sharded,
    resume_point,
    save_sharded,
)
from fastdpo.distributed import (
    DistState,
    all_reduce_sum,
    gather_metrics,
    global_pair_count,
    gradient_sync,
    init_distributed,
    shard_bins,
    unsharded_lm_head,
    unwrap_model,
    wrap_model,
)
from fastdpo.losses import FusedLinearDPOLoss
from fastdpo.modeling import packed_hidden_states
from fastdpo.ops._head_common import TokenStats
from fastdpo.ops.linear_logprobs import linear_logprobs
from fastdpo.ops.vocab_parallel import vocab_parallel_linear_logprobs
from fastdpo.packing import IGNORE_INDEX, pack_pairs
from fastdpo.reference import linear_logprobs_reference, token_stats_reference

WORLD = 2
VOCAB = 96
POOL_TIMEOUT_S = 60  # process-group timeout of the shared ranks: a broken collective fails, never hangs
TASK_TIMEOUT_S = 150


# --------------------------------------------------------------------------------------------------
# Rank pool
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        FASTDPO_BACKEND="torch",
    )
    torch.set_num_threads(1)


def _serve(rank: int, port: int, tasks: list, results) -> None:
    """A rank of the pool: runs pickled ``(fn, args)`` tasks until it receives None."""
    _rank_env(rank, port)
    init_distributed(timeout_s=POOL_TIMEOUT_S)
    while (job := tasks[rank].get()) is not None:
        fn, args = pickle.loads(job)
        try:
            reply = ("ok", fn(rank, *args))
        except Exception as err:
            reply = ("error", (type(err).__name__, str(err), traceback.format_exc()))
        results.put((rank, pickle.dumps(reply)))
    torch.distributed.destroy_process_group()


class _Ranks:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.tasks = [ctx.Queue() for _ in range(WORLD)]
        self.results = ctx.Queue()
        self.procs = mp.start_processes(
            _serve,
            args=(_free_port(), self.tasks, self.results),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )

    def run(self, fn, *args, expect_errors: bool = False) -> list:
        """Runs ``fn(rank, *args)`` on every rank; returns the results, or ``(type, message)`` errors."""
        for q in self.tasks:
            q.put(pickle.dumps((fn, args)))
        replies: dict[int, tuple] = {}
        deadline = time.monotonic() + TASK_TIMEOUT_S
        while len(replies) < WORLD:
            try:
                rank, blob = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs.processes if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    pytest.fail(
                        f"rank pool broke (exit codes {dead}) or {fn.__name__} ran past {TASK_TIMEOUT_S}s"
                    )
                continue
            replies[rank] = pickle.loads(blob)
        out = []
        for rank in range(WORLD):
            status, value = replies[rank]
            if status == "error" and not expect_errors:
                pytest.fail(f"rank {rank} raised in {fn.__name__}:\n{value[2]}")
            out.append(value[:2] if status == "error" else value)
        return out

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        if not self.procs.join(timeout=30):
            for p in self.procs.processes:
                p.kill()


@pytest.fixture(scope="module")
def ranks():
    pool = _Ranks()
    yield pool
    pool.close()


# --------------------------------------------------------------------------------------------------
# Shared helpers (run in the ranks and here)
# --------------------------------------------------------------------------------------------------


def _tiny_llama(tied: bool, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _random_pairs(n: int, g: torch.Generator) -> list[dict[str, list[int]]]:
    def ids(lo: int, hi: int) -> list[int]:
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return torch.randint(0, VOCAB, (k,), generator=g).tolist()

    return [{"prompt_ids": ids(1, 8), "chosen_ids": ids(1, 6), "rejected_ids": ids(1, 6)} for _ in range(n)]


def _dpo_step(model, base, pairs, ref_logps, *, world_size: int = 1):
    """One fused DPO forward and backward on ``pairs``; the loss is scaled for the data-parallel mean."""
    batch = pack_pairs(pairs, shared_prompt=True)
    hidden = packed_hidden_states(base, batch)
    with unsharded_lm_head(model) as (weight, bias):
        out = FusedLinearDPOLoss(beta=0.1)(
            hidden, weight, batch.labels, bias, ref_chosen_logps=ref_logps[0],
            ref_rejected_logps=ref_logps[1], seq_index=batch.seq_index, num_pairs=batch.num_pairs,
        )  # fmt: skip
    total = global_pair_count(batch.num_pairs)
    (out.loss * (batch.num_pairs * world_size / total)).backward()
    return out, batch.num_pairs, total, weight.dtype


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


# --------------------------------------------------------------------------------------------------
# Vocab-parallel head
# --------------------------------------------------------------------------------------------------


def _vocab_parallel_task(
    rank, hidden, weight, bias, targets, grad_out, rows, offsets, opts, via_public, backend, stats=False
):
    start = offsets[rank] if offsets is not None else sum(rows[:rank])
    h = hidden.clone().requires_grad_()
    w = weight[start : start + rows[rank]].clone().requires_grad_()
    b = bias[start : start + rows[rank]].clone().requires_grad_()
    if via_public:
        out = linear_logprobs(
            h, w, targets, b, group=torch.distributed.group.WORLD, backend=backend, stats=stats, **opts
        )
    else:
        offset = None if offsets is None else offsets[rank]
        out = vocab_parallel_linear_logprobs(
            h, w, targets, b, group=None, vocab_offset=offset, backend=backend, stats=stats, **opts
        )
    extra = tuple(x.detach() for x in out[1:]) if stats else ()
    logp = out.logps if stats else out
    (logp * grad_out).sum().backward()
    return logp.detach(), h.grad, w.grad, b.grad, start, extra


def _vp_inputs(shape, d, v, ignore_frac):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    hidden = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.25
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, shape, generator=g)
    targets[torch.rand(shape, generator=g) < ignore_frac] = IGNORE_INDEX
    targets.view(-1)[0] = v - 1  # a target in the last shard
    grad_out = torch.randn(shape, dtype=torch.float64)
    return hidden, weight, bias, targets, grad_out


@pytest.mark.parametrize(
    "rows, offsets, opts, via_public, ignore_frac, backend",
    [
        ((20, 17), None, {}, False, 0.3, "torch"),
        ((9, 28), (28, 0), {"softcap": 3.0, "temperature": 0.7}, False, 0.3, "torch"),
        ((19, 18), None, {"softcap": 5.0}, True, 0.0, "torch"),
        ((40, 30), (30, 0), {"softcap": 4.0}, False, 0.3, "triton"),
    ],
    ids=["uneven", "explicit-offsets-softcap", "linear_logprobs-group-all-valid", "triton-kernels"],
)
def test_vocab_parallel_matches_single_process(ranks, rows, offsets, opts, via_public, ignore_frac, backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    v, d, shape = sum(rows), 24, (3, 11)
    hidden, weight, bias, targets, grad_out = _vp_inputs(shape, d, v, ignore_frac)
    f32 = [x.float() for x in (hidden, weight, bias)]
    results = ranks.run(
        _vocab_parallel_task, *f32, targets, grad_out.float(), rows, offsets, opts, via_public, backend
    )  # fmt: skip

    ref_leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref = linear_logprobs_reference(*ref_leaves[:2], targets, ref_leaves[2], **opts)
    (ref * grad_out).sum().backward()
    single_leaves = [x.clone().requires_grad_() for x in f32]
    single = linear_logprobs(*single_leaves[:2], targets, single_leaves[2], backend="torch", **opts)
    (single * grad_out.float()).sum().backward()

    dw = torch.zeros(v, d, dtype=torch.float64)
    db = torch.zeros(v, dtype=torch.float64)
    for out, dh, dw_shard, db_shard, start, _ in results:
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, single.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dh.double(), ref_leaves[0].grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dh, single_leaves[0].grad, rtol=1e-4, atol=1e-5)
        dw[start : start + dw_shard.shape[0]] = dw_shard.double()
        db[start : start + db_shard.shape[0]] = db_shard.double()
    assert (results[0][0] == results[1][0]).all(), "ranks disagree on the log-probs"
    torch.testing.assert_close(dw, ref_leaves[1].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(db, ref_leaves[2].grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw.float(), single_leaves[1].grad, rtol=1e-4, atol=1e-5)
    ignored = targets == IGNORE_INDEX
    assert (results[0][0][ignored] == 0).all()


@pytest.mark.parametrize(
    "rows, offsets, opts, backend",
    [
        ((20, 17), (17, 0), {"softcap": 3.0, "temperature": 0.7}, "torch"),
        ((40, 30), None, {}, "triton"),
    ],
    ids=["torch-explicit-offsets-softcap", "triton-kernels"],
)
def test_vocab_parallel_stats_match_float64(ranks, rows, offsets, opts, backend):
    """The whole vocabulary's statistics on every rank, as one process computes them (float64 reference)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    v, d, shape = sum(rows), 24, (3, 11)
    hidden, weight, bias, targets, grad_out = _vp_inputs(shape, d, v, 0.3)
    targets[0, 1] = IGNORE_INDEX  # an ignored token (zeros) next to the last shard's target
    f32 = [x.float() for x in (hidden, weight, bias)]
    results = ranks.run(
        _vocab_parallel_task, *f32, targets, grad_out.float(), rows, offsets, opts, False, backend, True
    )  # fmt: skip
    want = token_stats_reference(hidden, weight, targets, bias, **opts)
    plain = token_stats_reference(*f32[:2], targets, f32[2], **opts)
    single = linear_logprobs(*f32[:2], targets, f32[2], backend="torch", stats=True, **opts)
    clear = _clear_argmax(hidden, weight, bias, opts)
    for *_, extra in results:
        for name, got in zip(TokenStats._fields, extra, strict=True):
            assert got.shape == targets.shape and not got.requires_grad, name
            if name == "is_argmax":
                assert torch.equal(got[clear], want[name][clear]) and torch.equal(got, single.is_argmax)
                continue
            err = (got.double() - want[name]).abs().max().item()
            plain_err = (plain[name].double() - want[name]).abs().max().item()
            assert err <= 2 * plain_err + 1e-5 * max(want[name].abs().max().item(), 1.0), name
            torch.testing.assert_close(got, getattr(single, name), rtol=1e-5, atol=1e-5, msg=name)
            assert (got[targets == IGNORE_INDEX] == 0).all(), name
    for a, b in zip(results[0][5], results[1][5], strict=True):
        assert torch.equal(a, b), "ranks disagree on the statistics"


def _clear_argmax(hidden, weight, bias, opts):
    """Tokens whose float64 top two logits are clearly apart: their argmax flag is not a rounding call."""
    z = hidden @ weight.T + bias
    if opts.get("softcap"):
        z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    top2 = z.topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) > 1e-3


def _vp_ties_task(rank):
    """Weight rows 3 and 12 tie for every token's maximum; they lie in different shards (rows 10 / 9)."""
    d, v = 8, 19
    weight = torch.randn(v, d, generator=torch.Generator().manual_seed(0)) * 0.01
    weight[[3, 12]] = 1.0
    hidden = torch.ones(4, d)
    targets = torch.tensor([3, 12, 5, IGNORE_INDEX])
    start, rows = (0, 10) if rank == 0 else (10, 9)
    shard = weight[start : start + rows]
    return vocab_parallel_linear_logprobs(hidden, shard, targets, group=None, stats=True).is_argmax.tolist()


def test_vocab_parallel_is_argmax_ties_go_to_the_first_maximum_across_shards(ranks):
    assert ranks.run(_vp_ties_task) == [[True, False, False, False]] * 2


def _vp_error_task(rank, case):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 8, generator=g)
    targets = torch.randint(0, 10, (5,), generator=g)
    weight = torch.randn(5, 8, generator=g)
    offset = None
    if case == "overlap":
        offset = 0
    elif case == "gap":
        offset = 0 if rank == 0 else 6
    elif case == "offset-on-one-rank":
        offset = 0 if rank == 0 else None
    elif case == "targets-differ":
        targets = targets + rank if rank else targets.clamp(max=8)
    elif case == "target-outside-vocab":
        targets[2] = 10
    elif case == "bad-hidden-size-on-one-rank":
        weight = torch.randn(5, 8 + rank, generator=g)
    vocab_parallel_linear_logprobs(hidden, weight, targets, group=None, vocab_offset=offset)
    return "no error"


@pytest.mark.parametrize(
    "case, match",
    [
        ("overlap", "tile"),
        ("gap", "tile"),
        ("offset-on-one-rank", "every rank or on none"),
        ("targets-differ", "same targets"),
        ("target-outside-vocab", "outside"),
        ("bad-hidden-size-on-one-rank", "rank"),
    ],
)
def test_vocab_parallel_rejects_inconsistent_ranks_on_every_rank(ranks, case, match):
    errors = ranks.run(_vp_error_task, case, expect_errors=True)
    for kind, message in errors:
        assert kind == "ValueError" and match in message, (kind, message)


# --------------------------------------------------------------------------------------------------
# DDP and FSDP2 steps against one process
# --------------------------------------------------------------------------------------------------


def _step_task(rank, strategy, tied, seed, pairs_by_rank, ref_by_rank, lr, param_dtype=None):
    state = init_distributed()
    model = wrap_model(_tiny_llama(tied, seed), strategy, state, param_dtype=param_dtype)
    base = unwrap_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out, n_local, total, head_dtype = _dpo_step(
        model, base, pairs_by_rank[rank], ref_by_rank[rank], world_size=WORLD
    )
    grads = {name: _full(p.grad) for name, p in base.named_parameters()}
    opt.step()
    params = {name: _full(p) for name, p in base.named_parameters()}
    loss = all_reduce_sum(out.loss.detach() * n_local) / total
    metrics = gather_metrics(out.metrics, n_local)
    still_tied = base.lm_head.weight is base.model.embed_tokens.weight
    return {
        "loss": float(loss),
        "metrics": metrics,
        "grads": grads,
        "params": params,
        "tied": still_tied,
        "head_dtype": head_dtype,
    }


def _single_process_step(tied, seed, pairs, ref_logps, lr):
    model = _tiny_llama(tied, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out, *_ = _dpo_step(model, model, pairs, ref_logps)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    opt.step()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    metrics = {k: float(v) for k, v in out.metrics.items()}
    return {"loss": float(out.loss.detach()), "metrics": metrics, "grads": grads, "params": params}


@pytest.mark.parametrize("strategy, tied", [("ddp", False), ("ddp", True), ("fsdp2", False), ("fsdp2", True)])
def test_data_parallel_step_equals_one_process_on_the_global_batch(ranks, strategy, tied):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    seed = int(torch.randint(0, 2**30, (1,), generator=g))
    pairs = _random_pairs(5, g)
    ref = torch.randn(2, 5, generator=g) * 3 - 20
    split = (2, 5)  # rank 0 holds 2 pairs, rank 1 holds 3: the global mean must weight them
    pairs_by_rank = [pairs[: split[0]], pairs[split[0] :]]
    ref_by_rank = [ref[:, : split[0]], ref[:, split[0] :]]
    lr = 0.5

    results = ranks.run(_step_task, strategy, tied, seed, pairs_by_rank, ref_by_rank, lr)
    want = _single_process_step(tied, seed, pairs, ref, lr)

    for got in results:
        assert got["tied"] == tied and got["head_dtype"] == torch.float32
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-6)
        assert got["metrics"].keys() == want["metrics"].keys()
        for k, v in want["metrics"].items():
            assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        assert got["grads"].keys() == want["grads"].keys()
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        for name, param in want["params"].items():
            torch.testing.assert_close(got["params"][name], param, rtol=1e-5, atol=1e-6, msg=name)
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert want["grads"][head].abs().max() > 1e-4, "the head got no gradient to compare"


def _accumulation_task(rank, strategy, seed, micro_by_rank, lr):
    """Micro-batches with gradient sync on the last only; ``None`` is a padding step (weight 0)."""
    model = wrap_model(_tiny_llama(False, seed), strategy, init_distributed())
    base = unwrap_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    micro = micro_by_rank[rank]
    total = global_pair_count(sum(len(m[0]) for m in micro if m is not None))
    for k, entry in enumerate(micro):
        pairs, ref = micro[0] if entry is None else entry
        local = 0 if entry is None else len(pairs)
        with gradient_sync(model, enabled=k == len(micro) - 1):
            batch = pack_pairs(pairs, shared_prompt=True)
            hidden = packed_hidden_states(base, batch)
            with unsharded_lm_head(model) as (weight, bias):
                out = FusedLinearDPOLoss(beta=0.1)(
                    hidden, weight, batch.labels, bias, ref_chosen_logps=ref[0], ref_rejected_logps=ref[1],
                    seq_index=batch.seq_index, num_pairs=batch.num_pairs,
                )  # fmt: skip
            (out.loss * (local * WORLD / total)).backward()
        if k == 0:
            grad = base.lm_head.weight.grad
            unsynced = None if grad is None else grad.detach().clone()
    opt.step()
    return {name: _full(p) for name, p in base.named_parameters()}, unsynced


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_accumulation_with_a_padding_step_equals_one_process(ranks, strategy):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    seed = int(torch.randint(0, 2**30, (1,), generator=g))
    pairs = _random_pairs(5, g)
    ref = torch.randn(2, 5, generator=g) * 3 - 20
    # Rank 0 runs two micro-batches (1 and 2 pairs); rank 1 one of 2 pairs and then a padding step.
    micro_by_rank = [
        [(pairs[0:1], ref[:, 0:1]), (pairs[1:3], ref[:, 1:3])],
        [(pairs[3:5], ref[:, 3:5]), None],
    ]
    results = ranks.run(_accumulation_task, strategy, seed, micro_by_rank, 0.5)
    want = _single_process_step(False, seed, pairs, ref, 0.5)["params"]
    for got, _ in results:
        for name, param in want.items():
            torch.testing.assert_close(got[name], param, rtol=1e-5, atol=1e-6, msg=name)
    unsynced = [grad for _, grad in results]
    if strategy == "ddp":  # local gradients, not yet averaged over ranks
        assert not torch.allclose(unsynced[0], unsynced[1])
    else:  # FSDP2 keeps the unsharded gradient until a synchronized backward reduce-scatters it
        assert unsynced == [None, None]


def _fsdp_head_without_forward_task(rank, seed):
    model = wrap_model(_tiny_llama(False, seed), "fsdp2", init_distributed())
    with torch.no_grad(), unsharded_lm_head(model) as (weight, bias):
        gathered = (type(weight).__name__, weight.detach().clone(), bias)
    resharded = isinstance(model.lm_head.weight, DTensor)
    try:
        with unsharded_lm_head(model):
            pass
        error = None
    except RuntimeError as err:
        error = str(err)
    return {"gathered": gathered, "resharded": resharded, "error": error}


def test_fsdp2_head_outside_a_forward_is_gathered_then_freed(ranks):
    seed = int(torch.seed() % 2**30)
    want = _tiny_llama(False, seed).lm_head.weight.detach()
    for got in ranks.run(_fsdp_head_without_forward_task, seed):
        kind, weight, bias = got["gathered"]
        assert kind == "Parameter" and bias is None
        assert torch.equal(weight, want)
        assert got["resharded"]
        assert "decoder forward" in got["error"]


def test_fsdp2_bf16_mixed_precision_keeps_fp32_master_weights(ranks):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    seed = int(torch.randint(0, 2**30, (1,), generator=g))
    pairs = _random_pairs(4, g)
    ref = torch.randn(2, 4, generator=g) * 3 - 20
    args = (seed, [pairs[:1], pairs[1:]], [ref[:, :1], ref[:, 1:]], 0.5)
    results = ranks.run(_step_task, "fsdp2", True, *args, torch.bfloat16)
    want = _single_process_step(True, seed, pairs, ref, 0.5)
    for got in results:
        assert got["head_dtype"] == torch.bfloat16
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)
        for name, grad in want["grads"].items():
            assert got["grads"][name].dtype == torch.float32
            err = (got["grads"][name] - grad).norm() / grad.norm()
            assert err < 5e-2, (name, float(err))


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints
# --------------------------------------------------------------------------------------------------


def _checkpoint_task(rank, run_dir, seed, batches):
    state = init_distributed()

    def build(lr):
        model = wrap_model(_tiny_llama(True, seed), "fsdp2", state)
        return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)

    def step(model, opt, k):
        opt.zero_grad()
        pairs, ref = batches[k]
        _dpo_step(model, model, pairs[rank], ref[rank], world_size=WORLD)
        opt.step()

    def full_params(model):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.clone() for k, v in sd.items()}

    model, opt = build(1e-2)
    step(model, opt, 0)
    save_sharded(run_dir, 1, model, opt, {"data": {"epoch": 0, "next": 7}, "lr": [1e-2]})
    after_1 = full_params(model)
    step(model, opt, 1)
    after_2 = full_params(model)

    resumed, resumed_opt = build(0.5)  # the saved learning rate must come back from the checkpoint
    loaded_step, extra = load_sharded(run_dir, resumed, resumed_opt)
    loaded_1 = full_params(resumed)
    step(resumed, resumed_opt, 1)
    resumed_2 = full_params(resumed)
    save_sharded(run_dir, 2, resumed, resumed_opt, keep_last=1)
    return {
        "after_1": after_1,
        "after_2": after_2,
        "loaded_1": loaded_1,
        "resumed_2": resumed_2,
        "step": loaded_step,
        "extra": extra,
        "latest": str(latest_sharded(run_dir)),
    }


def test_sharded_checkpoint_resumes_exactly_and_consolidates(ranks, tmp_path):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    seed = int(torch.randint(0, 2**30, (1,), generator=g))
    batches = []
    for _ in range(2):
        pairs = _random_pairs(4, g)
        ref = torch.randn(2, 4, generator=g) * 3 - 20
        batches.append(([pairs[:2], pairs[2:]], [ref[:, :2], ref[:, 2:]]))
    run_dir = tmp_path / "run"

    got = ranks.run(_checkpoint_task, str(run_dir), seed, batches)[0]

    assert got["step"] == 1 and got["extra"] == {"data": {"epoch": 0, "next": 7}, "lr": [1e-2]}
    assert got["after_1"].keys() == got["loaded_1"].keys()
    for name in got["after_1"]:
        assert torch.equal(got["loaded_1"][name], got["after_1"][name]), name
        assert torch.equal(got["resumed_2"][name], got["after_2"][name]), name
        assert not torch.equal(got["after_2"][name], got["after_1"][name]), name
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest-sharded", "sharded-00000002"]
    assert got["latest"] == str(run_dir / "sharded-00000002")

    one_process = _tiny_llama(True, seed + 1)
    opt = torch.optim.AdamW(one_process.parameters(), lr=1e-2, weight_decay=0.1)
    assert load_sharded(run_dir, one_process, opt) == (2, {})
    for name, value in one_process.state_dict().items():
        assert torch.equal(value, got["resumed_2"][name]), name
    assert len(opt.state_dict()["state"]) == len(list(one_process.parameters()))

    config = _tiny_llama(True, seed).config
    out = consolidate(run_dir, tmp_path / "hf", config)
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in out.iterdir())
    loaded = AutoModelForCausalLM.from_pretrained(out)
    expected = _tiny_llama(True, seed)
    expected.load_state_dict(got["resumed_2"])
    ids = torch.randint(0, VOCAB, (2, 9), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def _metrics_mismatch_task(rank):
    return gather_metrics({"a": 1.0, f"b{rank}": 2.0}, 3)


def test_gather_metrics_rejects_different_names_on_every_rank(ranks):
    for kind, message in ranks.run(_metrics_mismatch_task, expect_errors=True):
        assert kind == "ValueError" and "different metric names" in message


def _weighted_metrics_task(rank):
    nan_on_padding = float("nan") if rank == 1 else 4.0
    return gather_metrics(
        {"pairs": 1.0 + rank, "padding": nan_on_padding, "tokens": 10.0 * (rank + 1)},
        {"pairs": 1 + 2 * rank, "padding": 0 if rank == 1 else 2, "tokens": 5 - rank},
    )


def test_gather_metrics_weights_ranks(ranks):
    for got in ranks.run(_weighted_metrics_task):
        assert got["pairs"] == pytest.approx((1 * 1.0 + 3 * 2.0) / 4)
        assert got["padding"] == pytest.approx(4.0)
        assert got["tokens"] == pytest.approx((5 * 10.0 + 4 * 20.0) / 9)


# --------------------------------------------------------------------------------------------------
# A dying rank
# --------------------------------------------------------------------------------------------------

DEATH_TIMEOUT_S = 20


def _dying_rank(rank: int, port: int, out_dir: str) -> None:
    _rank_env(rank, port)
    state = init_distributed(timeout_s=DEATH_TIMEOUT_S)
    model = wrap_model(_tiny_llama(False, 0), "ddp", state)
    pairs = _random_pairs(2, torch.Generator().manual_seed(rank))
    batch = pack_pairs(pairs, shared_prompt=False)
    hidden = packed_hidden_states(unwrap_model(model), batch)
    with unsharded_lm_head(model) as (weight, bias):
        out = FusedLinearDPOLoss(reference_free=True)(
            hidden, weight, batch.labels, bias, seq_index=batch.seq_index, num_pairs=batch.num_pairs
        )
    if rank == 1:
        raise RuntimeError("simulated crash of rank 1 in the middle of a step")
    report = {}
    for what, collective in (
        ("metric", lambda: all_reduce_sum(out.loss.detach())),
        ("backward", out.loss.backward),
    ):
        start = time.monotonic()
        try:
            collective()
            report[what] = {"error": None}
        except Exception as err:
            report[what] = {"error": type(err).__name__, "message": str(err)}
        report[what]["seconds"] = time.monotonic() - start
    Path(out_dir, "rank0.json").write_text(json.dumps(report))


def test_a_dying_rank_fails_the_others_instead_of_hanging(tmp_path):
    procs = mp.start_processes(
        _dying_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn"
    )
    survivor = procs.processes[0]
    survivor.join(timeout=DEATH_TIMEOUT_S + 60)
    hung = survivor.is_alive()
    for p in procs.processes:
        if p.is_alive():
            p.kill()
        p.join()
    assert not hung, "rank 0 hung after rank 1 died"
    report = json.loads((tmp_path / "rank0.json").read_text())
    for what in ("metric", "backward"):
        assert report[what]["error"] is not None, f"rank 0's {what} collective succeeded without its peer"
        assert report[what]["seconds"] < DEATH_TIMEOUT_S + 15
    assert report["metric"]["error"] == "RuntimeError"
    assert "all_reduce_sum failed on rank 0 of 2" in report["metric"]["message"]
    assert "crashed" in report["metric"]["message"]


# --------------------------------------------------------------------------------------------------
# Single-process behaviour
# --------------------------------------------------------------------------------------------------


def test_init_distributed_single_process_and_half_set_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    state = init_distributed()
    assert (state.rank, state.world_size, state.local_rank, state.is_main) == (0, 1, 0, True)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="incomplete.*LOCAL_RANK"):
        init_distributed()
    for name, value in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="inconsistent"):
        init_distributed()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        init_distributed()


def test_single_process_helpers_pass_through():
    state = DistState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    model = _tiny_llama(False, 0)
    assert wrap_model(model, "none", state) is model
    with unsharded_lm_head(model) as (weight, bias):
        assert weight is model.lm_head.weight and bias is None
    with pytest.raises(ValueError, match="needs a process group"):
        wrap_model(model, "fsdp2", state)
    with pytest.raises(ValueError, match="strategy must be one of"):
        wrap_model(model, "zero3", state)
    with pytest.raises(ValueError, match="param_dtype"):
        wrap_model(model, "ddp", state, param_dtype=torch.bfloat16)
    assert all_reduce_sum(3) == 3 and global_pair_count(4) == 4
    x = torch.randn(3)
    assert torch.equal(all_reduce_sum(x), x)
    metrics = gather_metrics({"m": torch.tensor(2.5), "n": 1.0}, {"m": 2, "n": 0})
    assert metrics["m"] == 2.5 and np.isnan(metrics["n"])


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_bins_balances_tokens_with_equal_counts(world):
    rng = np.random.default_rng(int(torch.seed() % 2**31))
    bin_tokens = rng.integers(1, 1000, size=int(rng.integers(1, 30)))
    plans = [
        shard_bins(bin_tokens, DistState(r, world, r, torch.device("cpu"), r == 0)) for r in range(world)
    ]
    assert len({p.size for p in plans}) == 1
    real = np.concatenate([p[p >= 0] for p in plans])
    assert sorted(real.tolist()) == list(range(bin_tokens.size))
    loads = [bin_tokens[p[p >= 0]].sum() for p in plans]
    assert max(loads) - min(loads) <= bin_tokens.max()
    for p in plans:
        kept = p[p >= 0]
        assert (p[kept.size :] == -1).all()
        assert (np.diff(bin_tokens[kept]) <= 0).all()
    again = shard_bins(list(bin_tokens), DistState(0, world, 0, torch.device("cpu"), True))
    assert np.array_equal(again, plans[0])


def test_sharded_checkpoint_in_one_process(tmp_path):
    model = _tiny_llama(False, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _dpo_step(model, model, _random_pairs(2, torch.Generator().manual_seed(1)), torch.zeros(2, 2) - 20)
    opt.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()}
    path = save_sharded(tmp_path, 3, model, opt, {"epoch": 2})
    assert path == latest_sharded(tmp_path) == tmp_path / "sharded-00000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest-sharded", "sharded-00000003"]

    fresh = _tiny_llama(False, 1)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert load_sharded(tmp_path, fresh, fresh_opt) == (3, {"epoch": 2})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k
    for k, v in fresh_opt.state_dict()["state"].items():
        assert torch.equal(v["momentum_buffer"], momentum[k]), k
    with pytest.raises(ValueError, match="neither a sharded checkpoint"):
        load_sharded(tmp_path / "missing", fresh)


def test_save_sharded_rejects_non_json_extra(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        save_sharded(tmp_path, 1, _tiny_llama(False, 0), extra={"x": torch.zeros(1)})
    assert not any(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------
# Sharded checkpoints: verification, fallback, disk full, no pickle
# --------------------------------------------------------------------------------------------------


def _two_sharded(run_dir):
    """Sharded checkpoints at steps 1 and 2 of one process; returns step 1's weights and the model."""
    model = _tiny_llama(True, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    states = []
    for step in (1, 2):
        opt.zero_grad()
        _dpo_step(model, model, _random_pairs(2, torch.Generator().manual_seed(step)), torch.zeros(2, 2) - 20)
        opt.step()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        save_sharded(run_dir, step, model, opt, {"step": step}, keep_last=None)
    return states[0], model


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _corruptions(folder):
    """``(relative file, offset)``: the middle of the JSON, and of each safetensors header and tensor data."""
    cases = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name, size = str(path.relative_to(folder)), path.stat().st_size
        if path.suffix == ".safetensors":
            header = int.from_bytes(path.read_bytes()[:8], "little")
            cases += [(name, 8 + header // 2), (name, 8 + header + (size - 8 - header) // 2)]
        else:
            cases.append((name, size // 2))
    return cases


def _fresh_sharded():
    model = _tiny_llama(True, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_sharded_same_size_corruption_is_skipped_with_a_warning(tmp_path):
    pristine = tmp_path / "pristine"
    first, _ = _two_sharded(pristine)
    cases = _corruptions(pristine / "sharded-00000002")
    assert {name for name, _ in cases} == {
        "fastdpo-sharded.json",
        "rng-rank0.safetensors",
        "dcp/shard-00001-model-00001-of-00001.safetensors",
    }
    for i, (name, offset) in enumerate(cases):
        run = tmp_path / f"case{i}"
        shutil.copytree(pristine, run)
        bad = run / "sharded-00000002"
        _flip(bad / name, offset)
        model, opt = _fresh_sharded()
        with pytest.warns(
            UserWarning, match=rf"skipping checkpoint {re.escape(str(bad))}: {re.escape(name)}"
        ):
            assert load_sharded(run, model, opt) == (1, {"step": 1})
        for k, v in model.state_dict().items():
            assert torch.equal(v, first[k]), (name, k)
        with pytest.raises(
            CheckpointError, match=rf"{re.escape(str(bad))} is not a complete.*{re.escape(name)}"
        ):
            load_sharded(bad, model, opt)
        with pytest.warns(UserWarning, match="skipping"):
            assert resume_point(run) == (run / "sharded-00000001", "sharded")


def test_sharded_checkpoints_all_invalid_is_a_clear_error(tmp_path):
    _two_sharded(tmp_path)
    for folder in ("sharded-00000001", "sharded-00000002"):
        _flip(tmp_path / folder / "rng-rank0.safetensors", 100)
    (tmp_path / "sharded-00000002" / "dcp" / "extra.safetensors").write_bytes(b"\0" * 8)
    model, opt = _fresh_sharded()
    with pytest.warns(UserWarning, match="skipping"):
        with pytest.raises(CheckpointError) as err:
            load_sharded(tmp_path, model, opt)
    message = str(err.value)
    assert str(tmp_path) in message and "every checkpoint failed a check" in message
    assert "sharded-00000001: rng-rank0.safetensors does not match its recorded sha256" in message
    assert "sharded-00000002: ['dcp/extra.safetensors'] are not part of the checkpoint" in message
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(CheckpointError):
        consolidate(tmp_path, tmp_path / "hf", _tiny_llama(True, 0).config)


@pytest.mark.parametrize("where", ["dcp-shards", "rng"])
def test_sharded_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    import torch.distributed.checkpoint.filesystem as dcp_filesystem

    from fastdpo.checkpoint import io

    _, model = _two_sharded(tmp_path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "rng":
        monkeypatch.setattr(io, "write_tensors", disk_full)
    else:
        monkeypatch.setattr(dcp_filesystem, "_write_files_from_queue", disk_full)
    with pytest.raises(OSError, match=r"could not save checkpoint .*sharded-00000003 \(No space") as err:
        save_sharded(tmp_path, 3, model, opt)
    monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC
    assert (tmp_path / "latest-sharded").read_text().strip() == "sharded-00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest-sharded",
        "sharded-00000001",
        "sharded-00000002",
    ]
    assert latest_sharded(tmp_path) == tmp_path / "sharded-00000002"
    assert load_sharded(tmp_path, *_fresh_sharded()) == (2, {"step": 2})


class _Payload:
    """Unpickling it creates ``marker``: a stand-in for arbitrary code in a crafted checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_sharded_load_never_unpickles_a_planted_payload(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    payload = pickle.dumps(_Payload(marker))
    pristine = tmp_path / "pristine"
    _two_sharded(pristine)
    config = _tiny_llama(True, 0).config

    # Where DCP's FileSystemWriter kept its pickled metadata: ignored, the checkpoint loads.
    run = tmp_path / "metadata"
    shutil.copytree(pristine, run)
    for where in ("sharded-00000002/.metadata", "sharded-00000002/dcp/.metadata"):
        (run / where).write_bytes(payload)
    assert load_sharded(run, *_fresh_sharded())[0] == 2
    consolidate(run, tmp_path / "hf", config)
    assert not marker.exists()

    # In place of each file: that checkpoint is skipped.
    for i, (name, _) in enumerate(_corruptions(pristine / "sharded-00000002")[::2]):
        run = tmp_path / f"case{i}"
        shutil.copytree(pristine, run)
        (run / "sharded-00000002" / name).write_bytes(payload)
        with pytest.warns(UserWarning, match=re.escape(name)):
            assert load_sharded(run, *_fresh_sharded())[0] == 1
        with pytest.raises(CheckpointError):
            consolidate(run / "sharded-00000002", tmp_path / "hf", config)
        assert not marker.exists(), f"unpickled a payload planted in {name}"

    # A checkpoint in the old layout (DCP's pickled .metadata) is skipped without being opened.
    run = tmp_path / "old"
    shutil.copytree(pristine, run)
    old = run / "sharded-00000003"
    model = _tiny_llama(True, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model.state_dict()}, checkpoint_id=old, no_dist=True)
    (old / ".metadata").write_bytes(payload)
    old_meta = {"format": "fastdpo-sharded-checkpoint", "version": 1, "step": 3, "world_size": 1}
    (old / "fastdpo-sharded.json").write_text(json.dumps({**old_meta, "optimizer": None, "extra": {}}))
    (run / "latest-sharded").write_text("sharded-00000003\n")
    with pytest.warns(UserWarning, match="sharded-00000003"):
        assert load_sharded(run, *_fresh_sharded())[0] == 2
    with pytest.raises(CheckpointError):
        consolidate(old, tmp_path / "hf", config)
    assert not marker.exists()
    dcp.FileSystemReader(str(old)).read_metadata()  # the old load path runs the payload: the test can fail
    assert marker.exists()


def _sharded_save_task(rank, run_dir, seed):
    model = wrap_model(_tiny_llama(False, seed), "fsdp2", init_distributed())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in (1, 2):
        pairs = _random_pairs(4, torch.Generator().manual_seed(step))
        opt.zero_grad()
        _dpo_step(model, model, pairs[2 * rank : 2 * rank + 2], torch.zeros(2, 2) - 20, world_size=WORLD)
        opt.step()
        save_sharded(run_dir, step, model, opt, {"step": step}, keep_last=None)
    return sorted(json.loads(Path(run_dir, "sharded-00000002", "fastdpo-sharded.json").read_text())["files"])


def _sharded_resume_task(rank, run_dir, seed):
    model = wrap_model(_tiny_llama(False, seed), "fsdp2", init_distributed())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        point = resume_point(run_dir, "sharded")
        step, _ = load_sharded(point[0], model, opt)
    return str(point[0]), step, [str(w.message) for w in caught if "skipping" in str(w.message)]


def test_two_ranks_agree_on_the_fallback_when_one_rank_finds_the_corruption(ranks, tmp_path):
    seed = int(torch.seed() % 2**30)
    run_dir = tmp_path / "run"
    files = ranks.run(_sharded_save_task, str(run_dir), seed)[0]
    assert len([f for f in files if f.startswith("dcp/")]) == WORLD
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= set(files)
    # Files are verified round-robin over the ranks: rank 1 alone hashes files[1].
    _flip(run_dir / "sharded-00000002" / files[1], 200)
    results = ranks.run(_sharded_resume_task, str(run_dir), seed)
    for point, step, skipped in results:
        assert (point, step) == (str(run_dir / "sharded-00000001"), 1)
        assert len(skipped) == 1 and "sharded-00000002" in skipped[0]
    assert "failed verification on another rank" in results[0][2][0]
    assert f"{files[1]} does not match its recorded sha256" in results[1][2][0]


def _disk_full_on_one_rank_task(rank, run_dir, seed):
    from fastdpo.checkpoint import io

    model = wrap_model(_tiny_llama(False, seed), "fsdp2", init_distributed())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    save_sharded(run_dir, 1, model, opt, {"step": 1})
    real = io.write_tensors

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    io.write_tensors = disk_full if rank == 1 else real
    try:
        save_sharded(run_dir, 2, model, opt, {"step": 2})
        outcome = None
    except OSError as err:
        outcome = (err.errno, str(err))
    finally:
        io.write_tensors = real
    return outcome, str(latest_sharded(run_dir)), load_sharded(run_dir, model, opt)


def test_disk_full_on_one_rank_fails_every_rank_and_keeps_the_previous_checkpoint(ranks, tmp_path):
    run_dir = tmp_path / "run"
    results = ranks.run(_disk_full_on_one_rank_task, str(run_dir), int(torch.seed() % 2**30))
    for rank, (outcome, latest, loaded) in enumerate(results):
        assert outcome is not None, f"rank {rank} did not fail"
        assert "could not save checkpoint" in outcome[1] and "sharded-00000002" in outcome[1]
        assert (latest, loaded) == (str(run_dir / "sharded-00000001"), (1, {"step": 1}))
    assert results[1][0][0] == errno.ENOSPC and "No space left" in results[1][0][1]
    assert "failed on another rank" in results[0][0][1]
    assert sorted(p.name for p in run_dir.iterdir()) == ["latest-sharded", "sharded-00000001"]
