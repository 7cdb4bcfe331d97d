"""Data-parallel training with torch.distributed, launched by ``torchrun``.

``torchrun --nproc-per-node P -m pyro_vae train ...`` starts P copies of the command; each reads
its place (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) from the environment torchrun sets, joins
one process group (gloo on CPU, nccl on GPUs) and trains a replica of the VAE wrapped in
DistributedDataParallel, which averages the gradients of the replicas during ``backward()``.

How a step is split: ``--batch-size B`` is the minibatch of one process, so a step sees P * B
images. All processes shuffle with the same seed, take the same global minibatch of P * B
images, binarize it with the same random draw and keep rows ``rank * B`` to ``(rank + 1) * B``;
the fast path also draws the z-noise of the whole global minibatch and keeps its rows. Each
replica's loss is scaled by N / B and DDP averages over the P replicas, so the gradient is that
of one process with batch P * B, and the run is the same for any P up to float rounding.
Only rank 0 writes the run folder (config, metrics, events, checkpoints, figures); every rank
reads the checkpoint on ``--resume``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Workers:
    """This process's place among the data-parallel processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        """More than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """This process writes the run folder."""
        return self.rank == 0

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global minibatch of ``world_size * B`` rows."""
        if not self.active:
            return x
        size = x.shape[0] // self.world_size
        return x.narrow(0, self.rank * size, size)


def launched_by_torchrun() -> bool:
    """Whether the environment describes more than one process (as torchrun sets it)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str = "auto") -> Workers:
    """Join the process group that torchrun's environment describes; a no-op for one process.

    The backend is nccl when training on CUDA and gloo otherwise. Calling it again returns the
    same workers.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched_by_torchrun():
        return Workers()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    return current()


def current() -> Workers:
    """The workers of the process group already joined, or one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Workers()
    return Workers(dist.get_rank(), dist.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(workers: Workers) -> None:
    """Wait for every process (nothing to wait for with one)."""
    if workers.active:
        dist.barrier()


def local_device(device: torch.device, workers: Workers) -> torch.device:
    """One GPU per process on a node: ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and workers.active:
        return torch.device("cuda", workers.local_rank)
    return device


def wrap(loss_module: nn.Module, workers: Workers, device: torch.device) -> nn.Module:
    """DistributedDataParallel around a module whose call returns the loss (identity for one)."""
    if not workers.active:
        return loss_module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(loss_module, device_ids=ids)


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A seed for one rank's own draws at one step (deterministic, so resuming repeats it)."""
    return (seed * 1_000_003 + step) * 1_009 + rank + 1


class PyroLoss(nn.Module):
    """``elbo.differentiable_loss`` of the VAE's model and guide, as a module DDP can wrap.

    Used for estimators the fast path does not cover; their ELBO must have a
    ``differentiable_loss``.
    """

    def __init__(self, elbo, vae: nn.Module, num_data: int):
        super().__init__()
        self.elbo = elbo
        self.vae = vae
        self.num_data = num_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x,
                                             num_data=self.num_data)
