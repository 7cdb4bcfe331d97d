"""Signal-to-noise ratio of IWAE and DReG gradients against the number of particles K.

    python scripts/iwae_dreg_snr.py [--out docs/figures] [--epochs 5] [--draws 200]

Trains a small Gaussian VAE on the embedded digits (``--dataset mnist-5k``, offline) with the
``--train-estimator`` for a few epochs, takes one fixed minibatch of training images and, for
each K in ``--ks``, draws R independent per-image gradients of the importance-weighted bound
with ``iwae`` and with ``dreg`` (the variance lab's vectorized draws, each path held to Pyro's
``loss_and_grads`` by its probe). Per parameter, SNR = |mean| / std over the R draws (Rainforth
et al. 2018); the script reports the median (and mean) over the encoder's and over the
decoder's parameters and fits the slope of log SNR against log K.

At K = 1 the IWAE bound is the ELBO and DReG's gradient is "sticking the landing" (every
normalised weight is 1), so K = 1 is measured with the registry's ``reparam`` and ``stl``.

Theory (Rainforth et al. 2018; Tucker et al. 2019): IWAE's encoder SNR falls like 1/sqrt(K)
(slope -0.5), its decoder SNR grows like sqrt(K) (+0.5); DReG's encoder SNR does not fall with
K. An R-draw estimate of |mean| / std cannot go below about sqrt(2 / (pi R)) (the mean of R
draws of pure noise), which the figure marks.

Writes ``iwae_dreg_snr.json`` and ``iwae_dreg_snr.png`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from pyro_vae import Config, fit, load_dataset
from pyro_vae.lab.experiment import fixed_minibatch
from pyro_vae.lab.variance import gradient_draws, measured_parameters

#: The estimator measured at each K, per curve (K = 1: the bound is the ELBO; see above).
CURVES = {"iwae": {1: "reparam"}, "dreg": {1: "stl"}}


def snr_of_draws(vae, name: str, x: torch.Tensor, k: int, num_draws: int,
                 max_samples: int = 16384) -> dict[str, dict[str, float]]:
    """Per-group summaries of the per-parameter SNR |mean| / std over ``num_draws`` draws."""
    chunk = max(1, min(50, max_samples // (k * x.shape[0])))
    total: dict[str, torch.Tensor] = {}
    total_sq: dict[str, torch.Tensor] = {}
    paths: list = []
    start = time.perf_counter()
    for draws in gradient_draws(vae, name, x, num_draws, num_particles=k, chunk_size=chunk,
                                paths=paths):
        for param, g in draws.items():
            g = g.detach().double().reshape(g.shape[0], -1)
            total[param] = total.get(param, 0) + g.sum(0)
            total_sq[param] = total_sq.get(param, 0) + (g * g).sum(0)
    seconds = time.perf_counter() - start
    out: dict[str, dict[str, float]] = {}
    for group in ("encoder", "decoder"):
        names = [p for p in total if p.split(".", 1)[0] == group]
        mean = torch.cat([total[p] / num_draws for p in names])
        var = torch.cat([(total_sq[p] - num_draws * (total[p] / num_draws) ** 2)
                         / (num_draws - 1) for p in names]).clamp_min(0)
        std = var.sqrt()
        keep = std > 1e-12 * std.max()  # parameters with no gradient at all are left out
        snr = mean.abs()[keep] / std[keep]
        # |mean of R draws| overestimates |E g| by the draws' own noise: E[mean^2] =
        # (E g)^2 + var / R. Subtracting var / R removes that bias from the squared signal.
        signal = (mean[keep] ** 2 - var[keep] / num_draws).clamp_min(0).sqrt()
        out[group] = {"median_snr": snr.median().item(), "mean_snr": snr.mean().item(),
                      "median_snr_corrected": (signal / std[keep]).median().item(),
                      "num_params": int(keep.sum())}
    out["path"] = {"estimator": name, "path": paths[0].path, "seconds": seconds}
    return out


def slope(ks: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares slope of log(values) on log(ks), and its standard error."""
    x = torch.tensor(ks, dtype=torch.float64).log()
    y = torch.tensor(values, dtype=torch.float64).log()
    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    resid = y - y.mean() - b * xc
    se = math.sqrt(float((resid * resid).sum()) / max(len(ks) - 2, 1) / float((xc * xc).sum()))
    return b, se


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["ks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    # IWAE as large hollow squares: on the decoder the two curves coincide (same gradient)
    styles = {"iwae": dict(color="tab:red", marker="s", markersize=9, markerfacecolor="none"),
              "dreg": dict(color="tab:blue", marker="o", markersize=4)}
    for ax, group in zip(axes, ("encoder", "decoder"), strict=True):
        for curve, style in styles.items():
            values = [result["snr"][curve][str(k)][group]["median_snr"] for k in ks]
            fit_ = result["slopes"][curve][group]
            ax.plot(ks, values, "-", **style,
                    label=f"{curve} (slope {fit_['slope']:+.2f} ± {fit_['stderr']:.2f})")
            corrected = [result["snr"][curve][str(k)][group]["median_snr_corrected"] for k in ks]
            ax.plot(ks, corrected, ":", color=style["color"], alpha=0.6,
                    label=f"{curve}, signal corrected for noise in the mean")
        for power, style in ((-0.5, ":"), (0.5, "--")):
            anchor = result["snr"]["iwae"][str(ks[0])][group]["median_snr"]
            ax.plot(ks, [anchor * (k / ks[0]) ** power for k in ks], style, color="grey",
                    label=f"K^{power:+.1f} (from IWAE at K={ks[0]})")
        ax.axhline(result["noise_floor"], color="black", lw=0.8, alpha=0.5,
                   label=f"noise floor sqrt(2/(pi R)), R={result['num_draws']}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (particles)")
        ax.set_ylabel(f"median SNR over {group} parameters")
        ax.set_title(f"{group} gradient")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"SNR |mean|/std of the per-image gradient of the IWAE bound "
                 f"({result['network']}, {result['epochs']} epochs, batch {result['batch']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[200])
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-estimator", default="dreg")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--draws", type=int, default=200, help="R, gradient draws per (K, estimator)")
    p.add_argument("--batch", type=int, default=16, help="images in the fixed minibatch")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figure", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cfg = Config()
    cfg.data.dataset = args.dataset
    cfg.model.hidden_dims = list(args.hidden_dims)
    cfg.model.latent_dim = args.latent_dim
    cfg.train.estimator = args.train_estimator
    cfg.train.epochs = args.epochs
    cfg.train.seed = args.seed
    cfg.train.progress = False
    cfg.validate()
    dataset = load_dataset(cfg.data)
    if args.epochs > 0:
        result = fit(cfg, dataset=dataset)
        vae = result.vae
        last = result.metrics[-1]
        print(f"trained {args.epochs} epochs with {args.train_estimator}: train "
              f"{last['objective']} {last['train_objective']:.2f}, test ELBO "
              f"{last['test_elbo']:.2f} ({time.perf_counter() - start:.0f} s)")
    else:
        from pyro_vae import VAE

        torch.manual_seed(args.seed)
        vae = VAE.from_config(cfg, dataset.image_shape)
    train_seconds = time.perf_counter() - start
    vae.eval()
    x = fixed_minibatch(dataset, cfg, args.batch, args.seed)
    num_params = {g: sum(v.numel() for k, v in measured_parameters(vae).items()
                         if k.startswith(g + ".")) for g in ("encoder", "decoder")}
    snr: dict[str, dict[str, dict]] = {curve: {} for curve in CURVES}
    print(f"{'K':>3} {'curve':>5} {'estimator':>9} {'path':>8} {'enc median':>10} "
          f"{'enc mean':>9} {'enc corr':>9} {'dec median':>10} {'dec mean':>9} {'s':>5}")
    for k in args.ks:
        for curve, special in CURVES.items():
            name = special.get(k, curve)
            torch.manual_seed(args.seed + 1000 * k)
            s = snr_of_draws(vae, name, x, k, args.draws)
            snr[curve][str(k)] = s
            print(f"{k:>3} {curve:>5} {name:>9} {s['path']['path']:>8} "
                  f"{s['encoder']['median_snr']:>10.4f} {s['encoder']['mean_snr']:>9.4f} "
                  f"{s['encoder']['median_snr_corrected']:>9.4f} "
                  f"{s['decoder']['median_snr']:>10.4f} {s['decoder']['mean_snr']:>9.4f} "
                  f"{s['path']['seconds']:>5.1f}", flush=True)
    slopes: dict[str, dict[str, dict[str, float]]] = {}
    for curve in CURVES:
        slopes[curve] = {}
        for group in ("encoder", "decoder"):
            for stat in ("median_snr", "mean_snr", "median_snr_corrected"):
                b, se = slope(args.ks, [snr[curve][str(k)][group][stat] for k in args.ks])
                key = group if stat == "median_snr" else f"{group}_{stat}"
                slopes[curve][key] = {"slope": b, "stderr": se}
    out = {
        "ks": args.ks, "num_draws": args.draws, "batch": args.batch, "epochs": args.epochs,
        "train_estimator": args.train_estimator, "dataset": args.dataset, "seed": args.seed,
        "network": f"784-{'-'.join(map(str, args.hidden_dims))}-{args.latent_dim}",
        "num_params": num_params, "noise_floor": math.sqrt(2 / (math.pi * args.draws)),
        "k1_estimators": {c: s[1] for c, s in CURVES.items()},
        "theory": {"iwae": {"encoder": -0.5, "decoder": 0.5},
                   "dreg": {"encoder": "no decay (>= 0)", "decoder": 0.5}},
        "snr": snr, "slopes": slopes,
        "train_seconds": train_seconds, "total_seconds": time.perf_counter() - start,
    }
    print("\nslope of log(median SNR) vs log K (least squares, +- standard error):")
    for curve in CURVES:
        for group in ("encoder", "decoder"):
            fit_ = slopes[curve][group]
            mean_fit = slopes[curve][f"{group}_mean_snr"]
            corrected = slopes[curve][f"{group}_median_snr_corrected"]
            print(f"  {curve:>5} {group:>8}: {fit_['slope']:+.3f} +- {fit_['stderr']:.3f} "
                  f"(mean SNR: {mean_fit['slope']:+.3f} +- {mean_fit['stderr']:.3f}; "
                  f"noise-corrected median: {corrected['slope']:+.3f} +- "
                  f"{corrected['stderr']:.3f}); theory {out['theory'][curve][group]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "iwae_dreg_snr.json").write_text(json.dumps(out, indent=1) + "\n")
    if not args.no_figure:
        plot(out, args.out / "iwae_dreg_snr.png")
    print(f"wrote {args.out / 'iwae_dreg_snr.json'}"
          + ("" if args.no_figure else f" and {args.out / 'iwae_dreg_snr.png'}")
          + f" ({out['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
