"""Time R gradient draws: the plain loop (one Pyro loss_and_grads per draw) vs the vectorized lab.

    flock /tmp/pyro_vae_bench.lock python scripts/bench_variance.py [--draws 100] [--batch 256]

Prints milliseconds per draw of each, for a 784-400-50 VAE on one minibatch of real digits, and
the projected time of the default experiment (3 estimators x 4 checkpoints x R = 1000 draws,
plus the oracle).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pyro_vae import VAE, Config, load_dataset
from pyro_vae.variance import (
    fixed_minibatch,
    gradient_draws,
    measure_gradient_variance,
    oracle_gradient,
)


def per_draw_ms(vae: VAE, name: str, x: torch.Tensor, draws: int, vectorized: bool,
                precision: str = "float32") -> float:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else \
        torch.autocast("cpu", enabled=False)
    start = time.perf_counter()
    with ctx:
        for _ in gradient_draws(vae, name, x, draws, vectorized=vectorized):
            pass
    return 1e3 * (time.perf_counter() - start) / draws


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--chunk", type=int, default=25)
    p.add_argument("--whole", action="store_true",
                   help="also time measure_gradient_variance end to end (moments, bootstrap, "
                        "oracle) for one checkpoint and project to the default 4 checkpoints")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores; above ~0.3 means the "
          f"numbers below are polluted by other jobs)")
    cfg = Config()
    vae = VAE.from_config(cfg, (1, 28, 28))
    x = fixed_minibatch(load_dataset(cfg.data), cfg, args.batch)
    total = {"loop": 0.0, "vectorized": 0.0, "vectorized-bf16": 0.0}
    for name in ("reparam", "score", "score-avg-baseline"):
        loop = per_draw_ms(vae, name, x, max(args.draws // 4, 10), vectorized=False)
        fast = per_draw_ms(vae, name, x, args.draws, vectorized=True)
        bf16 = per_draw_ms(vae, name, x, args.draws, vectorized=True, precision="bf16")
        print(f"{name:<20} plain loop {loop:7.2f} ms/draw   vectorized {fast:7.2f} ms/draw   "
              f"vectorized bf16 {bf16:7.2f} ms/draw", flush=True)
        total["loop"] += loop
        total["vectorized"] += fast
        total["vectorized-bf16"] += bf16
    start = time.perf_counter()
    oracle_gradient(vae, x, args.draws)
    oracle = 1e3 * (time.perf_counter() - start) / args.draws
    print(f"oracle (mean only) {oracle:.2f} ms/draw")
    for key, ms in total.items():
        print(f"default experiment, {key}: {4 * 1000 * ms / 1e3:.0f} s for the 12,000 draws "
              f"(+ {4 * 2000 * oracle / 1e3:.0f} s oracle at 2,000 draws per checkpoint)")
    if args.whole:
        for precision in ("float32", "bf16"):
            start = time.perf_counter()
            measure_gradient_variance(vae, x, ["reparam", "score", "score-avg-baseline"],
                                      num_draws=args.draws, oracle_draws=2 * args.draws,
                                      chunk_size=args.chunk, precision=precision)
            seconds = time.perf_counter() - start
            print(f"whole measurement, {precision}: {seconds:.1f} s for one checkpoint at "
                  f"R = {args.draws}; projected default (4 checkpoints, R = 1000, oracle 2000): "
                  f"{4 * seconds * 1000 / args.draws:.0f} s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
