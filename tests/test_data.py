import gzip
import hashlib

import numpy as np
import pytest
import torch
from conftest import SHARED_MNIST

from pyro_vae import DataError, load_dataset, read_idx
from pyro_vae.config import DataConfig
from pyro_vae.data import (
    binarize_batch,
    binarize_fixed,
    prepare_observations,
    read_idx_split,
    write_idx,
)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / f"a{suffix}", images)
    np.testing.assert_array_equal(read_idx(tmp_path / f"a{suffix}"), images)


def test_idx_header_is_big_endian(tmp_path):
    write_idx(tmp_path / "l", np.arange(3, dtype=np.uint8))
    raw = (tmp_path / "l").read_bytes()
    assert raw[:8] == bytes([0, 0, 0x08, 1, 0, 0, 0, 3])


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x08\x03\x00\x00" + bytes(20))
    with pytest.raises(DataError, match="wrong magic number"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "trunc", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "trunc").write_bytes((tmp_path / "trunc").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "trunc")


def test_idx_split_from_a_folder(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(5, dtype=np.uint8))
    images, labels = read_idx_split(tmp_path, "train")
    assert images.shape == (5, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    with pytest.raises(DataError, match="5 train images but 4 labels"):
        read_idx_split(tmp_path, "train")


def test_data_dir_loader_reads_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("t10k", 6)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz",
                  rng.integers(0, 10, n, dtype=np.uint8))
    data = load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path)))
    assert data.train.images.shape == (12, 784) and data.test.images.shape == (6, 784)
    assert data.train.images.dtype == torch.float32 and data.train.images.max() <= 1


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="../shared/data (real MNIST test split) "
                    "is only beside the CI clone, not in a user's clone")
def test_real_mnist_test_split():
    md5 = dict(line.split()[::-1] for line in
               (SHARED_MNIST.parent / "MD5SUMS").read_text().splitlines() if line.strip())
    path = SHARED_MNIST / "t10k-images-idx3-ubyte.gz"
    key = next(k for k in md5 if k.endswith("t10k-images-idx3-ubyte.gz"))
    assert hashlib.md5(path.read_bytes()).hexdigest() == md5[key]
    images, labels = read_idx_split(SHARED_MNIST, "t10k")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # the same bytes, decompressed by hand
    raw = gzip.decompress(path.read_bytes())
    np.testing.assert_array_equal(images.reshape(-1), np.frombuffer(raw, np.uint8, offset=16))


def test_embedded_dataset_split_is_fixed_and_balanced(mnist5k_grey):
    data = mnist5k_grey
    assert len(data.train) == 4000 and len(data.test) == 1000
    assert data.image_shape == (1, 28, 28)
    counts = torch.bincount(data.test.labels, minlength=10)
    assert counts.min() >= 70 and counts.sum() == 1000
    again = load_dataset(DataConfig(dataset="mnist-5k"))
    assert torch.equal(again.test.images, data.test.images)


def test_validation_split(mnist5k_grey):
    data = load_dataset(DataConfig(dataset="mnist-5k", val_fraction=0.1))
    assert len(data.val) == 400 and len(data.train) == 3600
    # validation and training images are disjoint subsets of the original training set
    rows = {tuple(r) for r in (data.val.images * 255).round().to(torch.uint8)[:, ::7].tolist()}
    assert not any(tuple(r) in rows for r in
                   (data.train.images * 255).round().to(torch.uint8)[:50, ::7].tolist())


def test_binarization_modes(mnist5k_grey):
    x = mnist5k_grey.train.images[:64]
    static = binarize_fixed(x, "static", 0.5)
    assert set(static.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(static, (x > 0.5).float())
    a, b = binarize_fixed(x, "static-sample", seed=3), binarize_fixed(x, "static-sample", seed=3)
    assert torch.equal(a, b)                                   # fixed: the same draw every time
    d1, d2 = binarize_batch(x, "dynamic"), binarize_batch(x, "dynamic")
    assert not torch.equal(d1, d2)                             # dynamic: fresh draws
    assert set(d1.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(binarize_batch(x, "static"), x)
    # dynamic keeps training images grey and fixes one draw of the test images
    cfg = DataConfig(binarize="dynamic")
    prepared = prepare_observations(mnist5k_grey, cfg)
    assert torch.equal(prepared.train.images, mnist5k_grey.train.images)
    assert set(prepared.test.images.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(prepared.test.images, prepare_observations(mnist5k_grey, cfg).test.images)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(dataset="mnist", data_dir=str(tmp_path / "no" / "such")))


def test_download_failure_names_the_folder_and_the_alternatives(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz",
                           urllib.error.URLError("Temporary failure in name resolution"))

    monkeypatch.setattr(torchvision.datasets, "KMNIST", offline)
    (tmp_path / "kmnist").mkdir()
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="kmnist", data_dir=str(tmp_path / "kmnist")))
    message = str(info.value)
    assert str(tmp_path / "kmnist") in message
    assert "data.data_dir" in message and "mnist-5k" in message
    assert "\n" not in message
