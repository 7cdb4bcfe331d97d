"""Train every registered prior with the same networks, data and budget; compare them on test data.

For each prior in ``pyro_vae.PRIORS`` (or those named with ``--priors``) this trains a VAE with
identical settings apart from the prior, then measures on the test split:

* the test ELBO (Monte Carlo, ``--num-particles`` samples of z per image),
* the importance-sampled log-likelihood log p(x) ~ log (1/K) sum_k p(x, z_k) / q(z_k | x) with
  z_k ~ q(z | x) (Burda, Grosse & Salakhutdinov 2016, eq. 8 with K = ``--num-samples``),
* the number of active latent units: dimensions u with Cov_x(E_q[z_u | x]) > 0.01 (Burda et al.
  2016, section 5.2),

and writes a Markdown table (``--out``), a JSON file beside it, and a grid of decoder means of
z ~ p(z) per prior (``--figures``). Existing outputs are never replaced without ``--overwrite``.

The importance-sampled estimate and active units come from ``pyro_vae.evaluate`` when it
provides ``log_likelihood`` and ``active_units``; otherwise from the small versions below.

Example (the run reported in docs/priors.md)::

    python scripts/compare_priors.py --epochs 100
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from pyro_vae import PRIORS, Config, Dataset, load_dataset
from pyro_vae import metrics as pv_evaluate
from pyro_vae.app.plots import save_image_grid
from pyro_vae.config import DataConfig
from pyro_vae.errors import PyroVAEError
from pyro_vae.training.trainer import fit

ROOT = Path(__file__).resolve().parents[1]


# -- one prior ---------------------------------------------------------------------------------
def make_config(args: argparse.Namespace, prior: str) -> Config:
    cfg = Config()
    cfg.data.dataset = args.dataset
    cfg.data.binarize = "dynamic"
    cfg.data.train_limit = args.train_limit
    cfg.model.latent_dim = args.latent_dim
    cfg.model.hidden_dims = list(args.hidden_dims)
    cfg.model.prior = prior
    cfg.model.prior_components = args.components
    cfg.model.prior_flow_depth = args.flow_depth
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = args.batch_size
    cfg.train.lr = args.lr
    cfg.train.seed = args.seed
    cfg.train.device = "cpu"
    cfg.train.progress = False
    return cfg.validate()


def run_prior(prior: str, args: argparse.Namespace, dataset: Dataset,
              figures: Path) -> dict:
    cfg = make_config(args, prior)
    start = time.perf_counter()
    result = fit(cfg, dataset=dataset)
    seconds = time.perf_counter() - start
    vae = result.vae.eval()
    test = result.dataset.test.images[:args.test_limit or None]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed + 1)
        elbo = pv_evaluate.elbo_per_image(vae, test, batch_size=100,
                                          num_particles=args.num_particles)
        ll = pv_evaluate.log_likelihood(vae, test, args.num_samples, 8)
        ll_source = "pyro_vae.metrics.log_likelihood"
        units = int(pv_evaluate.active_units(vae, test))
        samples = vae.sample(64, mean=True)
    path = figures / f"prior_samples_{prior}.png"
    save_image_grid(path, samples, result.dataset.image_shape, ncols=8,
                    title=f"prior {prior}: decoder means of z ~ p(z)")
    return {"prior": prior, "test_elbo": elbo, "test_log_likelihood": float(ll.mean()),
            "active_units": units, "latent_dim": cfg.model.latent_dim,
            "prior_parameters": sum(p.numel() for p in vae.prior.parameters()),
            "train_seconds": seconds, "final_train_elbo": result.metrics[-1]["train_elbo"],
            "log_likelihood_source": ll_source, "samples_png": str(path)}


# -- report ------------------------------------------------------------------------------------
def markdown_table(rows: list[dict], args: argparse.Namespace, command: str,
                   num_train: int, num_test: int) -> str:
    base = next((r for r in rows if r["prior"] == "standard-normal"), None)
    lines = [
        "# Prior comparison: measured results",
        "",
        "Written by `scripts/compare_priors.py`; do not edit by hand. Command:",
        "",
        f"    {command}",
        "",
        f"Data: {args.dataset}, {num_train} training images (dynamic binarization), "
        f"{num_test} test images (one fixed binarization). Same MLP for every prior: "
        f"784-{'-'.join(map(str, args.hidden_dims))}-{args.latent_dim} encoder, mirrored "
        f"decoder, Bernoulli likelihood; Adam lr {args.lr}, batch {args.batch_size}, "
        f"{args.epochs} epochs, seed {args.seed}; mixture components and VampPrior "
        f"pseudo-inputs K = {args.components}; flow depth {args.flow_depth}.",
        "",
        f"Test ELBO uses {args.num_particles} samples of z per image; log p(x) is "
        f"importance-sampled with K = {args.num_samples} (source: "
        f"{rows[0]['log_likelihood_source']}). Nats per image, higher is better; NLL = -log p(x).",
        "",
        "| prior | prior params | test ELBO | test log p(x) | log p(x) vs standard-normal "
        "| active units | train time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = (f"{r['test_log_likelihood'] - base['test_log_likelihood']:+.2f}"
                 if base is not None else "n/a")
        lines.append(f"| {r['prior']} | {r['prior_parameters']} | {r['test_elbo']:.2f} | "
                     f"{r['test_log_likelihood']:.2f} | {delta} | "
                     f"{r['active_units']} / {r['latent_dim']} | {r['train_seconds']:.0f} |")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--priors", nargs="+", default=None, metavar="NAME",
                   help=f"priors to compare (default: all of {', '.join(PRIORS)})")
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--train-limit", type=int, default=0, help="use the first N training images")
    p.add_argument("--test-limit", type=int, default=0, help="evaluate the first N test images")
    p.add_argument("--latent-dim", type=int, default=40)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[300])
    p.add_argument("--components", type=int, default=100)
    p.add_argument("--flow-depth", type=int, default=2)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-particles", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "priors_results.md",
                   help="Markdown table; a .json with the same stem is written beside it")
    p.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures",
                   help="folder for prior_samples_<prior>.png")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; one avoids OpenMP spin-waiting on a shared CPU, "
                        "which costs far more than it gains for networks this small")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    priors = args.priors or list(PRIORS)
    unknown = [name for name in priors if name not in PRIORS]
    if unknown:
        print(f"compare_priors: error: unknown prior {unknown[0]!r}; choose from "
              f"{', '.join(PRIORS)}", file=sys.stderr)
        return 2
    outputs = [args.out, args.out.with_suffix(".json"),
               *(args.figures / f"prior_samples_{name}.png" for name in priors)]
    existing = [str(path) for path in outputs if path.exists()]
    if existing and not args.overwrite:
        print(f"compare_priors: error: {existing[0]} exists; pass --overwrite to replace it",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        dataset = load_dataset(DataConfig(dataset=args.dataset, train_limit=args.train_limit))
        args.figures.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in priors:
            rows.append(run_prior(name, args, dataset, args.figures))
            r = rows[-1]
            print(f"{name}: test ELBO {r['test_elbo']:.2f}, log p(x) "
                  f"{r['test_log_likelihood']:.2f}, active units {r['active_units']}, "
                  f"{r['train_seconds']:.0f} s", flush=True)
    except PyroVAEError as e:
        print(f"compare_priors: error: {e}", file=sys.stderr)
        return 2
    command = "python scripts/compare_priors.py " + shlex.join(argv if argv is not None
                                                                else sys.argv[1:])
    num_test = min(len(dataset.test), args.test_limit or len(dataset.test))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown_table(rows, args, command.strip(), len(dataset.train),
                                       num_test))
    args.out.with_suffix(".json").write_text(json.dumps(
        {"command": command.strip(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
         "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
