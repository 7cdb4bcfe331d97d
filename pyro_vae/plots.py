"""Figures. matplotlib only; functions take results and save PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

if TYPE_CHECKING:
    from .train import TrainResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def image_grid(images: torch.Tensor, image_shape: Sequence[int], ncols: int,
               pad: int = 2) -> torch.Tensor:
    """Tile ``(N, C*H*W)`` images into one ``(rows*(H+pad), ncols*(W+pad))`` array (C = 1)."""
    c, h, w = image_shape
    images = images.detach().float().cpu().reshape(-1, c, h, w)[:, 0].clamp(0, 1)
    n = images.shape[0]
    rows = (n + ncols - 1) // ncols
    grid = torch.ones(rows * (h + pad) + pad, ncols * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def save_image_grid(path: str | Path, images: torch.Tensor, image_shape: Sequence[int],
                    ncols: int, title: str = "") -> None:
    plt = _pyplot()
    grid = image_grid(images, image_shape, ncols)
    fig, ax = plt.subplots(figsize=(grid.shape[1] / 40, grid.shape[0] / 40 + (0.4 if title else 0)))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_loss_curve(path: str | Path, metrics: list[dict[str, Any]], title: str = "") -> None:
    """Train, test (and validation) ELBO per image against epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [m["epoch"] for m in metrics]
    for key, label in (("train_elbo", "train"), ("test_elbo", "test"), ("val_elbo", "validation")):
        if any(key in m for m in metrics):
            ax.plot(epochs, [m.get(key, float("nan")) for m in metrics], marker="o", ms=3,
                    label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per image (nats, higher is better)")
    ax.set_title(title or "ELBO during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_figures(result: TrainResult, num_samples: int = 64, num_recon: int = 32,
                      seed: int = 0) -> dict[str, Path]:
    """loss_curve.png, samples.png and reconstructions.png in the run folder.

    Sampling uses a forked RNG seeded with ``seed`` so figures never disturb training's stream.
    """
    assert result.run_dir is not None
    run_dir, vae, shape = result.run_dir, result.vae, result.dataset.image_shape
    paths = {name: run_dir / f"{name}.png" for name in ("loss_curve", "samples", "reconstructions")}
    plot_loss_curve(paths["loss_curve"], result.metrics,
                    f"{result.config.data.dataset}: ELBO per image")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        samples = vae.sample(num_samples, mean=True)
    save_image_grid(paths["samples"], samples, shape, ncols=8,
                    title="decoder means of z ~ p(z)")
    test = result.dataset.test.images[:num_recon]
    recon = vae.reconstruct(test)
    # Alternate rows: 8 originals, then their 8 reconstructions.
    rows = torch.cat([torch.stack([test[i:i + 8], recon[i:i + 8]]) for i in range(0, len(test), 8)])
    save_image_grid(paths["reconstructions"], rows.reshape(-1, test.shape[-1]), shape, ncols=8,
                    title="test images (odd rows) and reconstructions (even rows)")
    return paths
