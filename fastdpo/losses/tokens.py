"""Token preparation shared by the fused losses: layout flattening, validation, compaction, reductions.

Dimension letters: S scored sequences, N tokens, M valid tokens, D hidden, V vocab.

Both layouts reduce to the same thing: the hidden-state rows of the valid tokens (label not
``ignore_index``), their targets, the sequence each one belongs to and its weight in that sequence's
scored log-prob. A loss family (``dpo.py``, ``kto.py``) decides how many sequences a batch holds and what
the token weights are; everything else lives here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from fastdpo.metarun import autocast_dtype, host_values

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Tokens:
    """Valid tokens of a batch in either layout, and how they reduce to sequences."""

    hidden2d: torch.Tensor  # [N, D]
    rows: torch.Tensor  # [M] row of each valid token in hidden2d
    targets: torch.Tensor  # [M]
    seq_index: torch.Tensor  # [M] sequence of each valid token, 0..S-1
    token_weights: torch.Tensor  # [M] fp32 weight of each token in its scored sequence log-prob
    lengths: torch.Tensor  # [S] fp32 valid tokens per sequence
    counts: list[int] | None  # [S] the same counts on the host; None under torch.compile (no host sync)
    labels: torch.Tensor  # [N] every row's label, ignore_index where no loss (the head ops' targets)
    ignore_index: int
    num_seqs: int  # S


def check_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def is_integer(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def flatten_layout(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    seq_index: torch.Tensor | None,
    *,
    rows_hint: str,
    count_name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int | None]:
    """Checks shapes and returns ``(hidden [N, D], labels [N], seq_index [N] or None, padded rows or None)``.

    Args:
        rows_hint: how the padded layout's rows are read, e.g. ``"[2B, T]"``, for the error messages.
        count_name: the argument that gives the packed layout's sequence count, e.g. ``"num_pairs"``.
    """
    check_tensor("hidden", hidden)
    check_tensor("labels", labels)
    if not is_integer(labels):
        raise TypeError(f"labels must be an integer tensor of token ids, got {labels.dtype}")
    if seq_index is None:
        if hidden.dim() != 3 or labels.dim() != 2:
            raise ValueError(
                f"padded layout expects hidden {rows_hint[:-1]}, D] and labels {rows_hint}, got hidden "
                f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}; pass seq_index and {count_name} "
                "for the packed layout"
            )
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal hidden's {rows_hint} = "
                f"{tuple(hidden.shape[:2])}"
            )
        return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), None, hidden.shape[0]
    check_tensor("seq_index", seq_index)
    if not is_integer(seq_index):
        raise TypeError(f"seq_index must be an integer tensor, got {seq_index.dtype}")
    if hidden.dim() != 2 or labels.dim() != 1 or seq_index.dim() != 1:
        raise ValueError(
            f"packed layout expects hidden [N, D], labels [N] and seq_index [N], got {tuple(hidden.shape)}, "
            f"{tuple(labels.shape)} and {tuple(seq_index.shape)}"
        )
    if not labels.shape[0] == seq_index.shape[0] == hidden.shape[0]:
        raise ValueError(
            f"packed layout needs one label and one seq_index per token: hidden has N={hidden.shape[0]}, "
            f"labels {labels.shape[0]}, seq_index {seq_index.shape[0]}"
        )
    return hidden, labels, seq_index, None


def check_linear(hidden2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    """Checks an lm_head's shapes, dtypes and devices against the hidden states it multiplies.

    Under ``torch.autocast`` every float dtype is accepted (the head casts to the autocast dtype); outside
    it, hidden, weight and bias must share one.
    """
    check_tensor(f"{name}weight", weight)
    if hidden2d.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}hidden must be float32, bfloat16 or float16, got {hidden2d.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden2d.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"{name}weight must be [V, D] with D={hidden2d.shape[1]} as {name}hidden, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None:
        check_tensor(f"{name}bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}bias must be [V]=[{weight.shape[0]}], got {tuple(bias.shape)}")
    autocast = autocast_dtype(hidden2d.device) is not None
    for part, t in ((f"{name}weight", weight), (f"{name}bias", bias)):
        if t is None:
            continue
        if autocast and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{part} must be float32, bfloat16 or float16, got {t.dtype}")
        if not autocast and t.dtype != hidden2d.dtype:
            raise TypeError(
                f"{part} dtype {t.dtype} differs from {name}hidden dtype {hidden2d.dtype}; run under "
                "torch.autocast (all are cast to its dtype) or cast one of them"
            )
    devices = {hidden2d.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devices) > 1:
        raise ValueError(
            f"{name}hidden, weight and bias must share one device, got {sorted(map(str, devices))}"
        )


def _count(index: torch.Tensor, size: int) -> torch.Tensor:
    """``torch.bincount(index, minlength=size)`` for ``index`` in ``[0, size)``, with a static shape."""
    ones = torch.ones_like(index)
    return torch.zeros(size, dtype=index.dtype, device=index.device).index_add_(0, index, ones)


def prepare_tokens(
    hidden2d: torch.Tensor,
    labels1d: torch.Tensor,
    seq1d: torch.Tensor | None,
    *,
    padded_len: int,
    num_seqs: int,
    vocab: int,
    ignore_index: int,
    seqs_name: str,
    count_name: str | None = None,
) -> Tokens:
    """Compacts the valid tokens and validates them, with one host sync for every data-dependent check
    (none under torch.compile: the checks are asserted on the device, the counts stay there).

    Args:
        seq1d: the packed layout's ``seq_index``; None for the padded layout, where row ``r // padded_len``
            is the sequence of flat row ``r``.
        padded_len: T of the padded layout.
        num_seqs: S, the number of scored sequences.
        seqs_name: how S is written in the error messages, e.g. ``"2B"``.
        count_name: packed layout: the argument S comes from (e.g. ``"num_pairs"``). When given, every
            sequence must appear in ``seq_index`` (a fully masked one at its ignored tokens) and ignored
            tokens must hold ``-1`` or a sequence, so that a wrong count fails instead of pairing the
            wrong sequences.

    Returns:
        ``Tokens`` with unit token weights.
    """
    if labels1d.device != hidden2d.device or (seq1d is not None and seq1d.device != hidden2d.device):
        raise ValueError(f"labels and seq_index must be on hidden's device {hidden2d.device}")
    if hidden2d.is_meta:
        return _meta_tokens(hidden2d, labels1d, seq1d, padded_len, num_seqs, ignore_index)
    rows = (labels1d != ignore_index).nonzero()[:, 0]
    targets = labels1d.index_select(0, rows).long()
    seqs = rows // padded_len if seq1d is None else seq1d.index_select(0, rows).long()
    bad_seq = ((seqs < 0) | (seqs >= num_seqs)).any()
    bad_target = ((targets < 0) | (targets >= vocab)).any()
    lengths = _count(seqs.clamp(0, num_seqs - 1), num_seqs)
    present = []
    if count_name is not None and seq1d is not None:
        every = seq1d.long()
        bad_seq = bad_seq | ((every < -1) | (every >= num_seqs)).any()
        # Tokens of each sequence, labeled or not; -1 and out-of-range values land in the dropped last bin.
        named = torch.where((every < 0) | (every >= num_seqs), num_seqs, every)
        present = [_count(named, num_seqs + 1)[:num_seqs]]
    if torch.compiler.is_compiling():
        _assert_on_device(bad_seq, bad_target, present, ignore_index)
        return _tokens(hidden2d, rows, targets, seqs, lengths, None, labels1d, ignore_index, num_seqs)
    host = torch.cat([torch.stack([bad_seq, bad_target]).long(), lengths, *present]).tolist()
    bad_seq, bad_target, counts = host[0], host[1], host[2 : 2 + num_seqs]
    if bad_seq:
        raise ValueError(
            f"seq_index must lie in [0, {seqs_name}={num_seqs}) at every token whose label is not "
            f"ignore_index={ignore_index} (-1 only at ignored tokens)"
            + (f"; is {count_name} too small?" if count_name is not None else "")
        )
    missing = [s for s, n in enumerate(host[2 + num_seqs :]) if n == 0]
    if missing:
        raise ValueError(
            f"seq_index names no token of sequences {missing[:8]} of {seqs_name}={num_seqs}: {count_name} is "
            "larger than the batch, or sequences are missing (a fully masked sequence keeps its index at its "
            "ignored tokens)"
        )
    if bad_target:
        raise ValueError(f"labels must be ignore_index={ignore_index} or token ids in [0, V={vocab})")
    return _tokens(hidden2d, rows, targets, seqs, lengths, counts, labels1d, ignore_index, num_seqs)


def _tokens(hidden2d, rows, targets, seqs, lengths, counts, labels1d, ignore_index, num_seqs) -> Tokens:  # noqa: ANN001
    return Tokens(
        hidden2d=hidden2d,
        rows=rows,
        targets=targets,
        seq_index=seqs,
        token_weights=torch.ones(rows.shape[0], dtype=torch.float32, device=rows.device),
        lengths=lengths.float(),
        counts=counts,
        labels=labels1d,
        ignore_index=ignore_index,
        num_seqs=num_seqs,
    )


def _assert_on_device(bad_seq, bad_target, present, ignore_index) -> None:  # noqa: ANN001
    """``prepare_tokens``' checks under torch.compile: asserted on the device, without a host sync (the
    eager path syncs once to raise ``ValueError`` with the details). The messages name no size: a size in
    them would specialize the compiled graph on it."""
    torch._assert_async(~bad_seq, "seq_index must lie in [0, S) at every token whose label is not ignored")
    if present:
        torch._assert_async((present[0] > 0).all(), "seq_index names no token of some sequence")
    torch._assert_async(~bad_target, f"labels must be ignore_index={ignore_index} or token ids in [0, V)")


def _meta_tokens(hidden2d, labels1d, seq1d, padded_len, num_seqs, ignore_index) -> Tokens:  # noqa: ANN001
    """``prepare_tokens`` on the meta device (fastdpo plan), unchecked: the valid tokens as the labels'
    remembered values say (``metarun.remember_values``), else every token (an upper bound)."""
    device, labels = hidden2d.device, host_values(labels1d)
    seq_values = host_values(seq1d) if seq1d is not None else None
    if labels is None or (seq1d is not None and seq_values is None):
        rows = torch.arange(labels1d.shape[0], device=device)
        seqs = rows // padded_len if seq1d is None else seq1d.long()
        counts = [1] * num_seqs
    else:
        host_rows = (labels != ignore_index).nonzero()[:, 0]
        host_seqs = host_rows // padded_len if seq1d is None else seq_values[host_rows]
        counts = torch.bincount(host_seqs, minlength=num_seqs).tolist()
        rows, seqs = host_rows.to(device), host_seqs.to(device)
    return Tokens(
        hidden2d=hidden2d,
        rows=rows,
        targets=torch.empty(rows.shape[0], dtype=torch.long, device=device),
        seq_index=seqs,
        token_weights=torch.ones(rows.shape[0], dtype=torch.float32, device=device),
        lengths=torch.tensor(counts, dtype=torch.float32, device=device),
        counts=counts,
        labels=labels1d,
        ignore_index=ignore_index,
        num_seqs=num_seqs,
    )


def check_lengths(tokens: Tokens, reasons: list[str]) -> None:
    """Raises ``ValueError`` if a sequence has no valid token while ``reasons`` divide by its length."""
    if tokens.counts is None:  # torch.compile: checked on the device
        if reasons:
            torch._assert_async(
                (tokens.lengths > 0).all(), f"a sequence has no valid label, but {reasons} divide by it"
            )
        return
    missing = [s for s, n in enumerate(tokens.counts) if n == 0]
    if missing and reasons:
        raise ValueError(
            f"sequences {missing[:8]} have no valid label (fully masked response), but {reasons} divide by "
            "the response length; drop these sequences or raise the truncation length"
        )


def reduce_tokens(values: torch.Tensor, tokens: Tokens, weighted: bool = True) -> torch.Tensor:
    """``[S]`` fp32 per-sequence sums of per-token ``values`` (times the token weights if ``weighted``)."""
    out = torch.zeros(tokens.num_seqs, dtype=torch.float32, device=values.device)
    return out.index_add_(0, tokens.seq_index, values * tokens.token_weights if weighted else values)


def _every_row(tokens: Tokens, values: torch.Tensor) -> bool:
    # Under torch.compile the valid count is data-dependent: unknown, it takes the copying path.
    return guard_or_false(tokens.rows.shape[0] == values.shape[0])


def gather_rows(values: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """The valid tokens' rows of ``values`` (``[N, ...]``); no copy when every token is valid."""
    if _every_row(tokens, values):
        return values
    return values.index_select(0, tokens.rows)


def scatter_rows(values: torch.Tensor, hidden2d: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """``values`` of the valid tokens placed back at their rows of ``hidden2d``, zeros elsewhere."""
    if _every_row(tokens, hidden2d):
        return values
    return values.new_zeros((hidden2d.shape[0], *values.shape[1:])).index_copy_(0, tokens.rows, values)
