"""A function of the VAE as a module, for ``torch.func.functional_call`` (shared by the lab's
vectorized draws for continuous and discrete codes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..models.vae import VAE


class Bound(nn.Module):
    """``fn(vae, *args)`` as a module, so ``functional_call`` swaps *every* use of a parameter.

    A prior may use the encoder (the VampPrior evaluates q(z|u_k) at its pseudo-inputs); calling
    the prior's own ``functional_call`` would leave that path on the real, unswapped encoder and
    silently drop the encoder gradient that flows through log p(z).
    """

    def __init__(self, vae: VAE, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.vae = vae
        self.fn = fn

    def forward(self, *args: Any) -> torch.Tensor:
        return self.fn(self.vae, *args)
