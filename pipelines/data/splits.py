"""Splits: train/validation drawn with ``split_seed`` from the training images, the test set as the
source has it (or, for data without one, a seeded ``test_fraction`` of all images), each kept as a
uint8 tensor on the training device."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cvae.config import ConfigError
from pipelines.config import DataConfig
from pipelines.data.arrays import Decoded


@dataclass
class SplitData:
    name: str
    images: torch.Tensor  # uint8 (N, C, H, W) on the training device
    labels: torch.Tensor  # int64 (N,) on the training device
    # Each example's position in its source file (None: its position in this split) and which file
    # ("train" or "test"): the evaluation binarization of an example depends on these alone.
    example_index: torch.Tensor | None = None
    source: str = "test"

    def __len__(self) -> int:
        return self.labels.shape[0]

    def example_ids(self) -> torch.Tensor:
        if self.example_index is not None:
            return self.example_index
        return torch.arange(len(self), device=self.labels.device)


@dataclass
class DatasetSplits:
    dataset: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    train: SplitData
    val: SplitData
    test: SplitData
    source_files: dict[str, str]  # file name (or "folder") -> SHA-256 of the bytes read
    root: str  # the data root, or the folder or npz file given
    source_dir: str = ""  # where the files were read from
    test_split: dict | None = None  # None: the source's own test set; else how it was drawn

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "source_dir": self.source_dir,
            "source_files_sha256": self.source_files,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "image_shape": list(self.image_shape),
            "sizes": {s.name: len(s) for s in (self.train, self.val, self.test)},
            "test_split": self.test_split or "the source's own test set",
        }


def drawn_test_count(config: DataConfig, total: int) -> int:
    """Images held out as the test set of data without one: test_fraction of them, at least one."""
    return min(max(1, round(total * config.test_fraction)), total - 1)


def checked_sizes(config: DataConfig, n_train: int, n_test: int | None) -> dict[str, int]:
    """The sizes the splits will have (``n_test`` None: drawn from the ``n_train`` images); raises
    ConfigError when the configuration asks for images that do not exist."""
    if n_test is None:
        n_test = drawn_test_count(config, n_train)
        n_train -= n_test
        whose = f"training images of {config.dataset} (after its drawn test set of {n_test})"
    else:
        whose = f"training images of {config.dataset}"
    if config.val_size >= n_train:
        raise ConfigError(f"data.val_size={config.val_size} is not valid; expected fewer than the {n_train} {whose}")
    train = n_train - config.val_size
    return {"train": min(train, config.limit_train) if config.limit_train else train, "val": config.val_size,
            "test": min(n_test, config.limit_test) if config.limit_test else n_test}


def make_splits(config: DataConfig, data: Decoded, root: str, device: torch.device) -> DatasetSplits:
    checked_sizes(config, len(data.train_labels), None if data.test_labels is None else len(data.test_labels))
    images = torch.from_numpy(data.train_images)
    labels = torch.from_numpy(data.train_labels)
    test_split = None
    if data.test_labels is None:  # a seeded share of all images is the test set; the rest is "train"
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.split_seed))
        n_test = drawn_test_count(config, len(labels))
        pool, test_idx = order[n_test:].sort().values, order[:n_test].sort().values
        test_split = {"drawn_from": len(labels), "test_fraction": config.test_fraction, "examples": n_test,
                      "split_seed": config.split_seed}
        test_images, test_labels, test_source = images[test_idx], labels[test_idx], "train"
    else:
        pool, test_idx = torch.arange(len(labels)), torch.arange(len(data.test_labels))
        test_images, test_labels = torch.from_numpy(data.test_images), torch.from_numpy(data.test_labels)
        test_source = "test"
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(config.split_seed))
    val_idx, train_idx = pool[order[: config.val_size]], pool[order[config.val_size:]]
    if config.limit_train:
        train_idx = train_idx[: config.limit_train]
    test_count = config.limit_test or len(test_labels)

    def split(name, imgs, labs, index, source):
        return SplitData(name, imgs.contiguous().to(device), labs.contiguous().to(device), index.to(device), source)

    return DatasetSplits(
        dataset=config.dataset,
        class_names=data.class_names,
        image_shape=data.image_shape,
        train=split("train", images[train_idx], labels[train_idx], train_idx, "train"),
        val=split("val", images[val_idx], labels[val_idx], val_idx, "train"),
        test=split("test", test_images[:test_count], test_labels[:test_count], test_idx[:test_count], test_source),
        source_files=data.source_files,
        root=root,
        source_dir=data.source_dir,
        test_split=test_split,
    )
