"""Run the gradient-variance experiment on real digits; write the docs' table and figures.

    python scripts/variance_experiment.py --out docs/figures/variance [--checkpoints 0 100 500 1000]

Writes variance.json, variance.csv, the four figures and results.md (a Markdown table of
encoder/decoder variance, ratio to reparam, SNR and oracle cosine per estimator and checkpoint)
into --out. docs/estimators.md quotes results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyro_vae import Config, load_dataset
from pyro_vae.app.plots import write_variance_figures
from pyro_vae.lab.experiment import variance_experiment, variance_rows
from pyro_vae.runtime import reuse_freed_memory


def results_table(experiment: dict) -> str:
    lines = ["| step | estimator | encoder tr Cov [95% CI] | ratio to reparam | encoder SNR | "
             "encoder cos | decoder tr Cov [95% CI] | decoder ratio [95% CI] | decoder cos | "
             "ms/draw |", "|" + "---|" * 10]
    for m in experiment["measurements"]:
        for name, res in m["estimators"].items():
            e, d = res["groups"]["encoder"], res["groups"]["decoder"]
            lines.append(
                f"| {m['step']} | {name} | {e['trace']:.4g} [{e['trace_ci'][0]:.4g}, "
                f"{e['trace_ci'][1]:.4g}] | {e['ratio_to_reparam']:.3g} | {e['snr']:.3g} | "
                f"{e['cosine']:.3f} | {d['trace']:.4g} [{d['trace_ci'][0]:.4g}, "
                f"{d['trace_ci'][1]:.4g}] | {d['ratio_to_reparam']:.3f} "
                f"[{d['ratio_to_reparam_ci'][0]:.3f}, {d['ratio_to_reparam_ci'][1]:.3f}] | "
                f"{d['cosine']:.4f} | {1e3 * res['seconds_per_draw']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/figures/variance")
    p.add_argument("--dataset", default="mnist-5k")
    p.add_argument("--estimators", nargs="+", default=["reparam", "score", "score-avg-baseline"])
    p.add_argument("--checkpoints", nargs="+", type=int, default=[0, 100, 500, 1000])
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--oracle-draws", type=int, default=1000)
    p.add_argument("--measure-batch", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--curve-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16", choices=["float32", "bf16"],
                   help="matrix products of the draws and the oracle (as pyro-vae variance "
                   "--draw-precision)")
    args = p.parse_args(argv)
    reuse_freed_memory()
    cfg = Config()
    cfg.data.dataset = args.dataset
    cfg.train.batch_size = args.batch_size
    cfg.train.seed = args.seed
    cfg.train.progress = False
    cfg.validate()
    experiment = variance_experiment(
        cfg, load_dataset(cfg.data), args.estimators, checkpoints=args.checkpoints,
        num_draws=args.draws, oracle_draws=args.oracle_draws, measure_batch=args.measure_batch,
        curve_steps=args.curve_steps, seed=args.seed, precision=args.precision,
        log=lambda message: print(message, file=sys.stderr, flush=True))
    experiment["command"] = "python scripts/variance_experiment.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variance.json").write_text(json.dumps(experiment, indent=1))
    rows = variance_rows(experiment)
    (out / "variance.csv").write_text("".join(",".join(str(v) for v in r.values()) + "\n"
                                              for r in [dict(zip(rows[0], rows[0])), *rows]))
    write_variance_figures(out, experiment)
    (out / "results.md").write_text(results_table(experiment))
    print(results_table(experiment))
    print(json.dumps(experiment["timing"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
