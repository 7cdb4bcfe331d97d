"""Benchmark the importance-sampled log-likelihood: the fused evaluator against a plain loop.

Usage (a run trained on fashion-mnist, whose test split has 10,000 images):

    pyro-vae train --out runs/fmnist --dataset fashion-mnist --train-limit 6000 --epochs 3
    flock /tmp/pyro_vae_bench.lock python scripts/bench_loglik.py runs/fmnist \
        --num-samples 5000 --limit 2000 --loop-images 5 --threads 1

Prints, for K importance samples per image over ``--target-images`` images (10,000): the time
of ``pyro_vae.metrics.importance_log_likelihood`` (compiling included; measured on
``--limit`` images and scaled when that is fewer), its CPU time per sample, the time of a
straightforward per-image chunked loop (measured on ``--loop-images`` images and scaled), the
achieved decoder-matmul rate as a fraction of a float32 GEMM peak measured in the same run,
the bfloat16-float32 difference in nats, and for every timing how much of the machine other
processes and the hypervisor took meanwhile (from /proc/stat).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from pyro_vae.app.commands import run_split
from pyro_vae.metrics.loglik import FAST_CHUNK, importance_log_likelihood
from pyro_vae.runtime import busy_report, cpu_ticks, gemm_peak, reuse_freed_memory
from pyro_vae.training.runs import load_run

#: float32 matmul peak of the 2-core development CPU in GFLOP/s (AVX-512, 2 FMA units).
NOMINAL_FP32_PEAK = 330.0


@torch.no_grad()
def plain_loop(vae, x: torch.Tensor, num_samples: int, chunk: int = 1000) -> torch.Tensor:
    """The straightforward estimator: per image, chunks of z, generic log-densities."""
    out = []
    for xi in x:
        q = vae.encoder(xi.unsqueeze(0))
        acc = torch.tensor(-math.inf, dtype=torch.float64)
        for k0 in range(0, num_samples, chunk):
            z = q.sample((min(chunk, num_samples - k0),))
            log_w = vae.decoder(z).log_prob(xi) + vae.prior().log_prob(z) - q.log_prob(z)
            acc = torch.logaddexp(acc, torch.logsumexp(log_w.double().flatten(), 0))
        out.append(acc - math.log(num_samples))
    return torch.stack(out)


def decoder_flops(vae) -> int:
    """Multiply-add FLOPs of one decoder evaluation (its linear layers)."""
    return sum(2 * m.in_features * m.out_features for m in vae.decoder.modules()
               if isinstance(m, torch.nn.Linear))


def timed(fn, threads: int):
    """Run ``fn()``; return its result, wall seconds, CPU seconds and a busy report."""
    before, start, cpu = cpu_ticks(), time.perf_counter(), time.process_time()
    result = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return result, wall, cpu, busy_report(before, cpu_ticks(), cpu, wall)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--limit", type=int, default=10000, help="test images timed")
    p.add_argument("--target-images", type=int, default=10000,
                   help="images the times are scaled to (the acceptance target's 10,000)")
    p.add_argument("--loop-images", type=int, default=20,
                   help="images the plain loop is timed on (its time is scaled)")
    p.add_argument("--compare-images", type=int, default=100,
                   help="images on which bfloat16 and float32 estimates are compared")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--workers", type=int, default=2,
                   help="processes sharing the images (importance_log_likelihood(workers=))")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="samples per image per step [default: the library's]")
    p.add_argument("--peak-size", type=int, default=2048, help="side of the peak-rate GEMM")
    p.add_argument("--precisions", nargs="+", default=["bfloat16"])
    p.add_argument("--no-compile", action="store_true", help="run the fused kernel eagerly")
    args = p.parse_args(argv)
    reuse_freed_memory()
    torch.set_num_threads(args.threads)
    cfg, vae, _ = load_run(args.run_dir)
    x, _ = run_split(cfg, "test", args.limit)
    n, k, target = len(x), args.num_samples, args.target_images
    scale = target / n
    flops = decoder_flops(vae) * target * k
    peak32 = gemm_peak(torch.float32, args.peak_size)
    peak16 = gemm_peak(torch.bfloat16, args.peak_size)
    print(f"{cfg.data.dataset} test: {n} images timed, K = {k}, decoder "
          f"{decoder_flops(vae) / 2:.0f} MACs/sample -> {flops:.3g} FLOP for {target} images; "
          f"threads {args.threads}; batch {args.batch_size} x chunk "
          f"{args.chunk_size or FAST_CHUNK} (fused path; the plain loop uses 1000)")
    print(f"measured GEMM peak ({args.peak_size}^3), this run: float32 {peak32:.0f} GFLOP/s, "
          f"bfloat16 {peak16:.0f} GFLOP/s (nominal float32 {NOMINAL_FP32_PEAK:.0f})")
    compile = not args.no_compile
    label = "measured" if n == target else f"measured on {n}, scaled to {target}"
    for precision in args.precisions:
        def run(images, seed=0, precision=precision):
            return importance_log_likelihood(vae, images, k, batch_size=args.batch_size,
                                             chunk_size=args.chunk_size, seed=seed,
                                             precision=precision, compile=compile,
                                             workers=args.workers)
        # The first call compiles the kernel (both chunk shapes of K): its time is counted.
        _, first, _, _ = timed(lambda: run(x[:1], seed=99), args.threads)
        ll, wall, cpu, busy = timed(lambda: run(x), args.threads)
        total = first + wall * scale
        rate = flops / (wall * scale) / 1e9
        print(f"log_likelihood {precision}, {args.workers} worker process(es): {total:7.1f} s "
              f"for {target} images ({label}; includes {first:.1f} s of compiling + 1 image "
              f"in this process; the workers' start-up and compile-cache loads are in the "
              f"timed part)")
        if args.workers == 1:
            print(f"    timed part {wall:.1f} s wall, {cpu:.1f} s CPU = "
                  f"{cpu / n / k * 1e6:.2f} us CPU per sample -> "
                  f"{cpu * scale / args.threads:.1f} s if {args.threads} cores were free; {busy}")
        else:  # the work is in the workers: the machine-wide counters show it
            print(f"    timed part {wall:.1f} s wall; {busy} (the workers count as others)")
        print(f"    mean log p(x) {ll.mean():.3f} (MC s.e. {ll.mc_stderr():.3f}); decoder "
              f"matmuls {rate:.0f} GFLOP/s = {100 * rate / peak32:.0f}% of this run's float32 "
              f"peak, {100 * rate / NOMINAL_FP32_PEAK:.0f}% of nominal float32 peak")
    m = min(args.loop_images, n)
    _, loop, cpu, busy = timed(lambda: plain_loop(vae, x[:m], k), args.threads)
    print(f"plain per-image loop: {loop * target / m:7.1f} s for {target} images (measured on {m} "
          f"images, scaled); {cpu * target / m / args.threads:.1f} s if {args.threads} cores "
          f"were free; {busy}")
    c = min(args.compare_images, n)
    if c:
        def estimate(precision):
            return importance_log_likelihood(vae, x[:c], k, seed=1, precision=precision,
                                             compile=compile).estimate
        a, b = estimate("float32"), estimate("bfloat16")
        generic = importance_log_likelihood(vae, x[:min(c, 10)], k, seed=1, fast=False).estimate
        d = b - a
        print(f"bfloat16 - float32 on {c} images, same z: mean {d.mean():+.4f} nats, "
              f"max |diff| {d.abs().max():.4f} nats; fast float32 - generic on "
              f"{len(generic)} images: max |diff| {(a[:len(generic)] - generic).abs().max():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
