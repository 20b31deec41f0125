"""Data: finding IDX files (own, Debian's, none) and reading them in place, deterministic splits,
binarization, batches, and the split sizes known from the headers before any run."""
import gzip
import hashlib
from dataclasses import replace

import pytest
import torch

from conftest import FASHION_DIR
from cvae.config import ConfigError
from pipelines.config import DataConfig
from pipelines.data import Batcher, DataUnavailableError, check_available, load_splits, split_sizes


def test_own_idx_files_load_with_deterministic_split(tiny_mnist):
    config = DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20, limit_train=50)
    first, second = (load_splits(config, torch.device("cpu")) for _ in range(2))
    assert (len(first.train), len(first.val), len(first.test)) == (50, 20, 40)
    assert first.train.images.dtype == torch.uint8 and first.image_shape == (1, 28, 28)
    assert first.num_classes == 10 and first.class_names[0] == "0 - zero"
    assert torch.equal(first.val.images, second.val.images)
    assert set(first.source_files) == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}
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
    with gzip.open(FASHION_DIR / "train-images-idx3-ubyte.gz") as handle:  # the bytes read, uncompressed
        assert splits.source_files["train-images-idx3-ubyte"] == hashlib.sha256(handle.read()).hexdigest()
    assert splits.summary()["source_dir"] == str(FASHION_DIR)
    assert not any(tmp_path.iterdir()), "nothing is unpacked or copied into the data root"


def test_a_run_in_any_directory_reads_installed_files_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CVAE_DATA_DIR", raising=False)
    monkeypatch.setenv("CVAE_OFFLINE", "1")
    splits = load_splits(DataConfig(dataset="fashion-mnist", limit_train=10, limit_test=10), torch.device("cpu"))
    assert len(splits.test) == 10
    assert list(tmp_path.iterdir()) == [], "no ./data (or anything else) appears in the working directory"


def test_compressed_and_extracted_files_give_the_same_data_and_checksums(tiny_mnist, tmp_path_factory):
    extracted = tmp_path_factory.mktemp("extracted")
    for path in (tiny_mnist / "MNIST" / "raw").iterdir():
        with gzip.open(path) as handle:
            (extracted / path.name[: -len(".gz")]).write_bytes(handle.read())
    config = DataConfig(dataset="mnist", val_size=20)
    from_gz = load_splits(replace(config, data_dir=str(tiny_mnist)), torch.device("cpu"))
    from_raw = load_splits(replace(config, data_dir=str(extracted)), torch.device("cpu"))
    assert from_gz.source_files == from_raw.source_files
    assert torch.equal(from_gz.train.images, from_raw.train.images) and torch.equal(from_gz.test.labels,
                                                                                    from_raw.test.labels)


def test_split_sizes_come_from_the_headers_and_reject_an_impossible_validation_split(tiny_mnist):
    config = DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20, limit_train=50, limit_test=30)
    assert split_sizes(config) == {"train": 50, "val": 20, "test": 30}
    with pytest.raises(ConfigError, match=r"^data.val_size=120 is not valid; expected fewer than the 120 training"):
        check_available(replace(config, val_size=120))


def test_a_truncated_file_is_named_before_any_image_is_read(tiny_mnist):
    """A download cut short, compressed or not, and a file rewritten shorter than its header says:
    refused by the check made before a run exists, naming the file."""
    raw = tiny_mnist / "MNIST" / "raw"
    config = DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20)
    images = raw / "train-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    images.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataUnavailableError, match=f"^{images} cannot be read: Compressed file ended before the "
                                                   "end-of-stream marker was reached; the file is truncated"):
        check_available(config)
    with gzip.open(images, "wb") as handle:  # a whole gzip stream, but of fewer bytes than declared
        handle.write(gzip.decompress(whole)[:16 + 100])
    with pytest.raises(DataUnavailableError, match=f"^{images} holds 100 data bytes; its header declares "
                                                   "120x28x28 = 94080: the file is truncated or damaged"):
        check_available(config)
    images.write_bytes(whole)
    labels = raw / "t10k-labels-idx1-ubyte.gz"
    labels.with_suffix("").write_bytes(gzip.decompress(labels.read_bytes())[:-1])  # uncompressed, one byte short
    labels.unlink()
    with pytest.raises(DataUnavailableError, match=f"^{labels.with_suffix('')} holds 39 data bytes"):
        check_available(config)


def test_limits_above_the_data_are_told_and_the_whole_split_is_used(tiny_mnist, caplog):
    config = DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20, limit_train=1000, limit_test=50)
    with caplog.at_level("WARNING", logger="pipelines.data"):
        check_available(config)
    assert caplog.messages == [
        "data.limit_train=1000 is more than the 100 train images of mnist (less data.val_size=20): using all 100",
        "data.limit_test=50 is more than the 40 test images of mnist: using all 40"]
    splits = load_splits(config, torch.device("cpu"))
    assert (len(splits.train), len(splits.test)) == (100, 40)


def test_a_data_dir_that_does_not_exist_is_refused_not_passed_over(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAE_OFFLINE", "1")  # Debian's Fashion-MNIST would otherwise be used instead
    missing = tmp_path / "typo"
    with pytest.raises(ConfigError, match=f"^data.data_dir='{missing}' is not valid; no such directory"):
        check_available(DataConfig(dataset="fashion-mnist", data_dir=str(missing)))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not valid; it is a file"):
        check_available(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "file")))


def test_a_file_that_is_not_idx_is_named(tiny_mnist):
    (tiny_mnist / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"<html>"))
    with pytest.raises(DataUnavailableError, match="t10k-labels-idx1-ubyte.gz is not an IDX file"):
        check_available(DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20))


def test_missing_data_names_the_files_and_the_debian_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("CVAE_OFFLINE", "1")
    with pytest.raises(DataUnavailableError) as error:
        check_available(DataConfig(dataset="kmnist", data_dir=str(tmp_path)))
    message = str(error.value)
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", str(tmp_path / "KMNIST" / "raw")):
        assert name in message
    monkeypatch.setattr("pipelines.data.sources.idx.DEBIAN_DATASET_DIRS",
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


def test_dynamic_binarization_of_an_example_does_not_depend_on_the_split_size(tiny_mnist):
    config = DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20)
    whole = load_splits(config, torch.device("cpu"))
    limited = load_splits(replace(config, limit_test=7), torch.device("cpu"))
    first = next(Batcher("dynamic", 0, torch.device("cpu")).eval_batches(whole.test, 1000))[0]
    again = next(Batcher("dynamic", 5, torch.device("cpu")).eval_batches(limited.test, 3))[0]
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(first[:3], again)  # same examples, same pixels on, whatever limit_test and seed
    assert not torch.equal(first[0], first[1])
    # The validation split's examples keep their draw when the split is larger.
    bigger = load_splits(replace(config, val_size=30), torch.device("cpu"))
    val_small = torch.cat([x for x, _ in Batcher("dynamic", 0, torch.device("cpu")).eval_batches(whole.val, 8)])
    val_big = torch.cat([x for x, _ in Batcher("dynamic", 0, torch.device("cpu")).eval_batches(bigger.val, 8)])
    position = {int(i): k for k, i in enumerate(bigger.val.example_index)}
    shared = [(k, position[i]) for k, i in enumerate(whole.val.example_index.tolist()) if i in position]
    assert len(shared) == 20
    assert all(torch.equal(val_small[k], val_big[j]) for k, j in shared)


def test_our_dataset_table_agrees_with_torchvision():
    """pipelines.data keeps its own table so that training never imports torchvision."""
    from torchvision import datasets

    from pipelines.data import DATASETS

    for name, info in DATASETS.items():
        cls = getattr(datasets, info.folder)
        assert info.classes == tuple(cls.classes), name
        assert sorted(f for f, _ in cls.resources) == sorted(f"{n}.gz" for n in
                                                                ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")), name
