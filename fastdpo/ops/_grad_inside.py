"""Autograd inside a registered op's body, for the torch twins that derive their coefficients by autograd.

A ``torch.library.custom_op``'s body runs below the autograd dispatch keys (the op's own autograd layer
has run already), so ops inside it record no graph and ``torch.autograd.grad`` finds nothing to
differentiate. The loss twins (``preference_loss_torch``, ``kto_loss_torch``) differentiate a ``[S]``-sized
graph that lives and dies inside the op, so re-admitting those keys there is safe: nothing of that graph
leaks out. ``torch.func.grad`` would do without the guard, but its tensor wrappers fail opcheck's schema
check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["grad_inside_op"]


@contextmanager
def grad_inside_op() -> Iterator[None]:
    """Inside a custom op's body: ops record autograd graphs again (as ``torch.enable_grad`` outside)."""
    keys = torch._C.DispatchKey
    with (
        torch._C._SetExcludeDispatchKeyGuard(keys.AutogradFunctionality, False),
        torch._C._SetExcludeDispatchKeyGuard(keys.ADInplaceOrView, False),
        torch.enable_grad(),
    ):
        yield
