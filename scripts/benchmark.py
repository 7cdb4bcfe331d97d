"""Training speed of pyro_vae against plain PyTorch and a Pyro-tutorial SVI loop (issue 6).

    flock /tmp/pyro_vae_bench.lock python scripts/benchmark.py            # the full suite
    python scripts/benchmark.py --batch-sizes 32 --images 2048 --rounds 2  # a quick look

Every implementation trains the same network (784-400-50, softplus, Bernoulli likelihood,
diagonal-Normal encoder, N(0, I) prior) on the same objective (the single-sample Monte Carlo
ELBO of Trace_ELBO, minibatch terms scaled by N / B) with Adam, lr 1e-3, on dynamically
binarized full Fashion-MNIST:

- ``pyro_vae``        the package's Trainer.step (fast path, the default), float32;
- ``pyro_vae-pyro``   the same with ``--no-fast-path`` (Pyro's Trace_ELBO on every step);
- ``pyro_vae-bf16``   the package with ``--precision bf16``;
- ``plain``           a plain PyTorch VAE written below, float32, torch.optim.Adam defaults;
- ``plain-bf16``      the same under bfloat16 autocast;
- ``pyro-tutorial``   the loop of Pyro's VAE tutorial: SVI(model, guide, pyro.optim.Adam,
                      Trace_ELBO()).step(x), with the tutorial's unscaled plate (Adam is
                      nearly blind to a constant factor on the loss).

Each implementation lives in its own worker process (same thread count for all), so its peak
resident memory is its own. The parent interleaves them: in each round every worker trains on
``--images`` images, and the median over rounds is reported, so load from other processes on
the machine hits all of them alike. Seconds per epoch = seconds per image x 60,000. Beside the
wall-clock time it reports the CPU time the worker process used (all its threads): on a machine
shared with other jobs that is the steadier measure of the work a step needs.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PIXELS, HIDDEN, LATENT = 784, 400, 50
#: Multiply-adds per image of one forward pass: encoder 784-400-100, decoder 50-400-784.
MACS_PER_IMAGE = PIXELS * HIDDEN + HIDDEN * 2 * LATENT + LATENT * HIDDEN + HIDDEN * PIXELS
#: A training step costs about three forward passes (forward, then two products per layer back).
FLOPS_PER_IMAGE = 3 * 2 * MACS_PER_IMAGE
IMPLS = ["pyro_vae", "pyro_vae-pyro", "pyro_vae-bf16", "plain", "plain-bf16", "pyro-tutorial"]
DEFAULT_IMPLS = ["pyro_vae", "pyro_vae-pyro", "pyro_vae-bf16", "plain", "pyro-tutorial"]


# -- the plain PyTorch reference --------------------------------------------------------------
class PlainVAE(nn.Module):
    """The same VAE in plain PyTorch: two MLPs and the Monte Carlo ELBO written out."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.Softplus(),
                                     nn.Linear(HIDDEN, 2 * LATENT))
        self.decoder = nn.Sequential(nn.Linear(LATENT, HIDDEN), nn.Softplus(),
                                     nn.Linear(HIDDEN, PIXELS))

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the batch of log p(x|z) + log p(z) - log q(z|x) at one z per image."""
        loc, raw_scale = self.encoder(x).float().chunk(2, dim=-1)
        scale = F.softplus(raw_scale) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        logits = self.decoder(z).float()
        log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
        log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum()
        return log_px + log_pz - log_qz


def plain_trainer(num_data: int, bf16: bool, device: torch.device):
    vae = PlainVAE().to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)

    def step(x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = -vae.elbo(x) * (num_data / x.shape[0])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def test_elbo(x: torch.Tensor) -> float:
        return sum(float(vae.elbo(chunk)) for chunk in x.split(1000)) / x.shape[0]

    return step, test_elbo


# -- the Pyro tutorial loop -------------------------------------------------------------------
def tutorial_trainer(num_data: int, device: torch.device):
    import pyro
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    net = PlainVAE().to(device)

    def model(x: torch.Tensor) -> None:
        pyro.module("decoder", net.decoder)
        with pyro.plate("data", x.shape[0]):
            zeros = x.new_zeros(x.shape[0], LATENT)
            z = pyro.sample("z", dist.Normal(zeros, zeros + 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=net.decoder(z), validate_args=False)
                        .to_event(1), obs=x)

    def guide(x: torch.Tensor) -> None:
        pyro.module("encoder", net.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw_scale = net.encoder(x).chunk(2, dim=-1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw_scale) + 1e-4).to_event(1))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=Trace_ELBO())

    def step(x: torch.Tensor) -> None:
        svi.step(x)

    @torch.no_grad()
    def test_elbo(x: torch.Tensor) -> float:
        return sum(float(net.elbo(chunk)) for chunk in x.split(1000)) / x.shape[0]

    return step, test_elbo


# -- pyro_vae ---------------------------------------------------------------------------------
def pyro_vae_trainer(dataset, batch: int, precision: str, fast_path: bool, device: str):
    from pyro_vae import Config
    from pyro_vae.metrics import elbo_per_image
    from pyro_vae.training.trainer import Trainer

    cfg = Config()
    cfg.data.dataset = "fashion-mnist"
    cfg.train.batch_size = batch
    cfg.train.precision = precision
    cfg.train.fast_path = fast_path
    cfg.train.progress = False
    cfg.train.device = device
    trainer = Trainer(cfg.validate(), dataset)

    def step(x: torch.Tensor) -> None:
        trainer.step(x)

    def test_elbo(x: torch.Tensor) -> float:
        return elbo_per_image(trainer.vae, x)

    return step, test_elbo


# -- workers ----------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1024


def _worker(conn, name: str, threads: int, device_name: str, seed: int) -> None:
    torch.set_num_threads(threads)
    from pyro_vae import load_dataset
    from pyro_vae.config import DataConfig
    from pyro_vae.data import binarize_batch, prepare_observations

    device = torch.device(device_name)
    raw = load_dataset(DataConfig(dataset="fashion-mnist"))
    obs = prepare_observations(raw, DataConfig(dataset="fashion-mnist"), seed=0)
    train, test = obs.train.images.to(device), obs.test.images.to(device)
    num_data = len(train)
    step: Callable[[torch.Tensor], None] | None = None
    test_elbo: Callable[[torch.Tensor], float] | None = None
    built_for = None
    position = 0

    def build(batch: int) -> None:
        nonlocal step, test_elbo, built_for, position
        torch.manual_seed(seed)
        if name.startswith("pyro_vae"):
            precision = "bf16" if name.endswith("bf16") else "float32"
            step, test_elbo = pyro_vae_trainer(raw, batch, precision, name != "pyro_vae-pyro",
                                               device_name)
        elif name.startswith("plain"):
            step, test_elbo = plain_trainer(num_data, name.endswith("bf16"), device)
        else:
            step, test_elbo = tutorial_trainer(num_data, device)
        built_for, position = batch, 0

    def train_steps(batch: int, steps: int) -> None:
        nonlocal position
        order = torch.randperm(num_data, generator=torch.Generator().manual_seed(position))
        order = order.to(device)
        for i in range(steps):
            start = (i * batch) % (num_data - batch)
            step(binarize_batch(train[order[start:start + batch]], "dynamic"))
        position += 1

    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "time":
            _, batch, images = msg
            if built_for != batch:
                build(batch)
                train_steps(batch, 3)  # warm-up: first-call allocations, lazy init
            steps = max(1, images // batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            train_steps(batch, steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            gpu = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            images = steps * batch
            conn.send((seconds / images, cpu / images, _peak_rss_mb(), gpu))
        elif msg[0] == "elbo":
            _, batch, epochs = msg
            build(batch)
            t0 = time.perf_counter()
            train_steps(batch, epochs * (num_data // batch))
            seconds = time.perf_counter() - t0
            conn.send((test_elbo(test), seconds / epochs))


class Worker:
    def __init__(self, name: str, threads: int, device: str, seed: int):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, name, threads, device, seed),
                                daemon=True)
        self.proc.start()

    def ask(self, *msg: Any) -> Any:
        self.conn.send(msg)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop",))
        self.proc.join(timeout=30)


# -- matmul peak ------------------------------------------------------------------------------
def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 20) -> float:
    """Best FLOP/s of a 5000x400 @ 400x784 product (the shape of the decoder's last layer)."""
    a = torch.randn(5000, 400, device=device).to(dtype)
    b = torch.randn(400, 784, device=device).to(dtype)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * 5000 * 400 * 784 / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--images", type=int, default=8192,
                        help="images each implementation trains on per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--impls", nargs="+", default=DEFAULT_IMPLS, choices=IMPLS)
    parser.add_argument("--elbo-epochs", type=int, default=5,
                        help="epochs at batch 256 for the float32 vs bf16 test-ELBO check "
                             "(0: skip)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmark: error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    peak32 = matmul_peak(torch.float32, device)
    peak16 = matmul_peak(torch.bfloat16, device)
    print(f"device {args.device}, {args.threads} threads, torch {torch.__version__}")
    print(f"matmul peak 5000x400 @ 400x784: float32 {peak32 / 1e12:.3f} TFLOP/s, "
          f"bf16 {peak16 / 1e12:.3f} TFLOP/s")
    workers = {name: Worker(name, args.threads, args.device, seed=0) for name in args.impls}
    results: dict[tuple[str, int], dict[str, float]] = {}
    try:
        for batch in args.batch_sizes:
            times: dict[str, list[float]] = {name: [] for name in workers}
            cpu_times: dict[str, list[float]] = {name: [] for name in workers}
            memory: dict[str, tuple[float, float | None]] = {}
            for _ in range(args.rounds):
                for name, w in workers.items():
                    per_image, cpu_per_image, rss, gpu = w.ask("time", batch, args.images)
                    times[name].append(per_image)
                    cpu_times[name].append(cpu_per_image)
                    memory[name] = (rss, gpu)
            print(f"\nbatch {batch}:")
            print(f"  {'implementation':15s} {'s/epoch':>8s} {'CPU s/epoch':>11s} {'images/s':>9s} "
                  f"{'% f32 peak':>10s} "
                  f"{'peak RSS MB':>11s}{'  peak GPU MB' if device.type == 'cuda' else ''}")
            for name in workers:
                per_image = statistics.median(times[name])
                rate = 1 / per_image
                cpu_epoch = statistics.median(cpu_times[name]) * 60000
                results[(name, batch)] = {"epoch": per_image * 60000, "cpu": cpu_epoch}
                gpu = memory[name][1]
                print(f"  {name:15s} {per_image * 60000:8.2f} {cpu_epoch:11.2f} {rate:9.0f} "
                      f"{100 * rate * FLOPS_PER_IMAGE / peak32:9.1f}% {memory[name][0]:11.0f}"
                      f"{f'  {gpu:11.0f}' if gpu is not None else ''}")

            def ratio(a: str, b: str, batch: int = batch) -> str:
                if (a, batch) not in results or (b, batch) not in results:
                    return "n/a"
                ra, rb = results[(a, batch)], results[(b, batch)]
                return (f"{rb['epoch'] / ra['epoch']:.2f}x wall, "
                        f"{rb['cpu'] / ra['cpu']:.2f}x CPU time")
            print("  speed-ups (epoch time of the second / the first; > 1: the first is faster):")
            for a, b in [("pyro_vae", "plain"), ("pyro_vae", "pyro-tutorial"),
                         ("pyro_vae", "pyro_vae-pyro"), ("pyro_vae-bf16", "plain"),
                         ("pyro_vae-bf16", "pyro_vae"), ("plain-bf16", "plain")]:
                print(f"    {a} vs {b}: {ratio(a, b)}")
        if args.elbo_epochs > 0:
            print(f"\ntest ELBO after {args.elbo_epochs} epochs at batch 256 (nats/image, "
                  f"higher is better):")
            elbos = {}
            for name in ("pyro_vae", "pyro_vae-bf16"):
                if name in workers:
                    elbos[name], sec = workers[name].ask("elbo", 256, args.elbo_epochs)
                    print(f"  {name:15s} {elbos[name]:9.2f}   ({sec:.2f} s/epoch)")
            if len(elbos) == 2:
                gap = elbos["pyro_vae"] - elbos["pyro_vae-bf16"]
                print(f"  float32 - bf16 = {gap:+.2f} nats "
                      f"({'within' if abs(gap) <= 0.2 else 'outside'} 0.2)")
    finally:
        for w in workers.values():
            w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
