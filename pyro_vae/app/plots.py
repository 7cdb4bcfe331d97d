"""Figures. matplotlib only; functions take results and save PNGs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..files import save_figure

if TYPE_CHECKING:
    from ..training.trainer import TrainResult


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
    save_figure(fig, path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_loss_curve(path: str | Path, metrics: list[dict[str, Any]], title: str = "") -> None:
    """Train, test (and validation) ELBO per image against epoch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [m["epoch"] for m in metrics]
    other = [m for m in metrics if m.get("objective", "elbo") != "elbo"]
    if other:
        # epochs on another objective (beta, warm-up, iwae): plot it under its own name
        ax.plot([m["epoch"] for m in other], [m["train_objective"] for m in other], marker="o",
                ms=3, ls="--", label=f"train objective ({other[0]['objective'].split(' (')[0]})")
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
    save_figure(fig, path, dpi=120)
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


# -- evaluation figures (issue 5): latent space, manifold, interpolations, anomaly scores ---------
def plot_latent_scatter(path: str | Path, points: torch.Tensor, labels: torch.Tensor,
                        title: str, xlabel: str, ylabel: str) -> None:
    """A 2-D scatter of test encodings (or their projection), one colour per label."""
    plt = _pyplot()
    points, labels = points.detach().cpu().float(), labels.detach().cpu()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    classes = sorted(int(c) for c in labels.unique())
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        sel = labels == c
        ax.scatter(points[sel, 0], points[sel, 1], s=4, alpha=0.6, color=cmap(i % cmap.N),
                   label=str(c), rasterized=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(title="label", markerscale=3, fontsize=8, loc="center left",
              bbox_to_anchor=(1.0, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def save_manifold(path: str | Path, images: torch.Tensor, coords: torch.Tensor,
                  image_shape: Sequence[int]) -> None:
    """The decoded n x n grid of a 2-D latent space with its axis values (z1 across, z2 up)."""
    plt = _pyplot()
    n = coords.shape[0]
    grid = image_grid(images, image_shape, ncols=n, pad=0)
    _, h, w = image_shape
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ticks = list(range(0, n, max(1, n // 5)))
    ax.set_xticks([t * w + w / 2 for t in ticks], [f"{float(coords[t, 0]):.2f}" for t in ticks])
    ax.set_yticks([t * h + h / 2 for t in ticks],
                  [f"{float(coords[n - 1 - t, 1]):.2f}" for t in ticks])
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title("decoder means over the 2-D latent space", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def save_interpolations(path: str | Path, paths: torch.Tensor, x_a: torch.Tensor,
                        x_b: torch.Tensor, image_shape: Sequence[int]) -> None:
    """One row per pair: test image a, the decoded latent path from a to b, test image b."""
    rows = torch.cat([x_a.unsqueeze(1).cpu(), paths.cpu(), x_b.unsqueeze(1).cpu()], 1)
    save_image_grid(path, rows.reshape(-1, rows.shape[-1]), image_shape, ncols=rows.shape[1],
                    title="left/right: test images; between: decoded straight line "
                          "between their codes")


def plot_score_histogram(path: str | Path, normal: torch.Tensor, anomalous: torch.Tensor,
                         title: str, xlabel: str = "anomaly score (nats)") -> None:
    """Overlaid histograms of the anomaly scores of in-distribution and held-out images."""
    plt = _pyplot()
    normal, anomalous = normal.detach().cpu().float(), anomalous.detach().cpu().float()
    both = torch.cat([normal, anomalous])
    lo, hi = torch.quantile(both, 0.005).item(), torch.quantile(both, 0.995).item()
    bins = torch.linspace(lo, hi, 51).tolist()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.hist(normal.clamp(lo, hi).numpy(), bins=bins, alpha=0.6, density=True,
            label=f"training classes ({len(normal)})")
    ax.hist(anomalous.clamp(lo, hi).numpy(), bins=bins, alpha=0.6, density=True,
            label=f"held-out classes ({len(anomalous)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# -- gradient-variance experiment (issue 3) -------------------------------------------------------
def _variance_series(experiment: dict[str, Any], group: str, key: str
                     ) -> dict[str, tuple[list[int], list[float], list[list[float]] | None]]:
    """Per estimator: steps, values and (if any) intervals of ``key`` for the first sweep point."""
    rows = experiment["measurements"]
    if not rows:
        return {}
    first = (rows[0]["latent_dim"], rows[0]["batch_size"])
    rows = sorted((m for m in rows if (m["latent_dim"], m["batch_size"]) == first),
                  key=lambda m: m["step"])
    series: dict[str, tuple[list[int], list[float], list[list[float]] | None]] = {}
    for m in rows:
        for name, res in m["estimators"].items():
            s = res["groups"][group]
            steps, values, cis = series.setdefault(name, ([], [], []))
            steps.append(m["step"])
            values.append(s[key])
            cis.append(s.get(key + "_ci") or s.get(
                {"ratio_to_reparam": "ratio_to_reparam_ci"}.get(key, ""), None))
    return series


def _plot_variance_stat(path: str | Path, experiment: dict[str, Any], key: str, ylabel: str,
                        title: str, groups: Sequence[str] = ("encoder", "decoder"),
                        log: bool = True, reference: float | None = None) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for name, (steps, values, cis) in _variance_series(experiment, group, key).items():
            xs = [max(s, 1) for s in steps]  # step 0 drawn at 1 on the log axis
            line, = ax.plot(xs, values, marker="o", ms=4, label=name)
            if cis and all(ci is not None for ci in cis):
                ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis],
                                color=line.get_color(), alpha=0.2)
        if reference is not None:
            ax.axhline(reference, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("training step (0 drawn at 1)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{group}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_training_curves(path: str | Path, curves: dict[str, dict[str, list]]) -> None:
    """Training ELBO of each estimator against steps and against wall-clock seconds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        axes[0].plot(c["step"], c["elbo"], label=name)
        axes[1].plot(c["seconds"], c["elbo"], label=name)
    for ax, xlabel in zip(axes, ("training step", "training wall-clock (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training ELBO per image (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    lows = [min(c["elbo"]) for c in curves.values() if c["elbo"]]
    highs = [max(c["elbo"]) for c in curves.values() if c["elbo"]]
    if lows:  # the first steps of a score-function run are far below; keep the rest readable
        top = max(highs)
        bottom = max(min(lows), top - 4 * (top - sorted(c["elbo"][-1] for c in curves.values()
                                                        if c["elbo"])[0]) - 50)
        for ax in axes:
            ax.set_ylim(bottom, top + 0.05 * (top - bottom))
    fig.suptitle("ELBO during training, per estimator")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def write_variance_figures(out_dir: str | Path, experiment: dict[str, Any]) -> dict[str, Path]:
    """variance_vs_step.png, snr_vs_step.png, ratio_vs_step.png, elbo_curves.png in out_dir."""
    out_dir = Path(out_dir)
    paths = {name: out_dir / f"{name}.png"
             for name in ("variance_vs_step", "snr_vs_step", "ratio_vs_step")}
    _plot_variance_stat(paths["variance_vs_step"], experiment, "trace",
                        "trace of gradient covariance", "Gradient variance (95% bootstrap band)")
    _plot_variance_stat(paths["snr_vs_step"], experiment, "snr", "mean |mean| / std",
                        "Gradient signal-to-noise ratio")
    # the ratio's reference: reparam for a continuous code, score for a discrete one
    ref = next((m.get("ratio_reference") for m in experiment["measurements"]), None) or "reparam"
    _plot_variance_stat(paths["ratio_vs_step"], experiment, "ratio_to_reparam",
                        f"trace ratio to {ref}", f"Variance relative to {ref} (95% band)",
                        reference=1.0)
    if experiment.get("curves"):
        paths["elbo_curves"] = out_dir / "elbo_curves.png"
        plot_training_curves(paths["elbo_curves"], experiment["curves"])
    return paths
