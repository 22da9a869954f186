"""Property-based tests (hypothesis): the pack planner and the packed attention masks, on generated inputs.

Deterministic in CI: every test runs a fixed, derandomized set of examples and keeps no example database.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdpo import packing
from fastdpo.modeling import packed_attention_mask
from fastdpo.packing import IGNORE_INDEX, balance_bins, pack_pairs, plan_bins

HAS_CPP = packing._C is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="fastdpo._C not built")
IMPLS = [pytest.param("cpp", marks=needs_cpp), "python"]
deterministic = settings(max_examples=100, deadline=None, derandomize=True, database=None)


@st.composite
def plans(draw: st.DrawFn, *, fitting: bool = True) -> tuple[list[int], int]:
    """(pair token counts, budget); runs of equal counts are common, as are pairs that fill a bin exactly."""
    budget = draw(st.integers(1, 64))
    sizes = st.integers(1, budget) if fitting else st.integers(-2, budget + 3)
    # A small alphabet of sizes makes long runs of equal counts, which the numpy planner places in one go.
    alphabet = draw(st.lists(sizes, min_size=1, max_size=4))
    tokens = draw(st.lists(st.one_of(st.sampled_from(alphabet), sizes), max_size=80))
    return tokens, budget


def naive_ffd(tokens: list[int], budget: int) -> list[list[int]]:
    """First-fit-decreasing by the textbook loop: bins of pair indices, longest first, ties by index."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        b = next((b for b, load in enumerate(loads) if load + tokens[i] <= budget), len(bins))
        if b == len(bins):
            bins.append([])
            loads.append(0)
        bins[b].append(i)
        loads[b] += tokens[i]
    return bins


def as_bins(offsets: np.ndarray, order: np.ndarray) -> list[list[int]]:
    return [order[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block", [1, 3, 1024])
@deterministic
@given(plan=plans())
def test_every_pair_lands_in_exactly_one_bin_within_budget(impl: str, block: int, plan) -> None:
    tokens, budget = plan
    # A small block of the numpy planner's room index exercises its multi-block search on small inputs.
    with mock.patch.object(packing, "_BLOCK", block):
        offsets, order = plan_bins(tokens, budget, impl=impl)
    assert offsets.dtype == order.dtype == np.int64
    assert offsets[0] == 0 and offsets[-1] == len(tokens)
    assert np.all(np.diff(offsets) > 0), "no bin is empty"
    assert sorted(order.tolist()) == list(range(len(tokens))), "every pair exactly once"
    bins = as_bins(offsets, order)
    assert all(sum(tokens[i] for i in b) <= budget for b in bins)
    assert bins == naive_ffd(tokens, budget)


@needs_cpp
@deterministic
@given(plan=plans(fitting=False), block=st.sampled_from([1, 2, 1024]))
def test_cpp_and_numpy_planners_agree_exactly(plan, block: int) -> None:
    """Same bins, same order, or the same error naming the first pair that is empty or over budget."""
    tokens, budget = plan
    outcomes = []
    for impl in ("cpp", "python"):
        try:
            with mock.patch.object(packing, "_BLOCK", block):
                outcomes.append(tuple(a.tolist() for a in plan_bins(tokens, budget, impl=impl)))
        except ValueError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]
    bad = [i for i, n in enumerate(tokens) if not 0 < n <= budget]
    if bad:
        assert isinstance(outcomes[0], str) and outcomes[0].startswith(f"pair {bad[0]} has {tokens[bad[0]]} ")


@pytest.mark.parametrize("impl", IMPLS)
@deterministic
@given(plan=plans(fitting=False))
def test_pairs_over_budget_are_refused_by_name(impl: str, plan) -> None:
    """The documented behaviour: a pair longer than the budget is a ValueError naming it, never a bin."""
    tokens, budget = plan
    bad = [i for i, n in enumerate(tokens) if not 0 < n <= budget]
    if not bad:
        assert plan_bins(tokens, budget, impl=impl)[1].size == len(tokens)
        return
    expected = "more than the budget" if tokens[bad[0]] > budget else "expected a positive count"
    with pytest.raises(ValueError, match=rf"^pair {bad[0]} has {tokens[bad[0]]} tokens, {expected}"):
        plan_bins(tokens, budget, impl=impl)


@needs_cpp
@deterministic
@given(tokens=st.lists(st.integers(0, 50), max_size=60), groups=st.integers(1, 9))
def test_cpp_and_python_rank_balancing_agree(tokens: list[int], groups: int) -> None:
    ours = balance_bins(tokens, groups, impl="cpp")
    assert ours.tolist() == balance_bins(tokens, groups, impl="python").tolist()
    assert all(0 <= g < groups for g in ours.tolist())


@st.composite
def packed_pairs(draw: st.DrawFn) -> tuple[list[dict[str, list[int]]], bool]:
    """A bin of 1-4 pairs with small, often repeated token ids, and whether the prompt is shared."""
    shared = draw(st.booleans())
    ids = st.lists(st.integers(0, 3), min_size=1, max_size=6)
    prompt = st.lists(st.integers(0, 3), min_size=1 if shared else 0, max_size=6)
    pair = st.fixed_dictionaries({"prompt_ids": prompt, "chosen_ids": ids, "rejected_ids": ids})
    return draw(st.lists(pair, min_size=1, max_size=4)), shared


def unpacked_tokens(pairs: list[dict[str, list[int]]], shared: bool) -> list[tuple[int, int, int, bool]]:
    """Per packed token, worked out from the pairs alone: (sequence, position, segment, in the shared prefix).

    Sequence j is pair j's prompt + chosen, sequence B+j its prompt + rejected. The rejected segment of a
    shared-prompt pair repeats the prompt's last token at position P-1; the chosen segment's first P-1 tokens
    are the prefix that segment may also see.
    """
    num_pairs, out = len(pairs), []
    for j, pair in enumerate(pairs):
        p = len(pair["prompt_ids"])
        out += [(j, t, 2 * j, shared and t < p - 1) for t in range(p + len(pair["chosen_ids"]))]
        first = p - 1 if shared else 0
        out += [
            (num_pairs + j, first + t, 2 * j + 1, False) for t in range(p - first + len(pair["rejected_ids"]))
        ]
    return out


@deterministic
@given(bin_=packed_pairs())
def test_each_token_sees_exactly_its_own_sequence_so_far(bin_) -> None:
    """Row q of the mask holds the tokens of q's unpacked sequence up to q's position, each once, in order.

    So no token sees another pair, a chosen token never sees the rejected response, and a rejected token
    sees the chosen segment only in its shared prompt (ARCHITECTURE.md, "The packed layout").
    """
    pairs, shared = bin_
    batch = pack_pairs(pairs, shared_prompt=shared)
    tokens = unpacked_tokens(pairs, shared)
    num_pairs = len(pairs)
    sequences = [p["prompt_ids"] + p["chosen_ids"] for p in pairs]
    sequences += [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    assert batch.num_tokens == len(tokens)
    assert batch.position_ids.tolist() == [pos for _, pos, _, _ in tokens]
    assert batch.segment_ids.tolist() == [seg for _, _, seg, _ in tokens]
    mask = packed_attention_mask(batch)
    for q, (seq, pos, seg, _) in enumerate(tokens):
        seen = torch.nonzero(mask[q]).flatten().tolist()
        assert [tokens[k][1] for k in seen] == list(range(pos + 1)), f"token {q}: positions seen"
        assert batch.input_ids[seen].tolist() == sequences[seq][: pos + 1], f"token {q}: tokens seen"
        for k in seen:
            k_seq, _, k_seg, k_prefix = tokens[k]
            own = k_seg == seg and k <= q
            prefix = k_prefix and seq == num_pairs + k_seq and seg == k_seg + 1
            assert own or prefix, f"token {q} (sequence {seq}) sees token {k} (sequence {k_seq})"


@deterministic
@given(bin_=packed_pairs())
def test_labels_are_each_sequences_next_response_token(bin_) -> None:
    """Every response token of every sequence is predicted exactly once, from the token before it.

    Without a shared prompt, a pair may have an empty prompt; its first response token has no token before
    it, so it is the one response token left unscored.
    """
    pairs, shared = bin_
    batch = pack_pairs(pairs, shared_prompt=shared)
    tokens = unpacked_tokens(pairs, shared)
    sequences = [p["prompt_ids"] + p["chosen_ids"] for p in pairs]
    sequences += [p["prompt_ids"] + p["rejected_ids"] for p in pairs]
    responses = [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
    prompts = [len(p["prompt_ids"]) for p in pairs] * 2
    predicted: list[list[int]] = [[] for _ in sequences]
    for q, (seq, pos, _, _) in enumerate(tokens):
        label, owner = int(batch.labels[q]), int(batch.seq_index[q])
        if label == IGNORE_INDEX:
            assert owner == -1
            continue
        assert owner == seq and label == sequences[seq][pos + 1]
        predicted[seq].append(pos + 1)
    for seq, positions in enumerate(predicted):
        assert positions == list(range(max(prompts[seq], 1), prompts[seq] + responses[seq]))
