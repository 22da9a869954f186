"""fastdpo: fast, memory-lean DPO. Fused lm_head log-probs, fused preference losses, a packed trainer."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path


def _declare_source_kernels() -> None:
    """Makes the checkout's ``kernels/`` importable as ``fastdpo.kernels`` when fastdpo runs from source.

    ``kernels/`` has no ``__init__.py``, so it never shadows the PyPI package ``kernels`` (which transformers
    imports) when the repository root is on ``sys.path``: a regular package wins over a namespace folder. A
    wheel puts it at ``fastdpo/kernels/`` and needs nothing here; a source tree (an editable install, or the
    root on ``sys.path``) has it beside this folder, which no finder maps to a namespace subpackage.
    """
    here = Path(__file__).resolve().parent
    source = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (source / "linear_logprobs.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec(f"{__name__}.kernels", None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    setattr(sys.modules[__name__], "kernels", module)  # as the import system does for a loaded submodule


_declare_source_kernels()

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
