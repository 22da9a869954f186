"""Errors the user can fix, and the check every float option goes through.

``UserError`` marks a problem in what the user gave: bad data, a bad path, a bad option value, a run that
diverged, no valid checkpoint to resume from. Any layer may raise it (this module imports nothing of
fastdpo). It subclasses ``ValueError``, so callers that catch ``ValueError`` keep working.

The ``fastdpo`` command prints a ``UserError`` raised anywhere as ``fastdpo <cmd>: error: <message>`` and
exits with status 2, the status argparse uses for usage errors. So do ``ValueError``, ``TypeError`` and
``OSError`` raised while the command checks its arguments, before any model is loaded (config values,
paths, device). Any other exception is a bug and shows its traceback (status 1); ``--debug`` shows the
traceback of user errors too.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["UserError", "finite_float"]


class UserError(ValueError):
    """A problem the user can fix; its message names the input and what was expected."""


def finite_float(name: str, value: object) -> float:
    """Equals ``float(value)`` when ``value`` is a finite real number (an int, float or numpy float).

    Args:
        name: The option's name, used in the error message.
        value: The value given for it.

    Returns:
        The value as a Python float.

    Raises:
        TypeError: ``value`` is a bool, a string or not a real number.
        ValueError: ``value`` is inf or nan.
    """
    # bool is an int subclass, so ``beta=True`` would otherwise pass as 1.0.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite float, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}: expected a finite float, got {number}")
    return number
