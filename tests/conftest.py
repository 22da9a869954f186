"""Shared test set-up: the Triton kernels run under the CPU interpreter on machines without a GPU."""

import os

import pytest
import torch

# Decided from the device node rather than torch.cuda, so that collection never initializes CUDA.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def nan_filled_empty(monkeypatch):
    """From here on in the test, ``torch.empty``/``empty_like`` return NaN-filled float tensors.

    An op that reads an output buffer before writing every element then shows NaN instead of passing by luck.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def prefilled(alloc):
        def wrapper(*args, **kwargs):
            out = alloc(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        return wrapper

    def enable():
        monkeypatch.setattr(torch, "empty", prefilled(real_empty))
        monkeypatch.setattr(torch, "empty_like", prefilled(real_empty_like))

    return enable
