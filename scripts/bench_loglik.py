"""Benchmark the importance-sampled log-likelihood: the fused evaluator against a plain loop.

Usage (a run trained on fashion-mnist, whose test split has 10,000 images):

    pyro-vae train --out runs/fmnist --dataset fashion-mnist --train-limit 6000 --epochs 3
    flock /tmp/pyro_vae_bench.lock python scripts/bench_loglik.py runs/fmnist \
        --num-samples 5000 --limit 10000 --loop-images 20

Prints, for K importance samples per image: the time of ``pyro_vae.evaluate.log_likelihood``
(float32 and bfloat16 last layer), the time of a straightforward per-image chunked loop
(measured on ``--loop-images`` images and scaled to the same number of images), the achieved
matmul rate as a fraction of a measured float32 GEMM peak, and the bfloat16-float32 difference
in nats.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from pyro_vae.evaluate import importance_log_likelihood, run_split
from pyro_vae.train import load_run

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


def gemm_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of a large square matmul: the practical peak for ``dtype``."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def decoder_flops(vae) -> int:
    """Multiply-add FLOPs of one decoder evaluation (its linear layers)."""
    return sum(2 * m.in_features * m.out_features for m in vae.decoder.modules()
               if isinstance(m, torch.nn.Linear))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--num-samples", type=int, default=5000)
    p.add_argument("--limit", type=int, default=10000, help="test images timed")
    p.add_argument("--loop-images", type=int, default=20,
                   help="images the plain loop is timed on (its time is scaled to --limit)")
    p.add_argument("--compare-images", type=int, default=100,
                   help="images on which bfloat16 and float32 estimates are compared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak-size", type=int, default=2048, help="side of the peak-rate GEMM")
    p.add_argument("--precisions", nargs="+", default=["bfloat16", "float32"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg, vae, _ = load_run(args.run_dir)
    x, _ = run_split(cfg, "test", args.limit)
    n, k = len(x), args.num_samples
    flops = decoder_flops(vae) * n * k
    peak32 = gemm_peak(torch.float32, args.peak_size)
    peak16 = gemm_peak(torch.bfloat16, args.peak_size)
    print(f"{cfg.data.dataset} test: {n} images, K = {k}, decoder {decoder_flops(vae) / 2:.0f} "
          f"MACs/sample -> {flops:.3g} FLOP; threads {args.threads}")
    print(f"measured GEMM peak ({args.peak_size}^3): float32 {peak32:.0f} GFLOP/s, bfloat16 "
          f"{peak16:.0f} GFLOP/s")
    for precision in args.precisions:
        start, cpu = time.perf_counter(), time.process_time()
        ll = importance_log_likelihood(vae, x, k, seed=0, precision=precision)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        rate = flops / seconds / 1e9
        print(f"log_likelihood {precision:9s}: {seconds:8.1f} s (CPU time / threads "
              f"{cpu / args.threads:.1f} s)  mean log p(x) {ll.mean():.3f} "
              f"(MC s.e. {ll.mc_stderr():.3f})  {rate:.0f} GFLOP/s = "
              f"{100 * rate / peak32:.0f}% of measured float32 peak, "
              f"{100 * rate / NOMINAL_FP32_PEAK:.0f}% of nominal")
    m = min(args.loop_images, n)
    start, cpu = time.perf_counter(), time.process_time()
    plain_loop(vae, x[:m], k)
    loop, cpu = (time.perf_counter() - start) * n / m, (time.process_time() - cpu) * n / m
    print(f"plain per-image loop    : {loop:8.1f} s (CPU time / threads "
          f"{cpu / args.threads:.1f} s)  measured on {m} images, scaled to {n}")
    c = min(args.compare_images, n)
    if c and len(args.precisions) > 1:
        a = importance_log_likelihood(vae, x[:c], k, seed=1, precision="float32").estimate
        b = importance_log_likelihood(vae, x[:c], k, seed=1, precision="bfloat16").estimate
        d = b - a
        print(f"bfloat16 - float32 on {c} images, same z: mean {d.mean():+.4f} nats, "
              f"max |diff| {d.abs().max():.4f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
