"""Softmax moments of a logits chunk in one pass: the torch backend's share of the logit statistics.

Per row of an fp32 chunk ``z`` and its exponentials ``e = exp(z - max)``: ``sum(z)`` (mean logit),
``sum(e * z)`` (entropy) and ``sum(e * e)`` (``log sum p**2``). In eager torch these are five passes over
the chunk and two temporaries; on the CPU ``fastdpo._C.softmax_moments`` reads ``z`` and ``e`` once.
:func:`softmax_moments_numpy` is its twin (used when the extension is not built): the same summation
order, so identical bits. Off the CPU the three torch reductions run instead.
"""

from __future__ import annotations

import numpy as np
import torch

from fastdpo.metarun import device_type

try:
    from fastdpo import _C
except ImportError:  # extension not built: the numpy twin gives identical sums
    _C = None

__all__ = ["softmax_moments", "softmax_moments_numpy"]

# The C++ order (csrc/softmax_moments.cpp): 16 lanes per block of 256 elements, blocks added in order.
_LANES = 16
_BLOCK = 256


def softmax_moments(z: torch.Tensor, e: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.stack([z.sum(-1), (e * z).sum(-1), (e * e).sum(-1)])``: fp32 ``[3, n]`` of ``[n, c]`` chunks.

    Args:
        z: fp32 ``[n, c]`` with unit stride along ``c`` (rows may be strided, as a view of a larger buffer).
        e: fp32 ``[n, c]``, the same layout rules.
        out: optional fp32 ``[3, n]`` with unit stride along ``n`` to write the sums into (and return).
    """
    if out is None:
        out = torch.empty(3, z.shape[0], device=z.device, dtype=torch.float32)
    if z.is_meta and device_type(z.device) == "cpu":  # fastdpo plan: the C++ pass allocates only ``out``
        return out
    if not z.is_cpu:
        return torch.stack([z.sum(-1), (e * z).sum(-1), (e * e).sum(-1)], out=out)
    if _C is None:
        out.copy_(torch.from_numpy(softmax_moments_numpy(z.numpy(), e.numpy())))
    else:
        _C.softmax_moments(z.numpy(), e.numpy(), out.numpy(), torch.get_num_threads())
    return out


def softmax_moments_numpy(z: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The twin of ``fastdpo._C.softmax_moments``: the same sums, added in the same order, in numpy.

    Zero padding to whole blocks changes no sum (every lane starts at +0.0). numpy adds along a
    non-contiguous axis one element after another, which is the C++ order within lanes and across blocks.
    """
    n, c = z.shape
    width = -(-c // _BLOCK) * _BLOCK
    out = np.empty((3, n), dtype=np.float32)
    zp = np.zeros((n, width), dtype=np.float32)
    ep = np.zeros((n, width), dtype=np.float32)
    zp[:, :c], ep[:, :c] = z, e
    for k, terms in enumerate((zp, ep * zp, ep * ep)):
        groups = terms.reshape(n, width // _BLOCK, _BLOCK // _LANES, _LANES)
        blocks = np.add.reduce(groups, axis=2, initial=np.float32(0))
        lanes = np.add.reduce(blocks, axis=1, initial=np.float32(0))
        total = lanes[:, 0].copy()
        for lane in range(1, _LANES):
            total += lanes[:, lane]
        out[k] = total
    return out
