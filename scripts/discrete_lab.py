"""The discrete-code experiments of docs/discrete.md, on the embedded digits (offline).

1. Variance and bias of every discrete estimator at checkpoints of a reference run (10-bit
   code, exact-gradient oracle), through the library's variance lab.
2. The relaxed estimators' bias and variance against the temperature, at one checkpoint, for
   both ways of scoring a relaxed code (discrete log-probabilities, Concrete densities), and
   REBAR's, whose control variate is the relaxation.
3. Five epochs of training from the command line for every estimator, on a 32-bit Bernoulli
   code and on a categorical code (exact on codes small enough to enumerate), with the test
   ELBO of the discrete model before training and after every epoch, against steps and
   wall-clock.

Writes ``results.json`` and PNG figures to ``--out`` (and ``--figures``) and prints markdown
tables. Usage::

    python scripts/discrete_lab.py --out runs/discrete-lab --figures docs/figures/discrete
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

UNBIASED = ["score", "score-avg-baseline", "score-nn-baseline", "rloo", "vimco", "rebar"]
RELAXED = ["gumbel-softmax", "straight-through"]
#: Measured in the lab (the neural baseline exists only in a run trained with it).
MEASURED = ["score", "score-avg-baseline", "rloo", "vimco", "rebar", *RELAXED]


def lab_config(latent_dim: int, hidden: int, estimator: str):
    from pyro_vae import Config

    cfg = Config()
    cfg.model.latent = "bernoulli"
    cfg.model.latent_dim = latent_dim
    cfg.model.hidden_dims = [hidden]
    cfg.train.estimator = estimator
    cfg.train.progress = False
    return cfg.validate()


def variance_at_checkpoints(args, dataset, log) -> dict:
    from pyro_vae.lab.experiment import variance_experiment

    cfg = lab_config(args.bits, args.hidden, "rloo")
    cfg.train.num_particles = args.particles  # of the reference run and of every draw
    cfg.train.temperature = args.temperature
    return variance_experiment(cfg, dataset, MEASURED, checkpoints=args.checkpoints,
                               num_draws=args.draws, measure_batch=args.batch, log=log)


def temperature_sweep(args, dataset, log) -> list[dict]:
    from pyro_vae import VAE
    from pyro_vae.lab.experiment import fixed_minibatch, train_with_snapshots
    from pyro_vae.lab.variance import measure_gradient_variance

    cfg = lab_config(args.bits, args.hidden, "rloo")
    cfg.train.num_particles = args.particles
    step = args.checkpoints[len(args.checkpoints) // 2]
    _, snaps, _ = train_with_snapshots(cfg, dataset, [step])
    vae = VAE.from_config(cfg, dataset.image_shape)
    vae.load_state_dict(snaps[step]["vae"])
    x = fixed_minibatch(dataset, cfg, args.batch)
    rows = []
    for density in ("discrete", "concrete"):
        for t in args.temperatures:
            log(f"temperature {t} ({density})")
            # REBAR's control variate is the relaxation: unbiased at every temperature, its
            # variance depends on it
            names = [*RELAXED, "rebar"] if density == "discrete" else ["gumbel-softmax"]
            res = measure_gradient_variance(vae, x, ["score", *names], num_draws=args.sweep_draws,
                                            num_particles=1, temperature=t,
                                            relaxed_density=density)
            for name in names:
                enc = res["estimators"][name]["groups"]["encoder"]
                rows.append({"estimator": name, "density": density, "temperature": t,
                             "step": step, "relative_error": enc["relative_error"],
                             "relative_error_ci": enc["relative_error_ci"],
                             "relative_bias": enc["relative_bias"],
                             "noise_floor": enc["noise_floor"], "trace": enc["trace"],
                             "cosine": enc["cosine"]})
    return rows


def initial_elbo(argv: list[str]) -> float:
    """The test ELBO of the untrained model a ``train`` command starts from (same seed)."""
    import pyro

    from pyro_vae import VAE
    from pyro_vae.app.cli import add_config_flags, config_from_args
    from pyro_vae.data import load_dataset, prepare_observations
    from pyro_vae.metrics.elbo import elbo_per_image

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    cfg = config_from_args(parser.parse_args(argv))
    data = prepare_observations(load_dataset(cfg.data), cfg.data, seed=cfg.train.seed)
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.train.seed)
    vae = VAE.from_config(cfg, data.image_shape)
    with torch.no_grad():
        return float(elbo_per_image(vae, data.test.images, 1000))


def training_curves(args, log) -> dict:
    codes = {
        "bernoulli-32": ["--latent", "bernoulli", "--latent-dim", "32"],
        "bernoulli-10": ["--latent", "bernoulli", "--latent-dim", "10"],
        "categorical-8x10": ["--latent", "categorical", "--latent-dim", "8",
                             "--categories", "10"],
        "categorical-3x10": ["--latent", "categorical", "--latent-dim", "3",
                             "--categories", "10"],
    }
    plan = [(code, est) for code in ("bernoulli-32", "categorical-8x10")
            for est in UNBIASED + RELAXED]
    plan += [("bernoulli-10", "exact"), ("categorical-3x10", "exact")]
    out: dict = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for code, est in plan:
        run = Path(args.out) / "runs" / f"{code}-{est}"
        argv = ["--epochs", str(args.epochs), "--estimator", est, "--threads", "1",
                "--no-progress", "--seed", "0", *codes[code]]
        log(f"training {code} with {est}")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pyro_vae", "train", "--out", str(run),
                               "--overwrite", "--no-figures", *argv], capture_output=True,
                              text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            out[f"{code}/{est}"] = {"error": proc.stderr.strip().splitlines()[-1]}
            continue
        metrics = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
        out[f"{code}/{est}"] = {
            "code": code, "estimator": est, "command_seconds": wall,
            "initial_test_elbo": initial_elbo(argv),
            "epoch": [m["epoch"] for m in metrics], "step": [m["step"] for m in metrics],
            "seconds": [sum(x["seconds"] for x in metrics[:i + 1])
                        for i in range(len(metrics))],
            "test_elbo": [m["test_elbo"] for m in metrics],
            "objective": metrics[-1].get("objective", "elbo")}
    return out


# -- figures and tables ----------------------------------------------------------------------------
def figures(results: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if "variance" in results:
        paths += _variance_figure(results, folder, plt)
    if "temperature" in results:
        paths += _temperature_figure(results, folder, plt)
    if "curves" in results:
        paths += _curve_figures(results, folder, plt)
    return paths


def _variance_figure(results: dict, folder: Path, plt) -> list[Path]:  # noqa: ANN001
    paths = []
    exp = results["variance"]
    names = exp["estimators"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(names):
        color = f"C{i}"
        steps, err, lo, var = [], [], [], []
        for m in exp["measurements"]:
            enc = m["estimators"][name]["groups"]["encoder"]
            steps.append(m["step"])
            err.append(enc["relative_error"])
            lo.append(enc["relative_error_ci"][0])
            var.append(enc["trace"])
        axes[0].plot(steps, err, "-", color=color, label=name)
        # filled: the 95% interval excludes 0 (a bias is detected); hollow: consistent with 0
        for s_, e_, l_ in zip(steps, err, lo):
            axes[0].plot([s_], [e_], "o", color=color,
                         markerfacecolor=color if l_ > 0 else "white")
        axes[1].plot(steps, var, "o-", color=color, label=name)
    axes[0].set(yscale="log", xlabel="step of the reference run",
                ylabel="||mean g - exact|| / ||exact||",
                title="encoder: distance to the exact ELBO gradient\n(filled: 95% CI excludes 0)")
    axes[1].set(yscale="log", xlabel="step of the reference run", ylabel="tr Cov (encoder)",
                title="encoder gradient variance per draw")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "bias_variance_vs_step.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _temperature_figure(results: dict, folder: Path, plt) -> list[Path]:  # noqa: ANN001
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, density), style in ((("gumbel-softmax", "discrete"), "o-"),
                                   (("straight-through", "discrete"), "s-"),
                                   (("gumbel-softmax", "concrete"), "^--"),
                                   (("rebar", "discrete"), "d-.")):
        rows = [r for r in results["temperature"] if r["estimator"] == name
                and r["density"] == density]
        t = [r["temperature"] for r in rows]
        axes[0].plot(t, [r["relative_error"] for r in rows], style,
                     label=f"{name} ({density} density)")
        axes[0].plot(t, [r["noise_floor"] for r in rows], ":", color="grey")
        axes[1].plot(t, [r["trace"] for r in rows], style, label=f"{name} ({density})")
    axes[0].set(xscale="log", yscale="log", xlabel="temperature",
                ylabel="||mean g - exact|| / ||exact||",
                title="relaxation bias (dotted: noise floor)")
    axes[1].set(xscale="log", yscale="log", xlabel="temperature", ylabel="tr Cov (encoder)",
                title="relaxation variance")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(folder / "relaxation_vs_temperature.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def _curve_figures(results: dict, folder: Path, plt) -> list[Path]:  # noqa: ANN001
    paths = []
    for code in ("bernoulli-32", "categorical-8x10"):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for c in results["curves"].values():
            if "error" in c or c["code"] not in (code, code.replace("32", "10").replace(
                    "8x10", "3x10")):
                continue
            if c["code"] != code and c["estimator"] != "exact":
                continue
            label = c["estimator"] + ("" if c["code"] == code else f" ({c['code']})")
            steps = [0, *c["step"]]
            secs = [0.0, *c["seconds"]]
            elbo = [c["initial_test_elbo"], *c["test_elbo"]]
            axes[0].plot(steps, elbo, "o-", label=label)
            axes[1].plot(secs[1:], elbo[1:], "o-", label=label)
        start = min(c["initial_test_elbo"] for c in results["curves"].values()
                    if "error" not in c and c["code"] == code)
        for ax, xl in zip(axes, ("training step", "training seconds (1 thread, log scale)")):
            ax.set(xlabel=xl, ylabel="test ELBO of the discrete model (nats)",
                   title=f"{code}: 5 epochs (before training: {start:.0f} nats)")
            ax.set_ylim(-230, -185)
        axes[1].set_xscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(folder / f"training_{code}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def tables(results: dict) -> str:
    lines: list[str] = []
    if "variance" in results:
        lines += _variance_table(results)
    if "temperature" in results:
        lines += _temperature_table(results)
    if "curves" in results:
        lines += _curve_table(results)
    return "\n".join(lines)


def _variance_table(results: dict) -> list[str]:
    lines = []
    exp = results["variance"]
    lines.append("| step | estimator | encoder tr Cov | ratio to score | SNR | cosine | "
                 "rel. error [95% CI] | noise floor | rel. bias | ms/draw | "
                 "tr Cov x s/draw |")
    lines.append("|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for m in exp["measurements"]:
        for name, r in m["estimators"].items():
            e = r["groups"]["encoder"]
            lines.append(
                f"| {m['step']} | {name} | {e['trace']:.3g} | {e['ratio_to_reparam']:.3g} | "
                f"{e['snr']:.3g} | {e['cosine']:.3f} | {e['relative_error']:.3f} "
                f"[{e['relative_error_ci'][0]:.3f}, {e['relative_error_ci'][1]:.3f}] | "
                f"{e['noise_floor']:.3f} | {e['relative_bias']:.3f} | "
                f"{1e3 * r['seconds_per_draw']:.2f} | {e['cost_adjusted_variance']:.3g} |")
    lines.append("")
    return lines


def _temperature_table(results: dict) -> list[str]:
    lines = []
    lines.append("| estimator | density | temperature | rel. error [95% CI] | noise floor | "
                 "rel. bias | tr Cov |")
    lines.append("|---|---|---:|---|---:|---:|---:|")
    for r in results["temperature"]:
        lines.append(f"| {r['estimator']} | {r['density']} | {r['temperature']:g} | "
                     f"{r['relative_error']:.3f} [{r['relative_error_ci'][0]:.3f}, "
                     f"{r['relative_error_ci'][1]:.3f}] | {r['noise_floor']:.3f} | "
                     f"{r['relative_bias']:.3f} | {r['trace']:.3g} |")
    lines.append("")
    return lines


def _curve_table(results: dict) -> list[str]:
    lines = []
    lines.append("| code | estimator | test ELBO before | after epoch 1 | after epoch 5 | "
                 "training s | objective trained |")
    lines.append("|---|---|---:|---:|---:|---:|---|")
    for key, c in results["curves"].items():
        if "error" in c:
            lines.append(f"| {key} | failed: {c['error']} |")
            continue
        lines.append(f"| {c['code']} | {c['estimator']} | {c['initial_test_elbo']:.1f} | "
                     f"{c['test_elbo'][0]:.1f} | {c['test_elbo'][-1]:.1f} | "
                     f"{c['seconds'][-1]:.1f} | {c['objective']} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/discrete-lab")
    p.add_argument("--figures", default="docs/figures/discrete")
    p.add_argument("--bits", type=int, default=10)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--particles", type=int, default=2,
                   help="samples per image in every draw (rloo and vimco need 2)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--draws", type=int, default=500)
    p.add_argument("--sweep-draws", type=int, default=200)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[0, 200, 1000])
    p.add_argument("--temperatures", type=float, nargs="+",
                   default=[0.1, 0.2, 0.5, 1.0, 2.0, 5.0])
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--merge", nargs="*", default=[], metavar="RESULTS_JSON",
                   help="parts from other runs of this script, for the figures and tables")
    p.add_argument("--only", nargs="*", default=["variance", "temperature", "curves"],
                   choices=["variance", "temperature", "curves"],
                   help="parts to (re)run; the others are read from results.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from pyro_vae import load_dataset
    from pyro_vae.runtime import reuse_freed_memory

    reuse_freed_memory()  # as the CLI does: freed temporaries stay in the process
    from pyro_vae.config import DataConfig

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    dataset = load_dataset(DataConfig(dataset="mnist-5k"))
    timing = results.setdefault("timing", {})
    for part, fn in (("variance", lambda: variance_at_checkpoints(args, dataset, log)),
                     ("temperature", lambda: temperature_sweep(args, dataset, log)),
                     ("curves", lambda: training_curves(args, log))):
        if part not in args.only:
            continue
        start = time.perf_counter()
        results[part] = fn()
        timing[part] = time.perf_counter() - start
        results["args"] = copy.deepcopy(vars(args))
        path.write_text(json.dumps(results, indent=1))
    for other in args.merge:
        for key, value in json.loads(Path(other).read_text()).items():
            results.setdefault(key, value)
    for figure in figures(results, Path(args.figures)):
        print(f"wrote {figure}", file=sys.stderr)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
