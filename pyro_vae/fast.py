"""A fast training loss for the reparametrized VAE: Trace_ELBO's numbers without Pyro's tracing.

For a guide whose only site is ``z ~ q(z|x)`` with pathwise gradients and a model
``z ~ p(z), x ~ p(x|z)`` inside one data plate, Pyro's Trace_ELBO surrogate has no
score-function term and equals minus the Monte Carlo ELBO itself (Kingma & Welling 2014, eq. 10):

    loss = -(N / B) * (1 / K) * sum_k sum_n [log p(x_n|z_nk) + log p(z_nk) - log q(z_nk|x_n)],
    z_nk = loc_n + scale_n * eps_nk,   eps_nk ~ N(0, I),

with N the dataset size, B the minibatch and K the particles. TraceMeanField_ELBO replaces
``log p(z) - log q(z|x)`` by ``-KL(q || p)`` in closed form. :class:`FastELBO` computes exactly this
with the VAE's own encoder, decoder and prior and draws ``eps`` from the global torch generator
the way Pyro's sample site does, so with the same seed it gives Trace_ELBO's loss and gradients
(up to float rounding; ``tests/test_speed_paths.py`` checks it). It is used only where that
identity holds (:func:`fast_path_problem`); everything else trains through Pyro.

Under data parallelism every rank draws the noise of the whole global minibatch and keeps its
own rows, so a run gives the same result whatever the number of processes.

Mixed precision (:func:`precision_context`): matrix products run in bfloat16 under autocast,
and every linear or convolution layer hands float32 back, so activations, distributions,
log-densities and their sums stay in float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import kl_divergence

from .estimators import _identity, _no_infer

if TYPE_CHECKING:
    from .config import Config
    from .model import VAE

#: Estimators whose ELBO the fast path reproduces, and whether that ELBO uses a closed-form KL.
FAST_ESTIMATORS = {"reparam": False, "analytic-kl": True}
PRECISIONS = {"float32": None, "bf16": torch.bfloat16}
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def fast_path_problem(cfg: Config, vae: VAE) -> str | None:
    """Why the fast path cannot stand in for Pyro's ELBO with this config, or None if it can."""
    from .estimators import ESTIMATORS

    name = cfg.train.estimator
    if name not in FAST_ESTIMATORS:
        return f"estimator {name} is not one the fast path reproduces"
    estimator = ESTIMATORS[name]
    if (estimator.posterior is not _identity or estimator.site_infer is not _no_infer
            or len(vae.estimator_modules)):
        return f"estimator {name} changes the guide"
    return None


class FastELBO(nn.Module):
    """Minus the ELBO of a minibatch as Trace_ELBO (or TraceMeanField_ELBO) computes it.

    A module (its submodule is the VAE) so that DistributedDataParallel can wrap it: calling
    it returns the scalar loss whose ``backward()`` gives Trace_ELBO's gradients.

    Args:
        vae: the model whose encoder, decoder and prior are used.
        num_data: dataset size N; the minibatch terms are scaled by N / B (None: no scaling).
        num_particles: K samples of z per image, averaged.
        analytic_kl: use KL(q || p) in closed form, as TraceMeanField_ELBO does.
        rank, world_size: this process's place among data-parallel processes; the noise of
            the whole global minibatch (``world_size`` times this one) is drawn, rows
            ``rank * B`` to ``(rank + 1) * B`` are used.
    """

    def __init__(self, vae: VAE, num_data: int | None = None, num_particles: int = 1,
                 analytic_kl: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.vae = vae
        self.num_data = num_data
        self.num_particles = num_particles
        self.analytic_kl = analytic_kl
        self.rank, self.world_size = rank, world_size

    def _noise(self, loc: torch.Tensor) -> torch.Tensor:
        batch = loc.shape[0]
        shape = (batch * self.world_size, *loc.shape[1:])
        if self.num_particles > 1:
            shape = (self.num_particles, *shape)
        # Same draw as Normal.rsample inside Pyro's sample site (and its particle plate).
        eps = torch.randn(shape, dtype=loc.dtype, device=loc.device)
        if self.world_size > 1:
            eps = eps.narrow(-2, self.rank * batch, batch)
        return eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        # Argument validation happens once per distribution in Pyro's path too; here the
        # trainer checks the loss and gradients for non-finite values instead.
        with dist.validation_enabled(False):
            q = vae.encoder(x)
            if not (isinstance(q, dist.Independent) and isinstance(q.base_dist, dist.Normal)
                    and q.reinterpreted_batch_ndims == 1):
                raise TypeError(f"the fast path needs an encoder returning a diagonal Normal, "
                                f"got {type(q).__name__}")
            loc, scale = q.base_dist.loc, q.base_dist.scale
            eps = self._noise(loc)
            z = loc + scale * eps
            log_px = vae.decoder(z).log_prob(x)
            prior = vae.prior()
            if self.analytic_kl:
                kl = kl_divergence(q, prior).sum()
                elbo = log_px.sum() / self.num_particles - kl
            else:
                # log q(z|x) at z = loc + scale * eps, written with eps (same value and gradient
                # as Normal.log_prob(z), one division fewer).
                log_qz = -(0.5 * eps.square() + scale.log()).sum(-1) - loc.shape[-1] * _HALF_LOG_2PI
                elbo = (log_px + prior.log_prob(z) - log_qz).sum() / self.num_particles
        scale_factor = 1.0 if self.num_data is None else self.num_data / x.shape[0]
        return -elbo * scale_factor


def make_fast_elbo(cfg: Config, vae: VAE, num_data: int, rank: int = 0,
                   world_size: int = 1) -> FastELBO | None:
    """The fast loss for ``cfg`` if ``cfg.train.fast_path`` allows it and it is valid, else None."""
    if not getattr(cfg.train, "fast_path", True) or fast_path_problem(cfg, vae) is not None:
        return None
    return FastELBO(vae, num_data, cfg.train.num_particles,
                    analytic_kl=FAST_ESTIMATORS[cfg.train.estimator], rank=rank,
                    world_size=world_size)


# -- mixed precision ------------------------------------------------------------------------------
_LOW_PRECISION_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                         nn.ConvTranspose2d, nn.ConvTranspose3d)


def _to_float32(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.float() if output.dtype == torch.bfloat16 else output


def keep_float32_outputs(model: nn.Module) -> None:
    """Make each linear/conv layer of ``model`` return float32 even under bf16 autocast.

    Only the matrix product itself then runs in bfloat16; activations, the distributions the
    networks return and every log-density stay float32. Idempotent; harmless without autocast.
    """
    for module in model.modules():
        if isinstance(module, _LOW_PRECISION_LAYERS) and not getattr(module, "_pyro_vae_fp32",
                                                                     False):
            module.register_forward_hook(_to_float32)
            module._pyro_vae_fp32 = True


@contextlib.contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast to bfloat16 for ``precision == "bf16"``; nothing for float32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """torch Adam with the fused kernel where the device has one (one kernel for all tensors)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=device.type in ("cpu", "cuda"))
    except (RuntimeError, TypeError):  # an older torch or a device without a fused kernel
        return torch.optim.Adam(params, lr=lr)

