"""Accelerators: specialised kernels that reproduce the Pyro program's numbers faster.

Each accelerator states the program structure it reproduces and is chosen by one function
that inspects the traced program (:func:`pyro_vae.inference.program.inspect_program`) and then
*verifies* the kernel on a probe -- the same noise through the kernel and through the generic
path, compared. A program outside the structure, or a probe that disagrees, takes the generic
Pyro path; the choice and its reason are recorded (:class:`PathChoice`, logged to the
``pyro_vae.paths`` logger, written to the run's events and outputs). Nothing else in the
package asks whether a model is "the default one".

===========================  =========================================  =====================
computation                  accelerator (structure it reproduces)      generic path
===========================  =========================================  =====================
training loss and gradients  :class:`FastELBO`: one latent site with a  the estimator's Pyro
                             diagonal Normal guide, pathwise, no         ELBO
                             infer options or extra scale, one          (``loss_and_grads``)
                             observed site, one data plate;
                             :class:`RelaxedDrawELBO`: the same with a
                             discrete site and a relaxed estimator
importance log-weights       :class:`BernoulliMLPWeights`: the same,    traces of the guide
                             plus an MLP decoder whose logits feed a    and the model
                             Bernoulli, binary x
gradient draws of the lab    ``hand`` (:class:`MLPGradients`: MLP        one Pyro
                             encoder with a diagonal Normal family,      ``loss_and_grads``
                             MLP decoder, Bernoulli, N(0, I) prior) and  per draw
                             ``func`` (any networks, diagonal Normal
                             guide: ``torch.func.vmap``); for a
                             discrete code ``hand`` is
                             :class:`CodeGradients` (Bernoulli or
                             one-hot code, MLP decoder, Bernoulli
                             likelihood) and ``func`` any networks
exact gradient (discrete     :func:`exact_table_gradient`: the same      ``ExactELBO`` on the
lab's oracle)                structure as :class:`CodeGradients`         program
===========================  =========================================  =====================
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import pyro.distributions as dist
import torch

from ..program import ProgramStructure, SiteInfo

#: Every path choice is logged here at INFO (``pyro-vae --verbose`` prints them).
LOG = logging.getLogger("pyro_vae.paths")
GENERIC = "generic"


@dataclass(frozen=True)
class PathChoice:
    """Which path a computation took, and why.

    Attributes:
        computation: what was computed ("training loss", "log-likelihood", ...).
        path: the accelerator's name, or ``"generic"`` for the Pyro program itself.
        reason: why (the structure that matched and the probe that agreed, or the first
            requirement that failed).
    """

    computation: str
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.computation}: {self.path} ({self.reason})"


def relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """The relative L2 distance between two gradients given as ``{name: tensor}`` (over the
    names of ``want``): how a probe compares an accelerator with the program."""
    diff = sum(float((got[k].float() - want[k].float()).pow(2).sum()) for k in want)
    norm = sum(float(want[k].float().pow(2).sum()) for k in want)
    return (diff / max(norm, 1e-30)) ** 0.5


def record(choice: PathChoice) -> PathChoice:
    """Log ``choice`` to :data:`LOG` and return it."""
    LOG.info("%s", choice)
    return choice


# -- structure requirements shared by the accelerators --------------------------------------------
def one_latent_problem(structure: ProgramStructure, latent_scale: float | None = 1.0
                       ) -> str | None:
    """Why the program is not ``z ~ q(z|x)`` / ``z ~ p(z), x ~ p(x|z)`` in one data plate, with
    no mask, or None if it is.

    ``latent_scale``: the extra scale (a ``poutine.scale``) the latent sites of the model and
    the guide must both carry, the observed site none; None accepts any scale (for
    computations that use the unscaled densities, such as the log-likelihood).
    """
    guide, latents, observed = (structure.guide_sites, structure.latent_sites,
                                structure.observed_sites)
    if len(guide) != 1:
        return f"the guide has {len(guide)} sample sites, not one"
    if len(latents) != 1 or latents[0].name != guide[0].name:
        return f"the model's latent sites are {[s.name for s in latents]}, not [{guide[0].name!r}]"
    if len(observed) != 1:
        return f"the model has {len(observed)} observed sites, not one"
    for site in (*guide, *structure.model_sites):
        want = 1.0 if site.observed else latent_scale
        if want is not None and site.extra_scale != want:
            return (f"site {site.name!r} is scaled by {site.extra_scale:g} (a poutine.scale)"
                    + (f", not {want:g}" if want != 1.0 else ""))
        if site.masked:
            return f"site {site.name!r} is masked"
        if len(site.plates) != 1:
            return f"site {site.name!r} is in plates {list(site.plates)}, not one data plate"
    return None


def diagonal_normal_problem(site: SiteInfo, exact: bool = True) -> str | None:
    """Why the guide site is not ``Normal(loc, scale).to_event(1)``, or None.

    ``exact``: the outer class must be ``Independent`` itself (not a variant that changes the
    surrogate, such as sticking the landing or a score-function site).
    """
    names = "(".join(t.__name__ for t in site.types) + ")" * (len(site.types) - 1)
    if len(site.types) != 2 or not issubclass(site.types[0], dist.Independent) \
            or site.types[1] not in (dist.Normal,) or site.reinterpreted_ndims != 1:
        return f"guide site {site.name!r} is {names}, not Normal(loc, scale).to_event(1)"
    if exact and site.types[0] is not dist.Independent:
        return f"guide site {site.name!r} is {names}, a variant with another surrogate"
    return None


def infer_problem(site: SiteInfo) -> str | None:
    if site.infer:
        return f"guide site {site.name!r} has infer options {dict(site.infer)}"
    return None


from .bernoulli_mlp import BernoulliMLPWeights, choose_log_weights  # noqa: E402
from .code_gradients import CodeGradients, exact_table_gradient  # noqa: E402
from .fast_elbo import FastELBO, RelaxedDrawELBO, choose_training_loss  # noqa: E402
from .mlp_gradients import MLPGradients  # noqa: E402

__all__ = ["PathChoice", "record", "relative_difference", "GENERIC", "LOG", "one_latent_problem",
           "diagonal_normal_problem", "infer_problem", "FastELBO", "choose_training_loss",
           "BernoulliMLPWeights", "choose_log_weights", "MLPGradients", "CodeGradients",
           "exact_table_gradient", "RelaxedDrawELBO"]
