"""Anomaly detection with a VAE: train on some digit classes, score the held-out ones.

Usage:

    python scripts/anomaly_experiment.py --out runs/anomaly --normal 0 1 2 3 4 --epochs 20

Trains a VAE (default network) on the training images of the ``--normal`` classes, scores every
test image with -log p(x) (importance sampling, ``--num-samples``) and with -ELBO, and reports
the AUROC of each score for telling held-out classes from training classes (0.5 = chance).
Writes ``anomaly.json``, ``scores.csv`` and ``anomaly_hist.png`` to ``--out``; the model goes
to ``--out/run``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

from pyro_vae import Config, Dataset, Split, load_dataset
from pyro_vae.app.plots import plot_score_histogram
from pyro_vae.errors import CheckpointError, ConfigError
from pyro_vae.metrics import anomaly_scores, auroc
from pyro_vae.training.trainer import fit


def keep_classes(split: Split, classes: list[int]) -> Split:
    mask = torch.isin(split.labels, torch.tensor(classes))
    return Split(split.images[mask], split.labels[mask])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--normal", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="classes seen in training; the others are the anomalies")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--latent-dim", type=int, default=50)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[400])
    p.add_argument("--num-samples", type=int, default=500, help="K for -log p(x)")
    p.add_argument("--test-limit", type=int, default=0, help="score only N test images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output folder {out} is not empty; choose another --out")
    cfg = Config()
    cfg.data.dataset = args.dataset
    cfg.model.latent_dim, cfg.model.hidden_dims = args.latent_dim, args.hidden_dims
    cfg.train.epochs, cfg.train.seed, cfg.train.progress = args.epochs, args.seed, False
    data = load_dataset(cfg.data)
    classes = sorted(int(c) for c in data.train.labels.unique())
    if not set(args.normal) < set(classes):
        raise ConfigError(f"--normal {args.normal} must be a proper subset of the classes "
                          f"{classes}")
    train = Dataset(data.name, data.image_shape, keep_classes(data.train, args.normal), data.test)
    if args.test_limit:
        train.test = Split(data.test.images[:args.test_limit], data.test.labels[:args.test_limit])
    cfg.train.batch_size = min(cfg.train.batch_size, len(train.train))
    result = fit(cfg, out / "run", dataset=train)
    vae, test = result.vae, result.dataset.test  # test images binarized as in training
    anomalous = ~torch.isin(test.labels, torch.tensor(args.normal))
    scores = {"nll": anomaly_scores(vae, test.images, "nll", args.num_samples, seed=args.seed),
              "elbo": anomaly_scores(vae, test.images, "elbo", 10, seed=args.seed)}
    report = {"dataset": args.dataset, "normal_classes": args.normal,
              "held_out_classes": [c for c in classes if c not in args.normal],
              "train_images": len(train.train), "test_images": len(test),
              "epochs": args.epochs, "num_samples": args.num_samples,
              "test_elbo_last_epoch": result.metrics[-1]["test_elbo"],
              "auroc": {m: auroc(s, anomalous) for m, s in scores.items()},
              "auroc_per_held_out_class": {
                  str(c): auroc(scores["nll"][(test.labels == c) | ~anomalous],
                                (test.labels == c)[(test.labels == c) | ~anomalous])
                  for c in classes if c not in args.normal}}
    (out / "anomaly.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "scores.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "label", "held_out", "nll", "neg_elbo"])
        for i in range(len(test)):
            w.writerow([i, int(test.labels[i]), int(anomalous[i]), f"{scores['nll'][i]:.4f}",
                        f"{scores['elbo'][i]:.4f}"])
    plot_score_histogram(out / "anomaly_hist.png", scores["nll"][~anomalous],
                         scores["nll"][anomalous],
                         f"{args.dataset}: trained on {args.normal}, -log p(x) (K = "
                         f"{args.num_samples}); AUROC {report['auroc']['nll']:.3f}",
                         xlabel="-log p(x) (nats, higher = more anomalous)")
    print(json.dumps(report["auroc"]), f"per held-out class: "
          f"{ {k: round(v, 3) for k, v in report['auroc_per_held_out_class'].items()} }")
    return 0


if __name__ == "__main__":
    sys.exit(main())
