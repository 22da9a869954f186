"""fastdpo.errors: the float-option check, and the loss API's input validation built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdpo.errors import UserError, finite_float
from fastdpo.losses import FusedLinearDPOLoss, fused_linear_dpo_loss, sequence_logps
from fastdpo.packing import IGNORE_INDEX

FLOAT_OPTIONS = {
    "beta": {},
    "label_smoothing": {},
    "f_alpha_divergence_coef": {},
    "discopop_tau": {},
    "simpo_gamma": {},
    "rpo_alpha": {},
    "ld_alpha": {},
    "temperature": {},
    "softcap": {},
}
BAD_VALUES = [
    (math.inf, ValueError, "expected a finite float, got inf"),
    (-math.inf, ValueError, "expected a finite float, got -inf"),
    (math.nan, ValueError, "expected a finite float, got nan"),
    (True, TypeError, "expected a finite float, got bool True"),
    ("0.1", TypeError, "expected a finite float, got str '0.1'"),
    (torch.tensor(0.1), TypeError, "expected a finite float, got Tensor"),
]


def test_finite_float():
    assert finite_float("x", 3) == 3.0 and isinstance(finite_float("x", 3), float)
    assert finite_float("x", np.float32(0.25)) == 0.25
    assert finite_float("x", -1e-300) == -1e-300
    for value, error, message in [
        *BAD_VALUES,
        (None, TypeError, "expected a finite float, got NoneType None"),
    ]:
        with pytest.raises(error, match=f"^x: {message}"):
            finite_float("x", value)
    assert issubclass(UserError, ValueError)


@pytest.mark.parametrize("option", sorted(FLOAT_OPTIONS))
@pytest.mark.parametrize(("value", "error", "message"), BAD_VALUES, ids=lambda v: repr(v)[:12])
def test_loss_rejects_non_finite_and_non_float_options(option, value, error, message):
    with pytest.raises(error, match=f"^{option}: {message}"):
        FusedLinearDPOLoss(**{option: value})


def test_loss_weights_and_ld_alpha_of_sequence_logps_are_checked():
    with pytest.raises(ValueError, match=r"^loss_weights\[1\]: expected a finite float, got nan"):
        FusedLinearDPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, math.nan])
    with pytest.raises(TypeError, match=r"^loss_weights\[0\]: expected a finite float, got str"):
        FusedLinearDPOLoss(loss_weights=["1"])
    hidden, weight, labels = torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="^ld_alpha: expected a finite float, got bool"):
        sequence_logps(hidden, weight, labels, ld_alpha=True)
    # Valid values still pass, ints included.
    FusedLinearDPOLoss(beta=1, label_smoothing=0, rpo_alpha=None, ld_alpha=0.5, temperature=2, softcap=30)


def padded_batch(num_pairs: int = 2, t: int = 7, d: int = 8, v: int = 13, masked: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * num_pairs, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) / d**0.5
    labels = torch.randint(0, v, (2 * num_pairs, t), generator=g)
    labels[:, :2] = IGNORE_INDEX  # the prompt
    labels[:, -1] = IGNORE_INDEX  # padding
    for row in masked:
        labels[row] = IGNORE_INDEX
    return hidden, weight, labels


def packed(hidden, labels, tag_masked: bool):
    """The padded rows one after the other; seq_index is -1 at ignored tokens, or (``tag_masked``) the row of
    a fully masked one."""
    rows = torch.arange(labels.shape[0])[:, None].expand_as(labels)
    seq = torch.where(labels != IGNORE_INDEX, rows, -1)
    if tag_masked:
        fully_masked = (labels == IGNORE_INDEX).all(dim=1, keepdim=True)
        seq = torch.where(fully_masked, rows, seq)
    return hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), seq.reshape(-1)


def test_num_pairs_must_match_the_packed_sequences():
    """A wrong num_pairs used to pair chosen j with another pair's rejected response, with a finite loss."""
    hidden, weight, labels = padded_batch()
    flat_h, flat_l, seq = packed(hidden, labels, tag_masked=False)
    options = dict(reference_free=True, backend="torch")
    fused_linear_dpo_loss(flat_h, weight, flat_l, seq_index=seq, num_pairs=2, **options)
    with pytest.raises(
        ValueError, match=r"names no token of sequences \[4, 5\] of 2B=6: num_pairs is larger"
    ):
        fused_linear_dpo_loss(flat_h, weight, flat_l, seq_index=seq, num_pairs=3, **options)
    with pytest.raises(ValueError, match=r"seq_index must lie in \[0, 2B=2\).*is num_pairs too small\?"):
        fused_linear_dpo_loss(flat_h, weight, flat_l, seq_index=seq, num_pairs=1, **options)
    # A sequence index past 2B on an ignored token is a wrong count too.
    seq_bad = seq.clone()
    seq_bad[0] = 4
    with pytest.raises(ValueError, match=r"seq_index must lie in \[0, 2B=4\)"):
        fused_linear_dpo_loss(flat_h, weight, flat_l, seq_index=seq_bad, num_pairs=2, **options)


def test_a_fully_masked_packed_response_keeps_its_index():
    """Tagged at its ignored tokens, a fully masked response scores 0, as in the padded layout; untagged, it
    is indistinguishable from a missing sequence."""
    hidden, weight, labels = padded_batch(masked=(3,))
    options = dict(reference_free=True, backend="torch")
    padded = fused_linear_dpo_loss(hidden, weight, labels, **options)
    flat_h, flat_l, seq = packed(hidden, labels, tag_masked=True)
    out = fused_linear_dpo_loss(flat_h, weight, flat_l, seq_index=seq, num_pairs=2, **options)
    assert out.rejected_logps[1] == 0
    for name in ("loss", "chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(out, name), getattr(padded, name), rtol=1e-6, atol=1e-6)
    flat_h, flat_l, seq = packed(hidden, labels, tag_masked=False)
    with pytest.raises(ValueError, match=r"sequences \[3\]"):
        fused_linear_dpo_loss(flat_h, weight, flat_l, seq_index=seq, num_pairs=2, **options)
