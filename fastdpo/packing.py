"""The packed layout shared from the data loader to the loss, and the pack planner.

Dimension letters used across fastdpo: B pairs, N tokens, D hidden, V vocab, S attention segments.

A packed bin holds whole pairs. Sequences are numbered as in the padded layout: chosen sequence of
pair ``i`` is ``i`` and its rejected sequence is ``B + i``. Unpaired (KTO) bins reuse the layout: with a
KL term, ``pack_pairs`` packs each example's completion as the "chosen" and its mismatched KL completion
as the "rejected" sequence; without one, ``pack_sequences`` packs the B completions alone (sequence ``i``).
"""

from __future__ import annotations

import heapq
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from fastdpo.metarun import remember_values

try:
    from fastdpo import _C
except ImportError:  # extension not built: the numpy twin gives identical plans
    _C = None

__all__ = [
    "IGNORE_INDEX",
    "PackedBatch",
    "balance_bins",
    "pack_pairs",
    "pack_sequences",
    "pair_num_tokens",
    "plan_bins",
]

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One bin of B packed pairs, N tokens, S attention segments.

    Attributes:
        input_ids: ``[N]`` int64 tokens.
        labels: ``[N]`` int64; ``labels[t]`` is the token predicted from position ``t``
            (already shifted), ``IGNORE_INDEX`` where no loss is taken (prompts, last tokens).
        position_ids: ``[N]`` int64 positions, restarting at every sequence; a response packed after a
            shared prompt continues from the prompt's end.
        seq_index: ``[N]`` int64, the scored sequence (``0..2B-1``) whose label stands at ``t``;
            ``-1`` where ``labels == IGNORE_INDEX``.
        segment_ids: ``[N]`` int64 attention segment of each token (``0..S-1``, non-decreasing).
        cu_seqlens: ``[S+1]`` int32 segment boundaries, as flash-attn's varlen API takes them.
        prefix_segment: ``[S]`` int64; a segment also attends to the first ``prefix_len[s]`` tokens of
            segment ``prefix_segment[s]`` (the shared prompt), ``-1`` when it attends only to itself.
        prefix_len: ``[S]`` int64, see ``prefix_segment``.
        num_pairs: B (pairs, or unpaired examples).
        preference_labels: unpaired bins: ``[B]`` bool, True where example ``i``'s completion is desirable;
            None for preference pairs.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    seq_index: torch.Tensor
    segment_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    prefix_segment: torch.Tensor
    prefix_len: torch.Tensor
    num_pairs: int
    preference_labels: torch.Tensor | None = None
    _meta_hints: dict | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def has_shared_prompt(self) -> bool:
        if self.prefix_segment.is_meta:  # fastdpo plan: known from the batch it was moved from
            return bool(self._meta_hints["shared_prompt"])
        return bool((self.prefix_segment >= 0).any())

    @property
    def max_seqlen(self) -> int:
        """The longest attention segment, in tokens."""
        if self.cu_seqlens.is_meta:
            return int(self._meta_hints["max_seqlen"])
        return int((self.cu_seqlens[1:] - self.cu_seqlens[:-1]).max())

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        if torch.device(device).type == "meta":
            # Meta tensors have no values: what the host reads from the batch travels beside them.
            moved["_meta_hints"] = {"shared_prompt": self.has_shared_prompt, "max_seqlen": self.max_seqlen}
            for name in ("labels", "seq_index"):
                remember_values(moved[name], getattr(self, name))
        return PackedBatch(**moved)


PLANNER_ENV = "FASTDPO_PLANNER"
_PAIR_KEYS = ("prompt_ids", "chosen_ids", "rejected_ids")
_SEQUENCE_KEYS = ("prompt_ids", "completion_ids")
_BLOCK = 1024  # bins per block in the numpy planner's block-maximum index


def _resolve_impl(impl: str | None) -> str:
    """Equals the planner to run: ``impl``, else ``$FASTDPO_PLANNER``, else C++ when built."""
    choice = impl if impl is not None else os.environ.get(PLANNER_ENV, "")
    if choice == "":
        return "cpp" if _C is not None else "python"
    if choice not in ("cpp", "python"):
        raise ValueError(f"planner impl must be 'cpp' or 'python', got {choice!r}")
    if choice == "cpp" and _C is None:
        raise ImportError(
            "the C++ planner fastdpo._C is not built; build it with "
            "`pip install -e . --no-build-isolation --no-deps` or set FASTDPO_PLANNER=python"
        )
    return choice


def _int64_vector(values: object, name: str) -> np.ndarray:
    """Equals ``values`` as a contiguous 1-D int64 array, rejecting non-integer or multi-dim input."""
    array = np.asarray(values)
    if array.size == 0 and array.dtype.kind == "f":
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _positive_int(value: object, name: str) -> int:
    """Equals ``value`` as a Python int, which must be a positive integer."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {number}")
    return number


def pair_num_tokens(
    prompt_lens: Sequence[int] | np.ndarray,
    chosen_lens: Sequence[int] | np.ndarray,
    rejected_lens: Sequence[int] | np.ndarray,
    *,
    shared_prompt: bool,
) -> np.ndarray:
    """Equals the packed token count of each pair: ``2P + Lc + Lr``, or ``P + Lc + 1 + Lr`` when shared.

    Args:
        prompt_lens: ``[n]`` prompt lengths P.
        chosen_lens: ``[n]`` chosen response lengths Lc (EOS included, prompt excluded).
        rejected_lens: ``[n]`` rejected response lengths Lr.
        shared_prompt: whether the rejected response reuses the chosen segment's prompt.

    Returns:
        ``[n]`` int64 token counts, ready for :func:`plan_bins`.
    """
    prompt = _int64_vector(prompt_lens, "prompt_lens")
    chosen = _int64_vector(chosen_lens, "chosen_lens")
    rejected = _int64_vector(rejected_lens, "rejected_lens")
    if not prompt.shape == chosen.shape == rejected.shape:
        raise ValueError(
            f"length arrays must match, got prompt {prompt.shape}, chosen {chosen.shape}, "
            f"rejected {rejected.shape}"
        )
    min_prompt = 1 if shared_prompt else 0
    for name, lens, low in (("prompt", prompt, min_prompt), ("chosen", chosen, 1), ("rejected", rejected, 1)):
        bad = np.flatnonzero(lens < low)
        if bad.size:
            raise ValueError(f"pair {bad[0]} has {name} length {lens[bad[0]]}, expected at least {low}")
    if shared_prompt:
        return prompt + chosen + 1 + rejected
    return 2 * prompt + chosen + rejected


def _plan_bins_numpy(tokens: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Equals ``fastdpo._C.plan_bins``: first-fit-decreasing, ties by original index.

    Equal lengths are placed as one run: within a run every bin left of the current target stays too full,
    so each bin with room takes ``remaining // size`` pairs in turn, exactly as one-by-one first fit would.
    A per-block maximum of the remaining room keeps the search for those bins short.
    """
    bad = np.flatnonzero((tokens <= 0) | (tokens > budget))
    if bad.size:
        i, length = int(bad[0]), int(tokens[bad[0]])
        if length <= 0:
            raise ValueError(f"pair {i} has {length} tokens, expected a positive count")
        raise ValueError(f"pair {i} has {length} tokens, more than the budget of {budget}")
    n = tokens.size
    if n == 0:
        return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    planned = np.argsort(-tokens, kind="stable")
    sizes = tokens[planned]
    bin_of = np.empty(n, dtype=np.int64)
    # Unopened bins hold -1 so they never match; a run that overflows the open bins opens new ones.
    remaining = np.full(-(-n // _BLOCK) * _BLOCK, -1, dtype=np.int64)
    block_max = np.full(remaining.size // _BLOCK, -1, dtype=np.int64)
    lanes = np.arange(_BLOCK)
    num_bins = 0
    run_bounds = np.flatnonzero(np.r_[True, sizes[1:] != sizes[:-1], True]).tolist()
    for start, end in zip(run_bounds[:-1], run_bounds[1:], strict=True):
        size, count = int(sizes[start]), end - start
        blocks = np.flatnonzero(block_max >= size)
        # Widen the scan over matching blocks geometrically until it holds room for the whole run.
        num_blocks = 1
        while True:
            bins = (blocks[:num_blocks, None] * _BLOCK + lanes).ravel()
            bins = bins[remaining[bins] >= size]
            takes = remaining[bins] // size
            filled = np.cumsum(takes)
            if (filled.size and filled[-1] >= count) or num_blocks >= blocks.size:
                break
            num_blocks *= 2
        if filled.size and filled[-1] >= count:
            last = int(np.searchsorted(filled, count))
            bins, takes = bins[: last + 1], takes[: last + 1].copy()
            takes[-1] -= filled[last] - count
        else:
            left = count - (int(filled[-1]) if filled.size else 0)
            per_bin = budget // size
            num_new = -(-left // per_bin)
            new_takes = np.full(num_new, per_bin, dtype=np.int64)
            new_takes[-1] = left - per_bin * (num_new - 1)
            new_bins = np.arange(num_bins, num_bins + num_new, dtype=np.int64)
            remaining[new_bins] = budget
            num_bins += num_new
            bins, takes = np.concatenate([bins, new_bins]), np.concatenate([takes, new_takes])
        bin_of[start:end] = np.repeat(bins, takes)
        remaining[bins] -= takes * size
        touched = np.unique(bins // _BLOCK)
        block_max[touched] = remaining[touched[:, None] * _BLOCK + lanes].max(axis=1)
    order = planned[np.argsort(bin_of, kind="stable")]
    offsets = np.zeros(num_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(bin_of, minlength=num_bins), out=offsets[1:])
    return offsets, order


def plan_bins(
    pair_tokens: Sequence[int] | np.ndarray, budget: int, *, impl: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Equals a first-fit-decreasing packing of pairs into bins of at most ``budget`` tokens.

    Pairs are placed longest first (equal lengths in index order), each into the lowest-numbered bin with
    room. The C++ and numpy planners give identical output.

    Args:
        pair_tokens: ``[n]`` positive token counts per pair (see :func:`pair_num_tokens`).
        budget: most tokens per bin.
        impl: ``"cpp"`` or ``"python"``; defaults to ``$FASTDPO_PLANNER``, else C++ when built.

    Returns:
        ``(bin_offsets, order)``: int64 ``[n_bins+1]`` and ``[n]``; bin ``b`` holds pairs
        ``order[bin_offsets[b]:bin_offsets[b+1]]`` in placement order.

    Raises:
        ValueError: a pair is longer than ``budget`` (naming the pair), or a count is not positive.
    """
    tokens = _int64_vector(pair_tokens, "pair_tokens")
    budget = _positive_int(budget, "budget")
    if _resolve_impl(impl) == "cpp":
        return _C.plan_bins(tokens, budget)
    return _plan_bins_numpy(tokens, budget)


def _balance_bins_python(tokens: np.ndarray, num_groups: int) -> np.ndarray:
    """Equals ``fastdpo._C.balance_bins``: LPT greedy, ties to the lowest group index."""
    bad = np.flatnonzero(tokens < 0)
    if bad.size:
        raise ValueError(f"bin {bad[0]} has {tokens[bad[0]]} tokens, expected a non-negative count")
    heap = [(0, g) for g in range(num_groups)]
    groups = np.empty(tokens.size, dtype=np.int64)
    for i in np.argsort(-tokens, kind="stable").tolist():
        load, group = heapq.heappop(heap)
        groups[i] = group
        heapq.heappush(heap, (load + int(tokens[i]), group))
    return groups


def balance_bins(
    bin_tokens: Sequence[int] | np.ndarray, num_groups: int, *, impl: str | None = None
) -> np.ndarray:
    """Equals the group (rank) of each bin under LPT: largest bin first, to the least-loaded group.

    Args:
        bin_tokens: ``[m]`` non-negative token counts per bin.
        num_groups: number of groups (e.g. data-parallel ranks).
        impl: ``"cpp"`` or ``"python"``; defaults to ``$FASTDPO_PLANNER``, else C++ when built.

    Returns:
        ``[m]`` int64 group of each bin; equal bins go in index order, equal loads to the lowest group.
    """
    tokens = _int64_vector(bin_tokens, "bin_tokens")
    num_groups = _positive_int(num_groups, "num_groups")
    if _resolve_impl(impl) == "cpp":
        return _C.balance_bins(tokens, num_groups)
    return _balance_bins_python(tokens, num_groups)


def _token_array(
    pair: Mapping[str, Sequence[int]], key: str, index: int, keys: tuple[str, ...] = _PAIR_KEYS
) -> np.ndarray:
    """Equals ``pair[key]`` as a 1-D int64 array of non-negative token ids."""
    kind = "pair" if keys == _PAIR_KEYS else "sequence"
    if key not in pair:
        raise ValueError(f"{kind} {index} is missing {key!r}; expected keys {keys}")
    ids = _int64_vector(pair[key], f"{kind} {index} {key}")
    if ids.size and ids.min() < 0:
        raise ValueError(f"{kind} {index} {key} holds negative token id {ids.min()}")
    return ids


def pack_pairs(pairs: Sequence[Mapping[str, Sequence[int]]], *, shared_prompt: bool) -> PackedBatch:
    """Equals one bin's :class:`PackedBatch` holding ``pairs`` in order.

    Each pair gives segment ``prompt + chosen`` then either ``prompt + rejected`` or, with
    ``shared_prompt``, ``[prompt[-1]] + rejected`` continuing at position ``P-1`` and also attending to the
    first ``P-1`` tokens of the chosen segment. Only positions predicting a response token carry a label.

    Args:
        pairs: mappings with ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` token lists; responses
            exclude the prompt and include EOS.
        shared_prompt: pack the prompt once per pair.

    Returns:
        CPU tensors for ``B = len(pairs)`` pairs; chosen of pair ``j`` is sequence ``j``, rejected ``B+j``.
    """
    if len(pairs) == 0:
        raise ValueError("pack_pairs needs at least one pair, got none")
    num_pairs = len(pairs)
    pieces: list[np.ndarray] = []
    # Per segment: tokens before the first response token, sequence id, first position, prefix fields.
    context, seq_of, first_pos, prefix_segment, prefix_len = [], [], [], [], []
    for j, pair in enumerate(pairs):
        if not isinstance(pair, Mapping):
            raise TypeError(f"pair {j} must be a mapping, got {type(pair).__name__}")
        prompt, chosen, rejected = (_token_array(pair, key, j) for key in _PAIR_KEYS)
        for key, ids in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            if ids.size == 0:
                raise ValueError(f"pair {j} has empty {key}; responses must include at least EOS")
        p = prompt.size
        if shared_prompt and p == 0:
            raise ValueError(f"pair {j} has an empty prompt; shared_prompt needs at least one prompt token")
        pieces += [prompt, chosen]
        context.append(p)
        seq_of.append(j)
        first_pos.append(0)
        prefix_segment.append(-1)
        prefix_len.append(0)
        if shared_prompt:
            pieces += [prompt[-1:], rejected]
            context.append(1)
            first_pos.append(p - 1)
            prefix_segment.append(2 * j)
            prefix_len.append(p - 1)
        else:
            pieces += [prompt, rejected]
            context.append(p)
            first_pos.append(0)
            prefix_segment.append(-1)
            prefix_len.append(0)
        seq_of.append(num_pairs + j)
    return _assemble(pieces, context, seq_of, first_pos, prefix_segment, prefix_len, num_pairs)


def pack_sequences(sequences: Sequence[Mapping[str, Sequence[int]]]) -> PackedBatch:
    """Equals one bin's :class:`PackedBatch` holding single sequences ``prompt + completion`` in order.

    Args:
        sequences: mappings with ``prompt_ids`` and ``completion_ids`` token lists; completions exclude the
            prompt and include EOS.

    Returns:
        CPU tensors for ``B = len(sequences)`` examples; the completion of example ``j`` is sequence ``j``
        (there is no second sequence ``B + j``).
    """
    if len(sequences) == 0:
        raise ValueError("pack_sequences needs at least one sequence, got none")
    pieces: list[np.ndarray] = []
    for j, sequence in enumerate(sequences):
        if not isinstance(sequence, Mapping):
            raise TypeError(f"sequence {j} must be a mapping, got {type(sequence).__name__}")
        prompt, completion = (_token_array(sequence, key, j, _SEQUENCE_KEYS) for key in _SEQUENCE_KEYS)
        if completion.size == 0:
            raise ValueError(f"sequence {j} has empty completion_ids; completions must include at least EOS")
        pieces += [prompt, completion]
    n = len(sequences)
    context = [piece.size for piece in pieces[::2]]
    return _assemble(pieces, context, list(range(n)), [0] * n, [-1] * n, [0] * n, n)


def _assemble(
    pieces: list[np.ndarray],
    context: list[int],
    seq_of: list[int],
    first_pos: list[int],
    prefix_segment: list[int],
    prefix_len: list[int],
    num_pairs: int,
) -> PackedBatch:
    """The PackedBatch of segments ``pieces[2s] + pieces[2s+1]`` whose tokens from ``context[s]`` on are
    scored as sequence ``seq_of[s]``, positioned from ``first_pos[s]``."""
    input_ids = np.concatenate(pieces)
    seg_lens = np.add.reduceat([piece.size for piece in pieces], np.arange(0, len(pieces), 2))
    cu_seqlens = np.concatenate([[0], np.cumsum(seg_lens)])
    segment_ids = np.repeat(np.arange(seg_lens.size), seg_lens)
    local = np.arange(input_ids.size) - cu_seqlens[segment_ids]
    position_ids = local + np.asarray(first_pos)[segment_ids]
    is_response = local >= np.asarray(context)[segment_ids]
    labeled = np.zeros(input_ids.size, dtype=bool)
    labeled[:-1] = is_response[1:] & (segment_ids[1:] == segment_ids[:-1])
    labels = np.where(labeled, np.roll(input_ids, -1), IGNORE_INDEX)
    seq_index = np.where(labeled, np.asarray(seq_of)[segment_ids], -1)

    def as_long(values: np.ndarray | list[int]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.int64))

    return PackedBatch(
        input_ids=as_long(input_ids),
        labels=as_long(labels),
        position_ids=as_long(position_ids),
        seq_index=as_long(seq_index),
        segment_ids=as_long(segment_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        prefix_segment=as_long(prefix_segment),
        prefix_len=as_long(prefix_len),
        num_pairs=num_pairs,
    )
