"""Building blocks shared by the networks, likelihoods, guide families and priors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Smallest standard deviation of q(z|x) and of a learned Gaussian likelihood. softplus(.) + this
#: is positive and cannot overflow the way exp(.) of a large pre-activation does.
MIN_SCALE = 1e-4

ACTIVATIONS = {"softplus": nn.Softplus, "relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh,
               "silu": nn.SiLU, "leaky-relu": nn.LeakyReLU}


def positive_scale(raw: torch.Tensor) -> torch.Tensor:
    """Map an unconstrained tensor to a standard deviation > 0 without overflow."""
    return F.softplus(raw) + MIN_SCALE


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)
