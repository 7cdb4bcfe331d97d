"""Mixed precision: matrix products in bfloat16, everything else in float32.

Matrix products run in bfloat16 under autocast, and every linear or convolution layer hands
float32 back, so activations, distributions, log-densities and their sums stay in float32.
"""

from __future__ import annotations

import contextlib
import time
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


#: Per device: the precision :func:`fast_product_precision` chose, and why.
_FAST: dict[str, tuple[str, str]] = {}


def _product_seconds(dtype: torch.dtype, device: torch.device, size: int) -> float:
    """Seconds of one ``size``-cubed matrix product in ``dtype`` on ``device`` (its inputs made
    beforehand, autocast off)."""
    with torch.autocast(device.type, enabled=False):
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start


def fast_product_precision(device: torch.device | str = "cpu") -> tuple[str, str]:
    """``("bf16" | "float32", why)``: bf16 where its matrix products run faster than float32's
    on ``device``, float32 otherwise (measured once per process and device: a fraction of a
    second). A CPU without native bf16 products (AVX2 only: no AVX512-BF16, no AMX) runs
    them tens of times slower than float32, so bf16 must be chosen by measuring, not assumed."""
    device = torch.device(device)
    key = str(device)
    if key not in _FAST:
        # large enough on a GPU that launches and syncs do not hide the arithmetic; on a CPU
        # small enough that a bf16 product without hardware support takes tens of ms. The two
        # dtypes alternate and each keeps its fastest of several products (after one warm-up
        # each), so a moment of contention on a shared machine cannot decide
        size = 2048 if device.type == "cuda" else 256
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        for trial in range(6):
            for dtype in times:
                seconds = _product_seconds(dtype, device, size)
                if trial:
                    times[dtype].append(seconds)
        f32, bf16 = min(times[torch.float32]), min(times[torch.bfloat16])
        rate = lambda s: 2 * size**3 / max(s, 1e-12) / 1e9  # noqa: E731 - GFLOP/s
        choice = "bf16" if bf16 < 0.8 * f32 else "float32"
        _FAST[key] = (choice, f"bf16 products {rate(bf16):.0f} GFLOP/s against float32's "
                              f"{rate(f32):.0f} on this {device.type}")
    return _FAST[key]
