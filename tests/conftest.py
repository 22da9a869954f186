"""Shared test set-up: the Triton kernels run under the CPU interpreter on machines without a GPU."""

import os
import random

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


@pytest.fixture
def run_tiny_demo(tmp_path):
    """``fastdpo.demo.run_demo`` at the demo tests' tiny, fast size, in ``tmp_path``; keywords override."""
    from fastdpo.demo import run_demo

    def run(**overrides):
        options = dict(
            max_operand=20, hidden_size=48, sft_steps=300, sft_batch_size=64, dpo_steps=30,
            tokens_per_step=512, seed=random.randrange(1000), workdir=tmp_path, progress=False,
        )  # fmt: skip
        return run_demo(**{**options, **overrides})

    return run
