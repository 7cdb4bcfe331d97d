"""A function of the VAE as a module, for ``torch.func.functional_call``, and the lab's
vectorized draws with the encoder's forward pass shared by all draws (for continuous and
discrete codes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

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


def split_draws(vae: VAE, fn: Callable[..., torch.Tensor], encoded: tuple[torch.Tensor, ...],
                pull_back: Callable, rest: dict[str, torch.Tensor]
                ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``noise -> {parameter name: (draws, *shape) gradient}`` of ``fn(vae, *encoded, noise)``
    (one draw's loss), with the encoder's forward pass shared by all draws.

    The encoder sees the same x in every draw, so its outputs ``encoded`` (q's loc and scale,
    or the logits of a code) and their vector-Jacobian product ``pull_back`` with respect to
    the ``encoder.*`` parameters are built once (``torch.func.vjp``). Per draw, ``fn`` is
    differentiated under ``vmap(grad(...))`` with respect to ``encoded`` and the other
    parameters ``rest`` (swapped into ``vae`` by ``functional_call``); the cotangents at
    ``encoded`` of a whole chunk are then pulled back at once, which turns each encoder layer's
    per-draw weight gradients into one matrix product against the shared activations. Only
    valid when the prior does not use the encoder.
    """
    bound = Bound(vae, fn)
    m = len(encoded)

    def loss(*args: Any) -> torch.Tensor:
        *outs, params, noise = args
        return functional_call(bound, {f"vae.{k}": v for k, v in params.items()},
                               (*outs, noise))

    per_draw = vmap(grad(loss, argnums=tuple(range(m + 1))), in_dims=(*[None] * (m + 1), 0),
                    randomness="error")

    def draws(noise: torch.Tensor) -> dict[str, torch.Tensor]:
        *g_outs, g_rest = per_draw(*encoded, rest, noise)
        (g_enc,) = vmap(pull_back)(g_outs[0] if m == 1 else tuple(g_outs))
        return {**{f"encoder.{k}": v for k, v in g_enc.items()}, **g_rest}

    return draws
