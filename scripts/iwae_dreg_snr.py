"""Signal-to-noise ratio of IWAE and DReG gradients against the number of particles K.

    python scripts/iwae_dreg_snr.py [--out docs/figures] [--epochs 5] [--draws 200]

Two settings, each measured the same way. For each K in ``--ks`` and each of ``iwae`` and
``dreg``, R independent per-image gradients of the importance-weighted bound are drawn on one
fixed minibatch (the variance lab's vectorized draws, each path held to Pyro's
``loss_and_grads`` by its probe). Per parameter, SNR = |mean| / std over the R draws
(Rainforth et al. 2018); the script reports the median (and mean) over the encoder's and over
the decoder's parameters and fits the slope of log SNR against log K.

* ``control``: a linear-Gaussian model like the one Rainforth et al. (2018, section 4) use:
  z ~ N(mu, I), x | z ~ N(z, I) in ``--control-dim`` dimensions, a linear Gaussian encoder set
  to the exact posterior N((mu + x) / 2, I / 2) and then perturbed (each parameter by N(0,
  0.01^2)). The importance weights are then nearly equal, which is the regime of the theory.
* ``digits``: a small Gaussian VAE trained on the embedded digits (``--dataset mnist-5k``,
  offline) with ``--train-estimator`` for ``--epochs`` epochs.

At K = 1 the IWAE bound is the ELBO and DReG's gradient is "sticking the landing" (every
normalised weight is 1), so K = 1 is measured with the registry's ``reparam`` and ``stl``.
The effective sample size of the weights, 1 / sum_k w~_k^2 (mean over images and 20
repetitions), is reported for each K: the theory's rates are for K large against the spread of
the weights, which that number shows.

Theory (Rainforth et al. 2018; Tucker et al. 2019): IWAE's encoder SNR falls like 1/sqrt(K)
(slope -0.5), its decoder SNR grows like sqrt(K) (+0.5); DReG's encoder SNR does not fall with
K. An R-draw estimate of |mean| / std cannot go below about sqrt(2 / (pi R)) (the mean of R
draws of pure noise), which the figure marks.

Writes ``iwae_dreg_snr.json`` and ``iwae_dreg_snr.png`` to ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae import ESTIMATORS, VAE, Config, fit, load_dataset
from pyro_vae.config import ModelConfig
from pyro_vae.inference.program import log_weights, trace_program
from pyro_vae.lab.experiment import fixed_minibatch
from pyro_vae.lab.variance import gradient_draws, measured_parameters
from pyro_vae.models.priors import StandardNormalPrior

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


@torch.no_grad()
def effective_sample_size(vae, x: torch.Tensor, k: int, repeats: int = 20) -> float:
    """Mean over images and repetitions of 1 / sum_k w~_k^2 for K particles."""
    total = 0.0
    for _ in range(repeats):
        w = torch.softmax(log_weights(trace_program(vae, x, k), x.shape[0]), dim=0)
        total += float((1 / (w * w).sum(0)).mean())
    return total / repeats


def measure(vae, x: torch.Tensor, ks: list[int], num_draws: int, seed: int) -> dict:
    """SNR per curve and K, the weights' effective sample size per K, and the fitted slopes."""
    snr: dict[str, dict[str, dict]] = {curve: {} for curve in CURVES}
    ess: dict[str, float] = {}
    print(f"{'K':>3} {'ESS':>6} {'curve':>5} {'estimator':>9} {'path':>5} {'enc median':>10} "
          f"{'enc mean':>9} {'enc corr':>9} {'dec median':>10} {'dec mean':>9} {'s':>5}")
    for k in ks:
        torch.manual_seed(seed + 1000 * k + 1)
        ess[str(k)] = effective_sample_size(vae, x, k)
        for curve, special in CURVES.items():
            name = special.get(k, curve)
            torch.manual_seed(seed + 1000 * k)
            r = snr_of_draws(vae, name, x, k, num_draws)
            snr[curve][str(k)] = r
            print(f"{k:>3} {ess[str(k)]:>6.2f} {curve:>5} {name:>9} {r['path']['path']:>5} "
                  f"{r['encoder']['median_snr']:>10.4f} {r['encoder']['mean_snr']:>9.4f} "
                  f"{r['encoder']['median_snr_corrected']:>9.4f} "
                  f"{r['decoder']['median_snr']:>10.4f} {r['decoder']['mean_snr']:>9.4f} "
                  f"{r['path']['seconds']:>5.1f}", flush=True)
    slopes: dict[str, dict[str, dict[str, float]]] = {}
    for curve in CURVES:
        slopes[curve] = {}
        for group in ("encoder", "decoder"):
            for stat in ("median_snr", "mean_snr", "median_snr_corrected"):
                b, se = slope(ks, [snr[curve][str(k)][group][stat] for k in ks])
                key = group if stat == "median_snr" else f"{group}_{stat}"
                slopes[curve][key] = {"slope": b, "stderr": se}
    print("slope of log(median SNR) vs log K (least squares, +- standard error):")
    for curve in CURVES:
        for group in ("encoder", "decoder"):
            fit_ = slopes[curve][group]
            mean_fit = slopes[curve][f"{group}_mean_snr"]
            corrected = slopes[curve][f"{group}_median_snr_corrected"]
            print(f"  {curve:>5} {group:>8}: {fit_['slope']:+.3f} +- {fit_['stderr']:.3f} "
                  f"(mean SNR: {mean_fit['slope']:+.3f} +- {mean_fit['stderr']:.3f}; "
                  f"noise-corrected median: {corrected['slope']:+.3f} +- "
                  f"{corrected['stderr']:.3f}); theory {THEORY[curve][group]}")
    num_params = {g: sum(v.numel() for n, v in measured_parameters(vae).items()
                         if n.startswith(g + ".")) for g in ("encoder", "decoder")}
    return {"snr": snr, "ess": ess, "slopes": slopes, "num_params": num_params,
            "batch": int(x.shape[0])}


THEORY = {"iwae": {"encoder": -0.5, "decoder": 0.5},
          "dreg": {"encoder": "no decay (>= 0)", "decoder": 0.5}}


# -- the linear-Gaussian control (after Rainforth et al. 2018, section 4) -------------------------
class LinearGaussianEncoder(nn.Module):
    """q(z|x) = N(A x + c, diag(softplus(raw)^2))."""

    def __init__(self, dim: int):
        super().__init__()
        self.loc = nn.Linear(dim, dim)
        self.raw_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        scale = nn.functional.softplus(self.raw_scale).expand(x.shape[:-1] + (-1,))
        return dist.Normal(self.loc(x), scale).to_event(1)


class ShiftedNormal(nn.Module):
    """p(x|z) = N(z + shift, I). With p(z) = N(0, I) this is z ~ N(mu, I), x | z ~ N(z, I) with
    mu = shift, written with a centred latent so that the prior stays the package's N(0, I)."""

    def __init__(self, dim: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        return dist.Normal(z + self.shift, 1.0).to_event(1)


def control_setup(dim: int, batch: int, seed: int) -> tuple[VAE, torch.Tensor]:
    """A linear-Gaussian VAE with its encoder near the exact posterior, and data from it."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(dim, generator=g)
    x = torch.randn(batch, dim, generator=g) * math.sqrt(2.0) + shift  # x = z + shift + noise
    encoder, decoder = LinearGaussianEncoder(dim), ShiftedNormal(dim)
    with torch.no_grad():
        # exact posterior: z | x ~ N((x - shift) / 2, I / 2); softplus(raw) = sqrt(1/2)
        decoder.shift.copy_(shift)
        encoder.loc.weight.copy_(torch.eye(dim) / 2)
        encoder.loc.bias.copy_(-shift / 2)
        encoder.raw_scale.fill_(math.log(math.expm1(math.sqrt(0.5))))
        for p in (*encoder.parameters(), *decoder.parameters()):
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    prior = StandardNormalPrior(ModelConfig(latent_dim=dim))
    return VAE(encoder, decoder, prior, ESTIMATORS["reparam"]), x


# -- figure ---------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = result["ks"]
    settings = [s for s in ("control", "digits") if s in result]
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4.2 * len(settings)), squeeze=False)
    # IWAE as large hollow squares: on the decoder the two curves coincide (same gradient)
    styles = {"iwae": dict(color="tab:red", marker="s", markersize=9, markerfacecolor="none"),
              "dreg": dict(color="tab:blue", marker="o", markersize=4)}
    for row, setting in zip(axes, settings, strict=True):
        res = result[setting]
        for ax, group in zip(row, ("encoder", "decoder"), strict=True):
            for curve, style in styles.items():
                values = [res["snr"][curve][str(k)][group]["median_snr"] for k in ks]
                fit_ = res["slopes"][curve][group]
                ax.plot(ks, values, "-", **style,
                        label=f"{curve}: slope {fit_['slope']:+.2f} ± {fit_['stderr']:.2f}")
                corrected = [res["snr"][curve][str(k)][group]["median_snr_corrected"]
                             for k in ks]
                ax.plot(ks, corrected, ":", color=style["color"], alpha=0.6,
                        label=f"{curve}, mean's own noise removed")
            for power, line in ((-0.5, (0, (1, 2))), (0.5, "--")):
                anchor = res["snr"]["iwae"][str(ks[0])][group]["median_snr"]
                ax.plot(ks, [anchor * (k / ks[0]) ** power for k in ks], linestyle=line,
                        color="grey", label=f"K^{power:+.1f} through IWAE at K={ks[0]}")
            ax.axhline(res["noise_floor"], color="black", lw=0.8, alpha=0.5,
                       label=f"noise floor sqrt(2/(pi R)), R={res['num_draws']}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("K (particles)")
            ax.set_ylabel(f"median SNR over {group} parameters")
            ess = res["ess"][str(ks[-1])]
            ax.set_title(f"{setting} ({res['network']}): {group} gradient\n"
                         f"effective sample size at K={ks[-1]}: {ess:.1f}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6.5)
    fig.suptitle("SNR = |mean| / std over R draws of the per-image gradient of the IWAE bound "
                 "(median over parameters)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[200])
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--epochs", type=int, default=5, help="training epochs (0: untrained)")
    p.add_argument("--train-estimator", default="dreg")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--draws", type=int, default=200, help="R, gradient draws per (K, estimator)")
    p.add_argument("--batch", type=int, default=16, help="images in the fixed minibatch")
    p.add_argument("--control-dim", type=int, default=20,
                   help="dimension of the linear-Gaussian control (0: skip it)")
    p.add_argument("--control-draws", type=int, default=5000,
                   help="R for the control (cheap; its encoder SNR is small, so it needs more)")
    p.add_argument("--no-digits", action="store_true", help="measure the control only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figure", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out: dict = {"ks": args.ks, "seed": args.seed,
                 "k1_estimators": {c: s[1] for c, s in CURVES.items()}, "theory": THEORY}
    if args.control_dim > 0:
        print(f"control: linear-Gaussian model, {args.control_dim} dimensions, encoder near the "
              f"exact posterior")
        vae, x = control_setup(args.control_dim, args.batch, args.seed)
        out["control"] = {**measure(vae, x, args.ks, args.control_draws, args.seed),
                          "network": f"linear-Gaussian, d={args.control_dim}",
                          "num_draws": args.control_draws,
                          "noise_floor": math.sqrt(2 / (math.pi * args.control_draws))}
    if not args.no_digits:
        cfg = Config()
        cfg.data.dataset = args.dataset
        cfg.model.hidden_dims = list(args.hidden_dims)
        cfg.model.latent_dim = args.latent_dim
        cfg.train.estimator = args.train_estimator
        cfg.train.epochs = max(args.epochs, 1)  # --epochs 0: measure the untrained network
        cfg.train.seed = args.seed
        cfg.train.progress = False
        cfg.validate()
        dataset = load_dataset(cfg.data)
        train_start = time.perf_counter()
        if args.epochs > 0:
            result = fit(cfg, dataset=dataset)
            vae = result.vae
            last = result.metrics[-1]
            print(f"\ndigits: trained {args.epochs} epochs with {args.train_estimator}: train "
                  f"{last['objective']} {last['train_objective']:.2f}, test ELBO "
                  f"{last['test_elbo']:.2f} ({time.perf_counter() - train_start:.0f} s)")
        else:
            torch.manual_seed(args.seed)
            vae = VAE.from_config(cfg, dataset.image_shape)
            print("\ndigits: untrained network")
        train_seconds = time.perf_counter() - train_start
        vae.eval()
        x = fixed_minibatch(dataset, cfg, args.batch, args.seed)
        out["digits"] = {**measure(vae, x, args.ks, args.draws, args.seed),
                         "network": f"784-{'-'.join(map(str, args.hidden_dims))}-"
                                    f"{args.latent_dim}",
                         "dataset": args.dataset, "epochs": args.epochs,
                         "train_estimator": args.train_estimator,
                         "train_seconds": train_seconds, "num_draws": args.draws,
                         "noise_floor": math.sqrt(2 / (math.pi * args.draws))}
    out["total_seconds"] = time.perf_counter() - start
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
