"""TensorBoard logging of a training run (optional: ``pip install "pyro-vae[tensorboard]"``).

metrics.jsonl stays the run's record; this writes the same numbers, and a few images, as
TensorBoard events under ``RUN_DIR/tensorboard``:

* every epoch: ``elbo/train`` (or ``objective/train`` when the epoch trained another objective),
  ``elbo/test``, ``elbo/val``, ``elbo/reconstruction`` and ``elbo/kl`` (on the first
  ``TERMS_IMAGES`` test images), ``train/lr``, ``train/kl_weight``, ``train/skipped_steps``;
* every ``LOG_EVERY_STEPS`` steps: ``train/loss`` and ``train/grad_norm``;
* every ``train.tensorboard_images_every`` epochs: 64 decoder means of prior draws and 32 test
  images above their reconstructions.

Images are drawn from a generator seeded by the epoch, so logging never changes the run's
random stream (a resumed run still equals the uninterrupted one).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..metrics.elbo import elbo_terms

LOG_EVERY_STEPS = 10
TERMS_IMAGES = 1000
FOLDER = "tensorboard"


def require_tensorboard() -> Any:
    """torch's SummaryWriter class, or ConfigError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the tensorboard package
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install "
                          "'pyro-vae[tensorboard]' (or pip install tensorboard)") from None
    return SummaryWriter


def summary_writer(log_dir: Path, purge_step: int | None = None) -> Any:
    """A SummaryWriter writing to ``log_dir``; events of an earlier, interrupted writer at
    steps >= ``purge_step`` are hidden (a resumed run logs those steps again)."""
    return require_tensorboard()(log_dir=str(log_dir), purge_step=purge_step)


def _grid(images: torch.Tensor, image_shape: tuple[int, ...], ncols: int) -> torch.Tensor:
    """``(N, pixels)`` in [0, 1] -> one ``(C, H, W)`` grid image."""
    c, h, w = image_shape
    images = images.detach().float().clamp(0, 1).reshape(-1, c, h, w).cpu()
    rows = math.ceil(len(images) / ncols)
    grid = torch.ones(c, rows * (h + 2), ncols * (w + 2))
    for i, img in enumerate(images):
        r, k = divmod(i, ncols)
        grid[:, r * (h + 2) + 1:r * (h + 2) + 1 + h, k * (w + 2) + 1:k * (w + 2) + 1 + w] = img
    return grid


class TensorBoardCallback:
    """Writes a trainer's metrics and images as TensorBoard events (see the module docstring)."""

    def __init__(self, run_dir: Path, images_every: int = 5, first_step: int = 0):
        self.writer = summary_writer(Path(run_dir) / FOLDER,
                                     purge_step=first_step + 1 if first_step else None)
        self.images_every = images_every

    def on_step(self, trainer: Any, step: int, loss: float | None, grad_norm: float) -> None:
        if step % LOG_EVERY_STEPS == 0:
            if loss is not None:
                self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/grad_norm", grad_norm, step)

    @torch.no_grad()
    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        step, epoch, w = record["step"], record["epoch"], self.writer
        if "train_elbo" in record:
            w.add_scalar("elbo/train", record["train_elbo"], step)
        else:
            w.add_scalar("objective/train", record["train_objective"], step)
        w.add_scalar("elbo/test", record["test_elbo"], step)
        if "val_elbo" in record:
            w.add_scalar("elbo/val", record["val_elbo"], step)
        for key, tag in (("lr", "train/lr"), ("kl_weight", "train/kl_weight"),
                         ("bad_steps", "train/skipped_steps"), ("seconds", "train/seconds")):
            if key in record:
                w.add_scalar(tag, record[key], step)
        test = trainer.dataset.test.images[:TERMS_IMAGES]
        devices = [test.device] if test.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            terms = elbo_terms(trainer.vae, test, seed=epoch)
            w.add_scalar("elbo/reconstruction", float(terms.reconstruction.mean()), step)
            w.add_scalar("elbo/kl", float(terms.kl.mean()), step)
            if self.images_every and (epoch % self.images_every == 0 or epoch == 1):
                torch.manual_seed(epoch)
                shape = trainer.dataset.image_shape
                w.add_image("samples", _grid(trainer.vae.sample(64), shape, 8), step)
                x = test[:32]
                pairs = torch.stack([x.reshape(4, 8, -1), trainer.vae.reconstruct(x)
                                     .reshape(4, 8, -1)], 1).reshape(64, -1)
                w.add_image("reconstructions", _grid(pairs, shape, 8), step)
        w.flush()

    def close(self) -> None:
        self.writer.close()
