"""A thin alias kept so that ``from fastdpo.trainer import TrainConfig, Trainer, train`` keeps working: the
trainer lives in the ``fastdpo.train`` package, which this module only re-exports."""

from fastdpo.train import METRIC_NAMES, TrainConfig, Trainer, train

__all__ = ["METRIC_NAMES", "TrainConfig", "Trainer", "train"]
