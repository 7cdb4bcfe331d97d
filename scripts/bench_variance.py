"""Time the default variance experiment beside the plain loop it replaces.

    flock /tmp/pyro_vae_bench.lock python scripts/bench_variance.py [--loop-draws 30]

The default experiment is what ``pyro-vae variance`` runs with no options: a 784-400-50
Bernoulli VAE trained 1000 steps on the embedded digits, measured at steps 0, 100, 500 and
1000 on one minibatch of 256 images, R = 1000 gradient draws for each of reparam, score and
score-avg-baseline, plus the oracle. This script runs it end to end (``variance_experiment``)
and prints its parts: training the reference run, the oracle, the draws, the moment kernel's
compilation, and the rest. Beside it, the plain loop -- one Pyro ``loss_and_grads`` (a full
backward pass) per draw -- timed for ``--loop-draws`` draws per estimator at initialisation and
projected to the experiment's 12,000 draws, and the ``torch.func.vmap`` path likewise.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pyro_vae import VAE, Config, load_dataset
from pyro_vae.lab.experiment import fixed_minibatch, variance_experiment
from pyro_vae.lab.variance import gradient_draws
from pyro_vae.runtime import reuse_freed_memory

ESTIMATORS = ("reparam", "score", "score-avg-baseline")


def ms_per_draw(vae: VAE, name: str, x: torch.Tensor, draws: int, **kwargs) -> float:
    for _ in gradient_draws(vae, name, x, 2, **kwargs):  # warm-up
        pass
    start = time.perf_counter()
    for _ in gradient_draws(vae, name, x, draws, **kwargs):
        pass
    return 1e3 * (time.perf_counter() - start) / draws


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loop-draws", type=int, default=30,
                   help="draws per estimator for the plain loop and the vmap path")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--draws", type=int, default=1000, help="R per estimator and checkpoint")
    p.add_argument("--oracle-draws", type=int, default=1000)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[0, 100, 500, 1000])
    args = p.parse_args(argv)
    reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()[0]:.2f} "
          f"(above ~0.3 on 2 cores, other jobs pollute the numbers)", flush=True)
    cfg = Config()
    cfg.train.progress = False
    dataset = load_dataset(cfg.data)

    start = time.perf_counter()
    exp = variance_experiment(cfg, dataset, ESTIMATORS, checkpoints=args.checkpoints,
                              num_draws=args.draws, oracle_draws=args.oracle_draws,
                              precision="auto")
    total = time.perf_counter() - start
    oracle = sum(m["oracle_seconds"] for m in exp["measurements"])
    compile_s = sum(m["compile_seconds"] for m in exp["measurements"])
    draws = sum(r["seconds_per_draw"] * exp["num_draws"]
                for m in exp["measurements"] for r in m["estimators"].values())
    train_s, measure_s = exp["timing"]["reference_training_s"], exp["timing"]["measurement_s"]
    print(f"draw precision {exp['precision']} ({exp['precision_choice']})", flush=True)
    print(f"default experiment: {total:.1f} s in all = reference training {train_s:.1f} s + "
          f"measurement {measure_s:.1f} s (oracle {oracle:.1f} s, gradient draws {draws:.1f} s, "
          f"moment-kernel compile {compile_s:.1f} s, moments and bootstrap "
          f"{measure_s - oracle - draws - compile_s:.1f} s)", flush=True)

    vae = VAE.from_config(cfg, dataset.image_shape)
    x = fixed_minibatch(dataset, cfg, 256)
    n = len(args.checkpoints) * exp["num_draws"]  # draws per estimator in the experiment
    loop = {e: ms_per_draw(vae, e, x, args.loop_draws, method="pyro") for e in ESTIMATORS}
    func = {e: ms_per_draw(vae, e, x, args.loop_draws, method="func", chunk_size=10)
            for e in ESTIMATORS}
    for name, per in (("plain loop (Pyro loss_and_grads per draw)", loop),
                      ("torch.func vmap path, float32", func)):
        parts = ", ".join(f"{e} {ms:.1f}" for e, ms in per.items())
        print(f"{name}: {parts} ms/draw; the experiment's {3 * n:,} draws: "
              f"{n * sum(per.values()) / 1e3:.0f} s", flush=True)
    print(f"measurement vs plain loop's draws alone: {measure_s:.1f} s vs "
          f"{n * sum(loop.values()) / 1e3:.0f} s ({n * sum(loop.values()) / 1e3 / measure_s:.1f}x)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
