"""Fake CUDA tensors on CPU-only torch, enough to run the launchers without a GPU (see ``aot.py``).

``FakeTensorMode`` gives tensors on ``cuda`` without memory or a driver, but CPU-only torch still refuses
some calls on them: Python indexing and a few ops take a CUDA device guard first ("PyTorch is not linked
with support for cuda devices"). A torch-function mode replays those on meta twins, which have the same
geometry, and hands back fake CUDA tensors of the result's geometry. Values never matter here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def _meta_like(x):
    import torch

    if not isinstance(x, torch.Tensor):
        return x
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _fake_index(tensor, index):
    """``tensor[index]`` for a fake CUDA tensor: CPU-only torch refuses Python indexing on CUDA devices, so
    the view's geometry comes from a meta twin and is applied with ``as_strided`` (a copy for tensor
    indices; values never matter here)."""
    import torch

    idx = index if isinstance(index, tuple) else (index,)
    meta = _meta_like(tensor)[tuple(_meta_like(i) for i in idx)]
    if any(isinstance(i, torch.Tensor) for i in idx):
        return torch.empty(meta.shape, dtype=tensor.dtype, device=tensor.device)
    return torch.as_strided(
        tensor, meta.shape, meta.stride(), tensor.storage_offset() + meta.storage_offset()
    )


def _cuda_fallback(func, args, kwargs):
    """Runs ``func`` on meta twins when CPU-only torch refuses it on fake CUDA tensors (its device guard);
    in-place and ``out=`` ops return their target, others fresh fake CUDA tensors of the meta result's
    geometry."""
    import torch
    from torch.utils._pytree import tree_map

    result = func(*tree_map(_meta_like, args), **tree_map(_meta_like, kwargs))
    if kwargs.get("out") is not None:
        return kwargs["out"]
    if getattr(func, "__name__", "").endswith("_") and args and isinstance(args[0], torch.Tensor):
        return args[0]

    def to_cuda(x):
        if not isinstance(x, torch.Tensor):
            return x
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="cuda")

    return tree_map(to_cuda, result)


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Within it, tensors made with ``device="cuda"`` are fake (shapes, strides, dtypes; no memory), and
    indexing and the ops CPU-only torch guards by device work on them."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    class FakeCuda(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.__getitem__:
                return _fake_index(*args)
            if func is torch.Tensor.__setitem__:
                _fake_index(args[0], args[1])  # checks the index; a fake tensor has no values to set
                return None
            try:
                return func(*args, **kwargs)
            except RuntimeError as e:
                if "not linked with support for cuda" not in str(e):
                    raise
                return _cuda_fallback(func, args, kwargs)

    with FakeTensorMode(allow_non_fake_inputs=True), FakeCuda():
        yield
