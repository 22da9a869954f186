"""TRL integration (TRL 1.16.x): fastdpo's fused kernels inside TRL's trainers.

Rooms: ``common`` (the version guard, the fused-head install on the model, batch and metric plumbing),
``dpo`` (``FastDPOTrainer``, a drop-in ``trl.DPOTrainer``) and ``kto`` (``FastKTOTrainer``, a drop-in
``trl.KTOTrainer``). Other TRL versions raise ``RuntimeError`` when a trainer is built, because the
overrides mirror the internals of TRL 1.16.
"""

from fastdpo.integrations.trl.common import SUPPORTED_TRL_VERSIONS, check_trl_version
from fastdpo.integrations.trl.dpo import TRL_LOSS_TYPES, FastDPOModelOutput, FastDPOTrainer
from fastdpo.integrations.trl.kto import FastKTOModelOutput, FastKTOTrainer

__all__ = [
    "SUPPORTED_TRL_VERSIONS",
    "TRL_LOSS_TYPES",
    "FastDPOModelOutput",
    "FastDPOTrainer",
    "FastKTOModelOutput",
    "FastKTOTrainer",
    "check_trl_version",
]
