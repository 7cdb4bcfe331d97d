"""Epoch time and test ELBO of pyro_vae against plain PyTorch (foundation issue, acceptance 2).

    flock /tmp/pyro_vae_bench.lock python scripts/benchmark_epoch.py
    python scripts/benchmark_epoch.py --epochs 2 --train-limit 6000    # a quick look

Trains the default network (784-400-50, batch 256, dynamic binarization) on full Fashion-MNIST
(Debian package) with pyro_vae's Trainer (float32, and bf16 unless ``--no-bf16``) and with the
plain PyTorch VAE of ``scripts/benchmark.py`` (same network and objective), one epoch of each in
turn so machine load falls on all alike. Prints seconds per epoch (median), the ratio, and the
test ELBO of each after the last epoch, computed by the same Trace_ELBO evaluator for all.
With ``--generic`` (default) it also times the generic Pyro path: the default model with the
fast path off, and a diagonal-Laplace guide that no accelerator covers. Targets: pyro_vae at
most 0.9x plain PyTorch per epoch; a guide on the generic path within 1.3x; test ELBO no worse
by more than 1 nat; bf16 within 0.2 nats of float32.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import PlainVAE  # noqa: E402  (the shared plain PyTorch reference)

from pyro_vae import Config, load_dataset  # noqa: E402
from pyro_vae.config import DataConfig  # noqa: E402
from pyro_vae.data import binarize_batch, prepare_observations  # noqa: E402
from pyro_vae.metrics import elbo_per_image  # noqa: E402
from pyro_vae.training.trainer import Trainer, epoch_order  # noqa: E402


class PlainAsPyroVAE(torch.nn.Module):
    """Lets the package's Trace_ELBO evaluator score the plain network (same maths)."""

    def __init__(self, plain: PlainVAE):
        super().__init__()
        from pyro_vae.models.layers import positive_scale

        self.plain = plain
        self._scale = positive_scale

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        import pyro
        import pyro.distributions as dist

        with pyro.plate("data", x.shape[0]):
            zeros = x.new_zeros(x.shape[0], self.plain.decoder[0].in_features)
            z = pyro.sample("z", dist.Normal(zeros, zeros + 1).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.plain.decoder(z), validate_args=False)
                        .to_event(1), obs=x)

    def encoder(self, x: torch.Tensor):
        import pyro.distributions as dist
        import torch.nn.functional as F

        loc, raw = self.plain.encoder(x).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        import pyro

        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.encoder(x))

    @staticmethod
    def data_plate(x: torch.Tensor, num_data: int | None):
        import pyro

        return pyro.plate("data", x.shape[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--train-limit", type=int, default=0, help="0: all 60,000 images")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--generic", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the generic Pyro path: the default model with "
                        "--no-fast-path, and a Laplace guide that no accelerator covers")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data_cfg = DataConfig(dataset="fashion-mnist", train_limit=args.train_limit)
    raw = load_dataset(data_cfg)
    obs = prepare_observations(raw, data_cfg, seed=args.seed)
    train, test = obs.train.images, obs.test.images
    n, batch = len(train), args.batch_size

    trainers: dict[str, Trainer] = {}
    for precision in ["float32", "bf16"] if args.bf16 else ["float32"]:
        cfg = Config()
        cfg.data = data_cfg
        cfg.train.batch_size, cfg.train.seed, cfg.train.progress = batch, args.seed, False
        cfg.train.precision, cfg.train.device = precision, "cpu"
        trainers[f"pyro_vae-{precision}"] = Trainer(cfg.validate(), raw)
    if args.generic:
        for name, encoder, fast in (("pyro-generic", "diagonal-normal", False),
                                    ("laplace-guide", "laplace", True)):
            cfg = Config()
            cfg.data = data_cfg
            cfg.train.batch_size, cfg.train.seed, cfg.train.progress = batch, args.seed, False
            cfg.train.device, cfg.train.fast_path, cfg.model.encoder = "cpu", fast, encoder
            trainers[name] = Trainer(cfg.validate(), raw)
    for name, t in trainers.items():
        print(f"  {name}: {t.paths[0]}")
    torch.manual_seed(args.seed)
    plain = PlainVAE()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)

    def plain_step(x: torch.Tensor) -> None:
        loss = -plain.elbo(x) * (n / x.shape[0])
        plain_opt.zero_grad(set_to_none=True)
        loss.backward()
        plain_opt.step()

    steps = {name: t.step for name, t in trainers.items()}
    steps["plain-float32"] = plain_step
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    print(f"Fashion-MNIST, {n} training images, batch {batch}, {args.threads} threads, "
          f"{args.epochs} epochs")
    for epoch in range(args.epochs):
        order = epoch_order(n, args.seed, epoch)
        for name, step in steps.items():
            t0 = time.perf_counter()
            for b in range(n // batch):
                step(binarize_batch(train[order[b * batch:(b + 1) * batch]], "dynamic"))
            seconds[name].append(time.perf_counter() - t0)
        print(f"  epoch {epoch + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s"
                                                  for k, v in seconds.items()), flush=True)
    elbos = {name: elbo_per_image(t.vae, test) for name, t in trainers.items()}
    elbos["plain-float32"] = elbo_per_image(PlainAsPyroVAE(plain), test)
    print("\nimplementation    s/epoch (median)  test ELBO (nats/image)")
    for name in steps:
        print(f"  {name:15s} {statistics.median(seconds[name]):10.2f} {elbos[name]:14.2f}")
    ours, ref = (statistics.median(seconds[k]) for k in ("pyro_vae-float32", "plain-float32"))
    print(f"\nepoch-time ratio pyro_vae / plain PyTorch: {ours / ref:.2f} (target <= 0.9)")
    for name in ("pyro-generic", "laplace-guide"):
        if name in trainers:
            print(f"epoch-time ratio {name} (generic Pyro path) / plain PyTorch: "
                  f"{statistics.median(seconds[name]) / ref:.2f} (target <= 1.3)")
    gap = elbos["plain-float32"] - elbos["pyro_vae-float32"]
    print(f"test ELBO: pyro_vae is {gap:+.2f} nats below plain PyTorch (target <= 1)")
    if "pyro_vae-bf16" in trainers:
        print(f"bf16 epoch time / float32 plain PyTorch: "
              f"{statistics.median(seconds['pyro_vae-bf16']) / ref:.2f}")
        print(f"test ELBO float32 - bf16: "
              f"{elbos['pyro_vae-float32'] - elbos['pyro_vae-bf16']:+.2f} nats (target |.| <= 0.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
