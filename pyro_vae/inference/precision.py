"""Mixed precision: matrix products in bfloat16, everything else in float32.

Matrix products run in bfloat16 under autocast, and every linear or convolution layer hands
float32 back, so activations, distributions, log-densities and their sums stay in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

PRECISIONS = {"float32": None, "bf16": torch.bfloat16}

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
