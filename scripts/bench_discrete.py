"""Time the default discrete variance experiment against the plain per-draw loop.

The experiment: a 10-bit Bernoulli code (784-128-10 networks), a reference run trained with
straight-through and measured at 3 checkpoints on one minibatch of 256 digits, with the exact
gradient (a sum over the 1,024 codes) as oracle and R = 1000 draws of each unbiased and relaxed
estimator (score, score-avg-baseline, rloo, vimco, gumbel-softmax, straight-through), each at
its smallest number of samples per image (1; 2 for rloo and vimco). The plain loop is one
Pyro ``loss_and_grads`` per draw (the lab's reference path), timed on ``--loop-draws`` draws
per estimator and scaled to the experiment's count. The paths the experiment took (the
accelerators chosen for the draws and the oracle) are printed with the timings. The
experiment's clock starts after torch's one-time lazy import of ``torch._dynamo`` (which the
first optimizer or ``torch.func`` transform of a process triggers); that import is timed and
printed apart. So that runs at busy and quiet moments of a shared machine can be compared, the
script also prints the float32 GEMM rate measured just before the clock, the least time the
draws' matrix products could take at that rate, and how much of the machine the experiment had
(its CPU time per second, other processes, the hypervisor's steal). Usage::

    python scripts/bench_discrete.py              # about 1.5 minutes on this 2-core CPU
    python scripts/bench_discrete.py --threads 1  # one core (docs/discrete.md has both)
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from pyro_vae.runtime import busy_report, cpu_ticks, gemm_peak, reuse_freed_memory

ESTIMATORS = ["score", "score-avg-baseline", "rloo", "vimco", "gumbel-softmax",
              "straight-through"]


def ms_per_draw(vae, name: str, x: torch.Tensor, draws: int, particles: int, **kw) -> float:
    from pyro_vae.lab.variance import gradient_draws

    start = time.perf_counter()
    for _ in gradient_draws(vae, name, x, draws, num_particles=particles, **kw):
        pass
    return 1e3 * (time.perf_counter() - start) / draws


def product_flops(hidden: int, pixels: int, batch: int, draws: int, particles: int) -> float:
    """FLOPs of the matrix products the experiment's draws cannot avoid, per checkpoint: the
    per-draw weight gradients of the decoder's last layer (one row per particle and image) and
    of the encoder's first layer (one row per image: its forward pass is shared by the
    particles), plus, for gumbel-softmax's soft codes, the decoder's last layer forward and its
    backward to the hidden layer (hard codes read those from the per-code tables)."""
    one = 2 * hidden * pixels * batch  # one product of a hidden x pixels layer over the batch
    total = 0.0
    for name in ESTIMATORS:
        k = max(particles, 2 if name in ("rloo", "vimco") else 1)
        total += (k + 1) * one + (2 * k * one if name == "gumbel-softmax" else 0)
    return draws * total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=10)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--particles", type=int, default=1,
                   help="samples per image per draw (rloo and vimco take at least 2)")
    p.add_argument("--checkpoints", type=int, nargs="+", default=[0, 200, 1000])
    p.add_argument("--loop-draws", type=int, default=20)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: one per core, torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the CLI does: freed temporaries stay in the process

    from pyro_vae import VAE, Config, load_dataset
    from pyro_vae.config import DataConfig
    from pyro_vae.lab.experiment import fixed_minibatch, variance_experiment

    cfg = Config()
    cfg.model.latent = "bernoulli"
    cfg.model.latent_dim = args.bits
    cfg.model.hidden_dims = [args.hidden]
    cfg.train.estimator = "straight-through"
    cfg.train.num_particles = args.particles
    cfg.train.progress = False
    cfg.validate()
    dataset = load_dataset(DataConfig(dataset="mnist-5k"))
    # torch imports torch._dynamo lazily, at the first optimizer or torch.func transform of a
    # process: a one-time library cost (seconds on this CPU), timed apart from the experiment
    start = time.perf_counter()
    importlib.import_module("torch._dynamo")
    import_s = time.perf_counter() - start
    peak = gemm_peak(torch.float32)
    before, cpu, start = cpu_ticks(), time.process_time(), time.perf_counter()
    exp = variance_experiment(cfg, dataset, ESTIMATORS, checkpoints=args.checkpoints,
                              num_draws=args.draws, measure_batch=256)
    total = time.perf_counter() - start
    busy = busy_report(before, cpu_ticks(), time.process_time() - cpu, total)
    flops = len(args.checkpoints) * product_flops(args.hidden, 784, 256, args.draws,
                                                  args.particles)
    oracle = sum(m["oracle_seconds"] for m in exp["measurements"])
    draws = sum(r["seconds_per_draw"] * exp["num_draws"]
                for m in exp["measurements"] for r in m["estimators"].values())
    train_s, measure_s = exp["timing"]["reference_training_s"], exp["timing"]["measurement_s"]
    paths = sorted({f"{p['computation']}: {p['path']}" for m in exp["measurements"]
                    for p in m["paths"]})
    print(f"default discrete experiment ({args.bits}-bit code, 784-{args.hidden}-{args.bits}, "
          f"{len(args.checkpoints)} checkpoints x {len(ESTIMATORS)} estimators x R = "
          f"{args.draws}, batch 256, K = {args.particles}): {total:.1f} s in all = reference "
          f"training {train_s:.1f} s + measurement {measure_s:.1f} s (exact oracle "
          f"{oracle:.1f} s, gradient draws {draws:.1f} s, moments, bootstrap and probes "
          f"{measure_s - oracle - draws:.1f} s)", flush=True)
    print("paths: " + "; ".join(paths), flush=True)
    print(f"machine: float32 GEMM {peak:.0f} GFLOP/s just before the clock, at which the draws' "
          f"{flops / 1e12:.2f} TFLOP of products take at least {flops / peak / 1e9:.1f} s (the "
          f"draws took {draws:.1f} s); during the experiment: {busy}", flush=True)

    vae = VAE.from_config(cfg, dataset.image_shape)
    x = fixed_minibatch(dataset, cfg, 256)
    n = len(args.checkpoints) * args.draws  # draws per estimator in the experiment
    loop = {e: ms_per_draw(vae, e, x, args.loop_draws, args.particles, method="pyro")
            for e in ESTIMATORS}  # gradient_draws raises the particles to each one's minimum
    parts = ", ".join(f"{e} {ms:.1f}" for e, ms in loop.items())
    loop_s = n * sum(loop.values()) / 1e3
    print(f"plain loop (Pyro loss_and_grads per draw): {parts} ms/draw; the experiment's "
          f"{len(ESTIMATORS) * n:,} draws: {loop_s:.0f} s", flush=True)
    print(f"measurement vs the plain loop's draws alone: {measure_s:.1f} s vs {loop_s:.0f} s "
          f"({loop_s / measure_s:.1f}x); whole experiment {total:.1f} s (target < 60 s), "
          f"{total + import_s:.1f} s with torch's one-time import of torch._dynamo "
          f"({import_s:.1f} s, before the clock)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
