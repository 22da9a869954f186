"""fastdpo: fast, memory-lean DPO. Fused lm_head log-probs, fused preference losses, a packed trainer."""

import importlib.machinery
import sys
from pathlib import Path


class _SourceKernelsFinder:
    """Finds the checkout's ``kernels/`` as the namespace package ``fastdpo.kernels`` when fastdpo runs from source.

    ``kernels/`` has no ``__init__.py``, so it never shadows the PyPI package ``kernels`` (which transformers
    imports) when the repository root is on ``sys.path``: a regular package wins over a namespace folder. A
    wheel puts it at ``fastdpo/kernels/`` and needs nothing here; a source tree (an editable install, or the
    root on ``sys.path``) has it beside this folder, where no finder maps a namespace subpackage.
    """

    def __init__(self, location: Path) -> None:
        self.location = str(location)

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        if fullname != f"{__name__}.kernels":
            return None
        spec = importlib.machinery.ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [self.location]
        return spec


def _find_source_kernels() -> None:
    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (source / "linear_logprobs.py").is_file():
        return
    if not any(isinstance(f, _SourceKernelsFinder) for f in sys.meta_path):
        sys.meta_path.append(_SourceKernelsFinder(source))


_find_source_kernels()

from fastdpo.losses import FusedLinearDPOLoss, PreferenceLossOutput, fused_linear_dpo_loss, sequence_logps
from fastdpo.losses.kto import FusedLinearKTOLoss, KTOLossOutput
from fastdpo.ops.linear_logprobs import linear_logprobs
from fastdpo.packing import PackedBatch

__version__ = "0.1.0"

__all__ = [
    "FusedLinearDPOLoss",
    "FusedLinearKTOLoss",
    "KTOLossOutput",
    "PackedBatch",
    "PreferenceLossOutput",
    "fused_linear_dpo_loss",
    "linear_logprobs",
    "sequence_logps",
]
