"""Anomaly scores from the model's density: -log p(x) or -ELBO, higher is more anomalous."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..models.vae import VAE
from .checks import check_positive
from .elbo import DEFAULT_ROWS_PER_STEP, elbo_terms
from .loglik import log_likelihood

SCORE_METHODS = ("nll", "elbo")


def anomaly_scores(vae: VAE, x: torch.Tensor, method: str = "nll", num_samples: int = 1000,
                   batch_size: int = 8, seed: int | None = 0, **kwargs: Any) -> torch.Tensor:
    """Per-image anomaly score: -log p(x) estimated with ``num_samples`` importance samples
    (``nll``), or the negative single-draw-averaged ELBO (``elbo``, ``num_samples`` draws).
    Higher means less likely under the model."""
    check_positive("num_samples", num_samples)
    if method == "nll":
        return -log_likelihood(vae, x, num_samples, batch_size, seed=seed, **kwargs)
    if method == "elbo":
        return -elbo_terms(vae, x, num_particles=num_samples, seed=seed,
                           batch_size=max(1, DEFAULT_ROWS_PER_STEP // num_samples)).elbo
    raise ConfigError(f"unknown score method {method!r}; choose one of: "
                      f"{', '.join(SCORE_METHODS)}")


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positive`` (bool) items: the
    probability that a random positive scores above a random negative, ties counting half
    (the Mann-Whitney U statistic over the product of the class sizes)."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average the ranks of tied scores.
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse,
                                                                     torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))

