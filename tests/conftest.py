"""Every test starts from an empty param store, a fixed seed and Pyro's validation on."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae import Config, Dataset, Split

# CLI tests run pyro-vae in subprocesses; give them one OpenMP thread too (see _fresh_pyro).
os.environ.setdefault("OMP_NUM_THREADS", "1")

#: The real MNIST test split that CI places beside the clone; absent in a user's clone.
SHARED_MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "MNIST" / "raw"


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    # One thread: small test networks gain little from more, and a second OpenMP thread that
    # spins on a busy machine can slow a step down tenfold.
    torch.set_num_threads(1)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def mnist5k_grey() -> Dataset:
    """The embedded real MNIST subset (4,000 train / 1,000 test), grey levels in [0, 1]."""
    from pyro_vae import load_dataset
    from pyro_vae.config import DataConfig

    return load_dataset(DataConfig(dataset="mnist-5k"))


def small_dataset(num_train: int = 256, num_test: int = 64, side: int = 28,
                  seed: int = 0) -> Dataset:
    """Random grey images for tests that only need shapes to be right."""
    g = torch.Generator().manual_seed(seed)
    d = side * side
    def split(n: int) -> Split:
        return Split(torch.rand(n, d, generator=g), torch.zeros(n, dtype=torch.long))

    return Dataset("random", (1, side, side), split(num_train), split(num_test))


def tiny_config(**train) -> Config:
    """A small, fast configuration: 784-64-8, a few epochs, no progress bar."""
    cfg = Config()
    cfg.model.hidden_dims = [64]
    cfg.model.latent_dim = 8
    cfg.train.epochs = 2
    cfg.train.batch_size = 64
    cfg.train.progress = False
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg
