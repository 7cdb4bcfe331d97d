"""Gradient estimators of the ELBO: one registry entry each.

An :class:`Estimator` says how the guide samples the latent site ``z`` (the distribution it
hands to ``pyro.sample`` and the site's ``infer`` options) and which Pyro ELBO turns the traces
into a surrogate loss. Pyro decides per site between a pathwise and a score-function gradient
from the distribution's ``has_rsample`` (see docs/estimators.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import pyro.distributions as dist
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config


def _identity(q: dist.Distribution) -> dist.Distribution:
    return q


def _no_infer(modules: nn.ModuleDict, x: torch.Tensor) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Estimator:
    """How one gradient estimator is wired into the guide and the ELBO.

    Attributes:
        name: registry key.
        summary: one line for ``--help`` and the docs.
        make_elbo: ``(config) -> pyro.infer.ELBO`` building the objective.
        posterior: maps the encoder's q(z|x) to the distribution the guide samples ``z`` from
            (identity for pathwise gradients; a non-reparameterized or path-derivative variant
            otherwise).
        site_infer: ``(modules, x) -> dict`` giving the ``infer`` options of the ``z`` site
            (e.g. baselines); ``modules`` are those made by ``make_modules``.
        make_modules: ``(config, num_pixels) -> dict`` of extra trainable modules (e.g. a
            neural baseline) that live in the VAE and are trained and checkpointed with it.
        needs_closed_form_kl: the ELBO integrates KL(q || p) analytically, so the prior must
            be a diagonal Normal.
    """

    name: str
    summary: str
    make_elbo: Callable[[Config], ELBO]
    posterior: Callable[[dist.Distribution], dist.Distribution] = _identity
    site_infer: Callable[[nn.ModuleDict, torch.Tensor], dict[str, Any]] = _no_infer
    make_modules: Callable[[Config, int], dict[str, nn.Module]] = field(
        default=lambda cfg, num_pixels: {})
    needs_closed_form_kl: bool = False

    def check_config(self, cfg: Config) -> None:
        """Raise ConfigError if this estimator cannot be used with ``cfg``."""
        if self.needs_closed_form_kl:
            from .priors import PRIORS

            if not PRIORS[cfg.model.prior].closed_form_kl:
                raise ConfigError(f"estimator {self.name} needs a closed-form KL, which prior "
                                  f"{cfg.model.prior} does not have; use --estimator reparam")


def _trace_elbo(cfg: Config) -> ELBO:
    return Trace_ELBO(num_particles=cfg.train.num_particles, vectorize_particles=True,
                      max_plate_nesting=1)


def _mean_field_elbo(cfg: Config) -> ELBO:
    return TraceMeanField_ELBO(num_particles=cfg.train.num_particles, vectorize_particles=True,
                               max_plate_nesting=1)


#: Estimator name -> Estimator. Adding an estimator is one entry.
ESTIMATORS: dict[str, Estimator] = {
    "reparam": Estimator(
        "reparam", "pathwise (reparametrized) gradients through Trace_ELBO", _trace_elbo),
    "analytic-kl": Estimator(
        "analytic-kl", "reparametrized likelihood term, closed-form KL (TraceMeanField_ELBO)",
        _mean_field_elbo, needs_closed_form_kl=True),
}
