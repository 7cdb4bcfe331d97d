"""Argument checks shared by the measurements (named errors, never a traceback)."""

from __future__ import annotations

import torch

from ..errors import ConfigError, DataError


def check_positive(name: str, value: int) -> None:
    """ConfigError unless ``value`` is a positive int."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_observations_shape(x: torch.Tensor) -> None:
    """DataError unless ``x`` is ``(N, num_pixels)`` with N > 0."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise DataError(f"expected observations of shape (N, num_pixels) with N > 0, "
                        f"got {tuple(x.shape)}")
