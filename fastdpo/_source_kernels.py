"""``fastdpo.kernels`` from a source tree, where ``kernels/`` sits beside ``fastdpo/``."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path


class _SourceKernelsFinder:
    """Finds the checkout's ``kernels/`` as the namespace package ``fastdpo.kernels`` (source trees only).

    ``kernels/`` has no ``__init__.py``, so it never shadows the PyPI package ``kernels`` (which transformers
    imports) when the repository root is on ``sys.path``: a regular package wins over a namespace folder. A
    wheel puts it at ``fastdpo/kernels/`` and needs nothing here; a source tree (an editable install, or the
    root on ``sys.path``) has it beside this folder, where no finder maps a namespace subpackage.
    """

    def __init__(self, location: Path) -> None:
        self.location = str(location)

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        if fullname != "fastdpo.kernels":
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [self.location]
        return spec


def find_source_kernels() -> None:
    """Installs :class:`_SourceKernelsFinder` when fastdpo runs from a source tree (once)."""
    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (source / "linear_logprobs.py").is_file():
        return
    if not any(isinstance(f, _SourceKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceKernelsFinder(source))
