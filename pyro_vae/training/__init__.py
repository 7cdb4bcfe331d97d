"""The training layer: the SVI loop, checkpoints, run folders and data parallelism."""

from .runs import load_run
from .trainer import Trainer, TrainResult, fit

__all__ = ["Trainer", "TrainResult", "fit", "load_run"]
