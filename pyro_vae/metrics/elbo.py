"""The ELBO per image and its two terms, read off the traces of the VAE's Pyro program.

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))        (Kingma & Welling 2014, eq. 7)

z is drawn by the guide's own distribution and every density is the site's own ``log_prob``
(:mod:`pyro_vae.inference.program`), so any guide family, prior, likelihood or poutine handler
in the program is measured as it is. Values are per image and in nats; higher is better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..inference.program import elbo_parts, log_weights, trace_program
from ..models.vae import VAE
from ..registry import LIKELIHOODS
from .checks import check_positive

#: Rows of z (samples x images) processed at once by the ELBO-based scores: bounds memory to
#: a few tens of MB (one float per pixel per row) whatever the number of samples.
DEFAULT_ROWS_PER_STEP = 8192


@torch.no_grad()
def elbo_per_image(vae: VAE, x: torch.Tensor, batch_size: int = 1000,
                   num_particles: int = 1) -> float:
    """Monte Carlo ELBO of ``x`` with ``num_particles`` draws per image, averaged over images.

    The same number as Pyro's ``Trace_ELBO`` on ``vae.model``/``vae.guide`` without extra
    scales, whatever estimator trained the model (the value does not depend on how gradients
    are estimated). Draws come from the global RNG; the caller's param store is untouched.
    """
    check_positive("batch_size", batch_size)
    check_positive("num_particles", num_particles)
    total = 0.0
    for chunk in x.split(batch_size):
        traces = trace_program(vae, chunk, num_particles)
        total += float(log_weights(traces, chunk.shape[0]).double().mean(0).sum())
    return total / x.shape[0]


@dataclass
class ElboTerms:
    """Per-image ELBO terms in nats: ``elbo = reconstruction - kl``.

    Attributes:
        reconstruction: Monte Carlo estimate of E_q[log p(x|z)], shape ``(N,)``.
        kl: KL(q(z|x) || p(z)), in closed form when torch knows the pair of distributions,
            else the Monte Carlo average of log q(z|x) - log p(z) over the same draws.
        kl_closed_form: whether ``kl`` is exact.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_closed_form: bool

    @property
    def elbo(self) -> torch.Tensor:
        return self.reconstruction - self.kl


@torch.no_grad()
def elbo_terms(vae: VAE, x: torch.Tensor, batch_size: int = 1000, num_particles: int = 1,
               seed: int | None = None, closed_form_kl: bool = True) -> ElboTerms:
    """The ELBO of each image split into reconstruction and KL terms.

    ``num_particles`` draws per image; ``seed`` seeds them (the global RNG is restored
    afterwards), None draws from the global RNG. ``closed_form_kl=False`` estimates the KL by
    Monte Carlo even where torch knows it in closed form.
    """
    check_positive("batch_size", batch_size)
    check_positive("num_particles", num_particles)
    recon, kl, closed = [], [], True
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for xb in x.split(batch_size):
            parts = elbo_parts(trace_program(vae, xb, num_particles), xb.shape[0],
                               closed_form=closed_form_kl)
            recon.append(parts.reconstruction.mean(0))
            kl.append(parts.kl.mean(0))
            closed = closed and parts.closed_form
    return ElboTerms(torch.cat(recon).float(), torch.cat(kl).float(), closed)


#: Grey levels of the 8-bit images the datasets come from.
GREY_LEVELS = 256


def bits_per_dim(nats: float, num_pixels: int, likelihood: str = "bernoulli") -> float:
    """-log2 p(x) per pixel. For a density on [0, 1] (``Likelihood.is_density``) the value is
    first put on the scale of the 256 grey levels, log p(x) - D log 256: the log-probability
    of the pixel's bin if the density were flat within it (the uniform-dequantization
    convention, Theis, van den Oord & Bethge 2016). Without that term a density's "bits/dim"
    can be negative and is not comparable with a discrete likelihood's."""
    if getattr(LIKELIHOODS.get(likelihood), "is_density", False):
        nats = nats - num_pixels * math.log(GREY_LEVELS)
    return -nats / (num_pixels * math.log(2))
