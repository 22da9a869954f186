"""Tests for the pack planner (C++ and numpy twins) and the packed-batch builder."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest
import torch

from fastdpo import packing
from fastdpo.packing import IGNORE_INDEX, balance_bins, pack_pairs, pair_num_tokens, plan_bins

HAS_CPP = packing._C is not None
IMPLS = [
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="fastdpo._C not built")),
    "python",
]


@pytest.fixture
def rng() -> np.random.Generator:
    seed = secrets.randbits(32)
    print(f"seed={seed}")  # shown by pytest on failure, to replay the inputs
    return np.random.default_rng(seed)


def naive_ffd(tokens: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Equals first-fit-decreasing by the textbook O(n * bins) loop, as (bin_offsets, order)."""
    loads: list[int] = []
    bins: list[list[int]] = []
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        target = next((b for b, load in enumerate(loads) if load + tokens[i] <= budget), len(loads))
        if target == len(loads):
            loads.append(0)
            bins.append([])
        loads[target] += tokens[i]
        bins[target].append(i)
    offsets = [0, *itertools.accumulate(len(b) for b in bins)]
    return offsets, [i for b in bins for i in b]


def naive_lpt(tokens: list[int], num_groups: int) -> list[int]:
    """Equals LPT greedy by scanning every group's load for each bin."""
    loads = [0] * num_groups
    groups = [0] * len(tokens)
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        g = min(range(num_groups), key=lambda g: (loads[g], g))
        groups[i] = g
        loads[g] += tokens[i]
    return groups


def optimal_bins(tokens: list[int], budget: int) -> int:
    """Equals the fewest bins that hold ``tokens``, by exhaustive search (tiny inputs only)."""
    items = sorted(tokens, reverse=True)
    best = len(items)

    def place(k: int, loads: list[int]) -> None:
        nonlocal best
        if len(loads) >= best:
            return
        if k == len(items):
            best = len(loads)
            return
        for b in range(len(loads)):
            if loads[b] + items[k] <= budget:
                loads[b] += items[k]
                place(k + 1, loads)
                loads[b] -= items[k]
        place(k + 1, [*loads, items[k]])

    place(0, [])
    return best


def random_lengths(rng: np.random.Generator, n: int, budget: int) -> np.ndarray:
    # Mixes near-budget pairs, many ties and small fillers, the cases where FFD tie-breaking matters.
    cap = int(rng.choice([budget, max(1, budget // 3), max(1, budget // 10)]))
    return rng.integers(1, cap + 1, n)


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_matches_naive_ffd(rng: np.random.Generator, impl: str) -> None:
    for _ in range(40):
        budget = int(rng.integers(1, 120))
        tokens = random_lengths(rng, int(rng.integers(0, 400)), budget)
        offsets, order = plan_bins(tokens, budget, impl=impl)
        ref_offsets, ref_order = naive_ffd(tokens.tolist(), budget)
        assert offsets.dtype == order.dtype == np.int64
        np.testing.assert_array_equal(offsets, ref_offsets)
        np.testing.assert_array_equal(order, ref_order)


@pytest.mark.skipif(not HAS_CPP, reason="fastdpo._C not built")
def test_cpp_and_numpy_plans_identical(rng: np.random.Generator) -> None:
    for budget, n in [(16384, 20000), (2048, 20000), (10**7, 3000)]:
        tokens = np.minimum(rng.lognormal(np.log(budget / 12), 0.9, n).astype(np.int64) + 1, budget)
        cpp = plan_bins(tokens, budget, impl="cpp")
        py = plan_bins(tokens, budget, impl="python")
        np.testing.assert_array_equal(cpp[0], py[0])
        np.testing.assert_array_equal(cpp[1], py[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_respects_budget_and_first_fit_fill(rng: np.random.Generator, impl: str) -> None:
    budget = int(rng.integers(500, 5000))
    tokens = random_lengths(rng, 5000, budget)
    offsets, order = plan_bins(tokens, budget, impl=impl)
    np.testing.assert_array_equal(np.sort(order), np.arange(tokens.size))
    assert offsets[0] == 0 and offsets[-1] == tokens.size and (np.diff(offsets) > 0).all()
    loads = np.add.reduceat(tokens[order], offsets[:-1])
    assert loads.max() <= budget
    # First fit never leaves two bins at most half full: the later one's pairs would fit the earlier.
    assert (2 * loads <= budget).sum() <= 1
    # Within a bin, pairs keep placement order: longest first, then by index.
    for b in range(offsets.size - 1):
        members = order[offsets[b] : offsets[b + 1]]
        keys = list(zip(-tokens[members], members, strict=True))
        assert keys == sorted(keys)


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_near_optimal_on_tiny_inputs(rng: np.random.Generator, impl: str) -> None:
    for _ in range(60):
        budget = int(rng.integers(4, 30))
        tokens = rng.integers(1, budget + 1, int(rng.integers(1, 9)))
        offsets, _ = plan_bins(tokens, budget, impl=impl)
        ffd, opt = offsets.size - 1, optimal_bins(tokens.tolist(), budget)
        # Dosa's tight bound for first-fit-decreasing: FFD <= 11/9 OPT + 6/9.
        assert opt <= ffd and 9 * ffd <= 11 * opt + 6, (tokens.tolist(), budget, ffd, opt)


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_hand_example_and_ties(impl: str) -> None:
    offsets, order = plan_bins([5, 3, 4, 2, 6], 8, impl=impl)
    assert offsets.tolist() == [0, 2, 4, 5] and order.tolist() == [4, 3, 0, 1, 2]
    offsets, order = plan_bins([3] * 7, 10, impl=impl)
    assert offsets.tolist() == [0, 3, 6, 7] and order.tolist() == list(range(7))
    offsets, order = plan_bins(np.zeros(0, dtype=np.int64), 8, impl=impl)
    assert offsets.tolist() == [0] and order.size == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_plan_rejects_bad_input(impl: str) -> None:
    with pytest.raises(ValueError, match=r"pair 2 has 12 tokens, more than the budget of 10"):
        plan_bins([3, 4, 12, 11], 10, impl=impl)
    with pytest.raises(ValueError, match=r"pair 1 has -2 tokens"):
        plan_bins([3, -2, 12], 10, impl=impl)
    with pytest.raises(ValueError, match=r"pair 0 has 0 tokens"):
        plan_bins([0], 10, impl=impl)
    with pytest.raises(ValueError, match="budget must be positive"):
        plan_bins([3], 0, impl=impl)
    with pytest.raises(TypeError, match="budget must be an int"):
        plan_bins([3], 10.0, impl=impl)
    with pytest.raises(TypeError, match="pair_tokens must hold integers"):
        plan_bins([3.5], 10, impl=impl)
    with pytest.raises(ValueError, match="pair_tokens must be 1-D"):
        plan_bins([[3]], 10, impl=impl)


@pytest.mark.skipif(not HAS_CPP, reason="fastdpo._C not built")
def test_cpp_binding_validates_on_its_own() -> None:
    with pytest.raises(ValueError, match=r"pair 1 has 9 tokens, more than the budget of 8"):
        packing._C.plan_bins(np.array([5, 9]), 8)
    with pytest.raises(ValueError, match="num_groups must be positive"):
        packing._C.balance_bins(np.array([5, 9]), 0)


def test_impl_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(packing.PLANNER_ENV, "python")
    assert plan_bins([5, 3], 8)[1].tolist() == [0, 1]
    monkeypatch.setenv(packing.PLANNER_ENV, "rust")
    with pytest.raises(ValueError, match="'cpp' or 'python'"):
        plan_bins([5, 3], 8)
    monkeypatch.setenv(packing.PLANNER_ENV, "cpp")
    monkeypatch.setattr(packing, "_C", None)
    with pytest.raises(ImportError, match="not built"):
        plan_bins([5, 3], 8)
    with pytest.raises(ImportError, match="not built"):
        balance_bins([5, 3], 2)
    assert plan_bins([5, 3], 8, impl="python")[1].tolist() == [0, 1]
    monkeypatch.delenv(packing.PLANNER_ENV)
    assert balance_bins([5, 3], 2).tolist() == [0, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_balance_bins_matches_naive_lpt(rng: np.random.Generator, impl: str) -> None:
    for _ in range(30):
        num_groups = int(rng.integers(1, 9))
        tokens = rng.integers(0, int(rng.integers(1, 50)), int(rng.integers(0, 300)))
        groups = balance_bins(tokens, num_groups, impl=impl)
        assert groups.dtype == np.int64
        np.testing.assert_array_equal(groups, naive_lpt(tokens.tolist(), num_groups))
        if tokens.size:
            loads = np.bincount(groups, weights=tokens, minlength=num_groups)
            # Greedy list scheduling bound: the busiest group exceeds the mean by at most one bin.
            assert loads.max() <= tokens.sum() / num_groups + tokens.max()


@pytest.mark.parametrize("impl", IMPLS)
def test_balance_bins_rejects_bad_input(impl: str) -> None:
    with pytest.raises(ValueError, match="bin 1 has -4 tokens"):
        balance_bins([3, -4], 2, impl=impl)
    with pytest.raises(ValueError, match="num_groups must be positive"):
        balance_bins([3], 0, impl=impl)


def test_pair_num_tokens_formula_and_validation() -> None:
    assert pair_num_tokens([3, 1], [2, 1], [1, 3], shared_prompt=False).tolist() == [9, 6]
    assert pair_num_tokens([3, 1], [2, 1], [1, 3], shared_prompt=True).tolist() == [7, 6]
    assert pair_num_tokens([0], [2], [1], shared_prompt=False).tolist() == [3]
    with pytest.raises(ValueError, match="pair 0 has prompt length 0, expected at least 1"):
        pair_num_tokens([0], [2], [1], shared_prompt=True)
    with pytest.raises(ValueError, match="pair 1 has rejected length 0"):
        pair_num_tokens([1, 1], [2, 2], [1, 0], shared_prompt=False)
    with pytest.raises(ValueError, match="pair 0 has prompt length -1"):
        pair_num_tokens([-1], [2], [1], shared_prompt=False)
    with pytest.raises(ValueError, match="length arrays must match"):
        pair_num_tokens([1, 2], [2], [1], shared_prompt=False)


HAND_PAIRS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
    {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10, 11]},
]
X = IGNORE_INDEX


def test_pack_pairs_layout_without_shared_prompt() -> None:
    batch = pack_pairs(HAND_PAIRS, shared_prompt=False)
    assert batch.num_pairs == 2 and batch.num_tokens == 15 and not batch.has_shared_prompt
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 6, 7, 8, 7, 9, 10, 11]
    assert batch.labels.tolist() == [X, X, 4, 5, X, X, X, 6, X, 8, X, 9, 10, 11, X]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3]
    assert batch.seq_index.tolist() == [-1, -1, 0, 0, -1, -1, -1, 2, -1, 1, -1, 3, 3, 3, -1]
    assert batch.segment_ids.tolist() == [0] * 5 + [1] * 4 + [2] * 2 + [3] * 4
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 5, 9, 11, 15]
    assert batch.prefix_segment.tolist() == [-1] * 4 and batch.prefix_len.tolist() == [0] * 4
    for name in ("input_ids", "labels", "position_ids", "seq_index", "segment_ids", "prefix_segment"):
        assert getattr(batch, name).dtype == torch.int64, name


def test_pack_pairs_layout_with_shared_prompt() -> None:
    batch = pack_pairs(HAND_PAIRS, shared_prompt=True)
    assert batch.num_pairs == 2 and batch.num_tokens == 13 and batch.has_shared_prompt
    assert batch.input_ids.tolist() == [1, 2, 3, 4, 5, 3, 6, 7, 8, 7, 9, 10, 11]
    assert batch.labels.tolist() == [X, X, 4, 5, X, 6, X, 8, X, 9, 10, 11, X]
    assert batch.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1, 2, 3]
    assert batch.seq_index.tolist() == [-1, -1, 0, 0, -1, 2, -1, 1, -1, 3, 3, 3, -1]
    assert batch.segment_ids.tolist() == [0] * 5 + [1] * 2 + [2] * 2 + [3] * 4
    assert batch.cu_seqlens.tolist() == [0, 5, 7, 9, 13]
    assert batch.prefix_segment.tolist() == [-1, 0, -1, 2]
    assert batch.prefix_len.tolist() == [0, 2, 0, 0]


def random_pairs(rng: np.random.Generator, num_pairs: int, min_prompt: int) -> list[dict[str, list[int]]]:
    # Disjoint id ranges per role, so a context that matches by content cannot hold the other response.
    def ids(low: int, high: int, length: int) -> list[int]:
        return rng.integers(low, high, length).tolist()

    return [
        {
            "prompt_ids": ids(0, 1000, int(rng.integers(min_prompt, 9))),
            "chosen_ids": ids(1000, 2000, int(rng.integers(1, 7))),
            "rejected_ids": ids(2000, 3000, int(rng.integers(1, 7))),
        }
        for _ in range(num_pairs)
    ]


def dense_visibility(batch: packing.PackedBatch) -> np.ndarray:
    """Equals ``[N, N]`` bool: query ``q`` attends to key ``k``, from the segment and prefix fields alone."""
    seg = batch.segment_ids.numpy()
    cu = batch.cu_seqlens.numpy().astype(np.int64)
    prefix_segment = batch.prefix_segment.numpy()[seg]
    prefix_len = batch.prefix_len.numpy()[seg]
    q, k = np.arange(seg.size)[:, None], np.arange(seg.size)[None, :]
    own = (seg[None, :] == seg[:, None]) & (k <= q)
    prefix = (seg[None, :] == prefix_segment[:, None]) & ((k - cu[seg][None, :]) < prefix_len[:, None])
    return own | prefix


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_every_response_token_sees_exactly_its_prompt_and_prefix(
    rng: np.random.Generator, shared_prompt: bool
) -> None:
    for _ in range(10):
        pairs = random_pairs(rng, int(rng.integers(1, 6)), min_prompt=1 if shared_prompt else 0)
        batch = pack_pairs(pairs, shared_prompt=shared_prompt)
        num_pairs = len(pairs)
        lens = [[len(p[key]) for p in pairs] for key in ("prompt_ids", "chosen_ids", "rejected_ids")]
        assert batch.num_tokens == pair_num_tokens(*lens, shared_prompt=shared_prompt).sum()
        visible = dense_visibility(batch)
        ids, labels = batch.input_ids.numpy(), batch.labels.numpy()
        pos, seq = batch.position_ids.numpy(), batch.seq_index.numpy()
        np.testing.assert_array_equal(seq == -1, labels == IGNORE_INDEX)
        for s in range(2 * num_pairs):
            pair = pairs[s % num_pairs]
            prompt = pair["prompt_ids"]
            response = pair["rejected_ids" if s >= num_pairs else "chosen_ids"]
            rows = np.flatnonzero(seq == s)
            rows = rows[np.argsort(pos[rows])]
            # With an empty prompt nothing predicts the first response token; otherwise every one is scored.
            first = 0 if prompt else 1
            assert rows.size == len(response) - first
            for row, k in zip(rows, range(first, len(response)), strict=True):
                keys = np.flatnonzero(visible[row])
                keys = keys[np.argsort(pos[keys])]
                assert labels[row] == response[k] and pos[row] == len(prompt) + k - 1
                assert pos[keys].tolist() == list(range(len(prompt) + k))
                assert ids[keys].tolist() == prompt + response[:k]


def test_plan_then_pack_fills_bins_within_budget(rng: np.random.Generator) -> None:
    pairs = random_pairs(rng, 60, min_prompt=1)
    for shared_prompt in (False, True):
        lens = [[len(p[key]) for p in pairs] for key in ("prompt_ids", "chosen_ids", "rejected_ids")]
        tokens = pair_num_tokens(*lens, shared_prompt=shared_prompt)
        offsets, order = plan_bins(tokens, 40)
        for b in range(offsets.size - 1):
            members = order[offsets[b] : offsets[b + 1]]
            batch = pack_pairs([pairs[i] for i in members], shared_prompt=shared_prompt)
            assert batch.num_tokens == tokens[members].sum() <= 40
            assert int(batch.cu_seqlens[-1]) == batch.num_tokens


def test_pack_pairs_rejects_bad_input() -> None:
    good = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}
    with pytest.raises(ValueError, match="at least one pair"):
        pack_pairs([], shared_prompt=False)
    with pytest.raises(ValueError, match="pair 1 has empty chosen_ids"):
        pack_pairs([good, {**good, "chosen_ids": []}], shared_prompt=False)
    with pytest.raises(ValueError, match="pair 0 has empty rejected_ids"):
        pack_pairs([{**good, "rejected_ids": []}], shared_prompt=True)
    with pytest.raises(ValueError, match="pair 0 has an empty prompt"):
        pack_pairs([{**good, "prompt_ids": []}], shared_prompt=True)
    with pytest.raises(ValueError, match="pair 0 is missing 'rejected_ids'"):
        pack_pairs([{"prompt_ids": [1], "chosen_ids": [2]}], shared_prompt=False)
    with pytest.raises(ValueError, match="negative token id"):
        pack_pairs([{**good, "prompt_ids": [1, -100]}], shared_prompt=False)
    with pytest.raises(TypeError, match="must hold integers"):
        pack_pairs([{**good, "chosen_ids": [2.5]}], shared_prompt=False)
    with pytest.raises(TypeError, match="pair 0 must be a mapping"):
        pack_pairs([[1, 2, 3]], shared_prompt=False)
    assert pack_pairs([{**good, "prompt_ids": []}], shared_prompt=False).labels.tolist() == [X, X]
