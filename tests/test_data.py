"""Data: finding IDX files (own, Debian's, none), deterministic splits, binarization, batches."""
import gzip
import struct

import numpy as np
import pytest
import torch

from pipelines.config import DataConfig
from pipelines.data import Batcher, DataUnavailableError, check_available, load_splits
from conftest import FASHION_DIR


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """A 120/40-image MNIST in torchvision's raw layout, written by the test itself."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx(raw / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (120, 28, 28)))
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.arange(120) % 10)
    write_idx(raw / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(raw / "t10k-labels-idx1-ubyte.gz", np.arange(40) % 10)
    return tmp_path


def test_own_idx_files_load_with_deterministic_split(tiny_mnist):
    config = DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20, limit_train=50)
    first, second = (load_splits(config, torch.device("cpu")) for _ in range(2))
    assert (len(first.train), len(first.val), len(first.test)) == (50, 20, 40)
    assert first.train.images.dtype == torch.uint8 and first.image_shape == (1, 28, 28)
    assert first.num_classes == 10 and first.class_names[0] == "0 - zero"
    assert torch.equal(first.val.images, second.val.images)
    assert set(first.source_files) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    assert all(len(digest) == 64 for digest in first.source_files.values())
    other_seed = load_splits(DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20, split_seed=1),
                             torch.device("cpu"))
    assert not torch.equal(first.val.images, other_seed.val.images)


def test_debian_fashion_mnist_is_used_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAE_OFFLINE", "1")
    splits = load_splits(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path), limit_test=100),
                         torch.device("cpu"))
    assert len(splits.train) == 55000 and len(splits.val) == 5000 and len(splits.test) == 100
    assert splits.class_names[9] == "Ankle boot"
    assert splits.source_files["train-images-idx3-ubyte.gz"] == __import__("hashlib").sha256(
        (FASHION_DIR / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()


def test_missing_data_names_the_files_and_the_debian_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAE_OFFLINE", "1")
    with pytest.raises(DataUnavailableError) as error:
        check_available(DataConfig(dataset="kmnist", data_dir=str(tmp_path)))
    message = str(error.value)
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", str(tmp_path / "KMNIST" / "raw")):
        assert name in message
    monkeypatch.setattr("pipelines.data.DEBIAN_DATASET_DIRS",
                        {"fashion-mnist": (tmp_path / "absent", "dataset-fashion-mnist")})
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        check_available(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path)))


def test_binarization_modes(tiny_mnist):
    splits = load_splits(DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20),
                         torch.device("cpu"))
    static = next(Batcher("static", 0, torch.device("cpu")).train_batches(splits.train, 32))[0]
    assert set(static.unique().tolist()) <= {0.0, 1.0}
    plain = next(Batcher("none", 0, torch.device("cpu")).eval_batches(splits.val, 32))[0]
    assert plain.min() >= 0 and plain.max() <= 1 and len(plain.unique()) > 2

    dynamic = Batcher("dynamic", 0, torch.device("cpu"))
    epoch1 = torch.cat([x for x, _ in dynamic.train_batches(splits.train, 1000)])
    epoch2 = torch.cat([x for x, _ in dynamic.train_batches(splits.train, 1000)])
    assert set(epoch1.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(epoch1.sum(0), epoch2.sum(0))  # resampled every epoch
    val1 = next(dynamic.eval_batches(splits.val, 1000))[0]
    val2 = next(dynamic.eval_batches(splits.val, 1000))[0]
    assert torch.equal(val1, val2)  # evaluation sees one fixed draw


def test_an_epoch_visits_every_example_once(tiny_mnist):
    splits = load_splits(DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20),
                         torch.device("cpu"))
    labels = torch.cat([y for _, y in Batcher("none", 3, torch.device("cpu")).train_batches(splits.train, 7)])
    assert sorted(labels.tolist()) == sorted(splits.train.labels.tolist())
