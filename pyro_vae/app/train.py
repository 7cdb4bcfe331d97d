"""Training with the run's figures: the trainer (:mod:`pyro_vae.training`) plus the plots."""

from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..data import Dataset
from ..models.vae import VAE
from ..training import distributed
from ..training.trainer import TrainResult, fit
from .plots import write_run_figures


def train(config: Config, run_dir: str | Path | None = None, *, resume: bool = False,
          overwrite: bool = False, dataset: Dataset | None = None,
          figures: bool = True, vae: VAE | None = None) -> TrainResult:
    """:func:`~pyro_vae.training.trainer.fit`, then write loss_curve.png, samples.png and
    reconstructions.png to ``run_dir``. Arguments as for ``fit``; ``figures=False`` skips the
    figures."""
    result = fit(config, run_dir, resume=resume, overwrite=overwrite, dataset=dataset, vae=vae)
    if (figures and result.run_dir is not None and not result.interrupted
            and distributed.current().is_main):
        write_run_figures(result)
    return result
