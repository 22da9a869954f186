"""Shared test set-up: the Triton kernels run under the CPU interpreter on machines without a GPU."""

import os

# Decided from the device node rather than torch.cuda, so that collection never initializes CUDA.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
