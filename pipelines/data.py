"""Datasets: find or fetch the IDX files, split them, and serve batches from the training device.

The split tensors stay uint8 and move to the device once; an epoch is a permutation on that
device and a batch is an index slice of it, so no DataLoader worker sits on the hot path.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torchvision import datasets as tv_datasets
from torchvision.datasets.utils import extract_archive

from cvae.config import ConfigError
from pipelines.config import DataConfig

DATASET_CLASSES = {
    "mnist": tv_datasets.MNIST,
    "fashion-mnist": tv_datasets.FashionMNIST,
    "kmnist": tv_datasets.KMNIST,
}
# Debian packages that ship a dataset's IDX files, so offline machines need no download.
DEBIAN_DATASET_DIRS = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist"),
}
OFFLINE_ENV = "CVAE_OFFLINE"
STATIC_BINARIZATION_THRESHOLD = 0.5  # set to 1 to never try a download


class DataUnavailableError(RuntimeError):
    """The dataset's files are not on disk and could not be downloaded."""


@dataclass
class SplitData:
    name: str
    images: torch.Tensor  # uint8 (N, C, H, W) on the training device
    labels: torch.Tensor  # int64 (N,) on the training device

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class DatasetSplits:
    dataset: str
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]
    train: SplitData
    val: SplitData
    test: SplitData
    source_files: dict[str, str]  # file name -> SHA-256 of the file that was read
    root: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def summary(self) -> dict:
        return {
            "dataset": self.dataset,
            "root": self.root,
            "source_files_sha256": self.source_files,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "sizes": {s.name: len(s) for s in (self.train, self.val, self.test)},
        }


def resolve_root(config: DataConfig) -> Path:
    return Path(config.data_dir or os.environ.get("CVAE_DATA_DIR") or "data").expanduser().resolve()


def required_files(dataset: str) -> list[str]:
    return [os.path.basename(url) for url, _ in DATASET_CLASSES[dataset].resources]


def _missing_message(dataset: str, root: Path, reason: str) -> str:
    raw = root / DATASET_CLASSES[dataset].__name__ / "raw"
    hint = ""
    if dataset in DEBIAN_DATASET_DIRS:
        path, package = DEBIAN_DATASET_DIRS[dataset]
        hint = f"; or install Debian's package {package} (apt-get install {package}), which puts them in {path}"
    return (f"{dataset} data not found and not downloadable ({reason}). Put {', '.join(required_files(dataset))} "
            f"in {raw} (choose the root with --data-dir or $CVAE_DATA_DIR){hint}.")


def _gz_candidates(dataset: str, root: Path) -> list[Path]:
    dirs = [root / DATASET_CLASSES[dataset].__name__ / "raw", root]
    if dataset in DEBIAN_DATASET_DIRS:
        dirs.append(DEBIAN_DATASET_DIRS[dataset][0])
    return dirs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_files(dataset: str, root: Path) -> list[Path]:
    """Make torchvision's raw folder complete under ``root``; return the source files read.

    Archives found locally (torchvision layout, flat, or a Debian package) are extracted; their
    MD5s are not checked against torchvision's because repackagers recompress them (torchvision's
    IDX reader still checks every file's header and length). Otherwise torchvision downloads them.
    """
    cls = DATASET_CLASSES[dataset]
    raw = root / cls.__name__ / "raw"
    archives = {}
    for directory in _gz_candidates(dataset, root):
        found = {name: directory / name for name in required_files(dataset)}
        if all(p.is_file() for p in found.values()):
            archives = found
            break
    if archives:
        for path in archives.values():
            extracted = raw / path.name[: -len(".gz")]
            if not extracted.is_file():
                raw.mkdir(parents=True, exist_ok=True)
                extract_archive(str(path), str(raw))
        return list(archives.values())

    unpacked = {name: raw / name[: -len(".gz")] for name in required_files(dataset)}
    if all(p.is_file() for p in unpacked.values()):
        return list(unpacked.values())
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise DataUnavailableError(_missing_message(dataset, root, f"{OFFLINE_ENV} is set"))
    try:
        cls(str(root), train=True, download=True)
    except Exception as error:  # torchvision raises RuntimeError/URLError variants per mirror
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataUnavailableError(_missing_message(dataset, root, reason)) from None
    return [raw / name for name in required_files(dataset) if (raw / name).is_file()]


def check_available(config: DataConfig) -> None:
    """Fail early (before any run is opened) when the data cannot be had; checksums come later."""
    ensure_files(config.dataset, resolve_root(config))


def load_splits(config: DataConfig, device: torch.device) -> DatasetSplits:
    root = resolve_root(config)
    sources = {path.name: _sha256(path) for path in ensure_files(config.dataset, root)}
    cls = DATASET_CLASSES[config.dataset]
    train_full = cls(str(root), train=True, download=False)
    test_full = cls(str(root), train=False, download=False)

    images = train_full.data.unsqueeze(1)  # uint8 (N, 1, H, W)
    labels = train_full.targets.long()
    if config.val_size >= len(labels):
        raise ConfigError(f"data.val_size={config.val_size} is not valid; expected fewer than the "
                          f"{len(labels)} training images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.split_seed))
    val_idx, train_idx = order[: config.val_size], order[config.val_size:]
    if config.limit_train:
        train_idx = train_idx[: config.limit_train]
    test_images, test_labels = test_full.data.unsqueeze(1), test_full.targets.long()
    if config.limit_test:
        test_images, test_labels = test_images[: config.limit_test], test_labels[: config.limit_test]

    def split(name, imgs, labs):
        return SplitData(name, imgs.contiguous().to(device), labs.contiguous().to(device))

    return DatasetSplits(
        dataset=config.dataset,
        class_names=tuple(cls.classes),
        image_shape=tuple(images.shape[1:]),
        train=split("train", images[train_idx], labels[train_idx]),
        val=split("val", images[val_idx], labels[val_idx]),
        test=split("test", test_images, test_labels),
        source_files=sources,
        root=str(root),
    )


def as_unit_floats(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float images pass through."""
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()


class Batcher:
    """Turns uint8 device tensors into float batches, binarized as configured.

    Evaluation batches with dynamic binarization use one fixed Bernoulli draw per split (seeded)
    so validation and test losses are comparable across epochs and runs.
    """

    def __init__(self, binarize: str, seed: int, device: torch.device):
        self.binarize = binarize
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._eval_noise: dict[str, torch.Tensor] = {}

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        x = as_unit_floats(images)
        if self.binarize == "static":
            return (x >= STATIC_BINARIZATION_THRESHOLD).float()
        return x

    def train_batches(self, split: SplitData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(split), device=self.device, generator=self.generator)
        for start in range(0, len(split), batch_size):
            idx = order[start: start + batch_size]
            x = self._to_float(split.images[idx])
            if self.binarize == "dynamic":
                x = torch.bernoulli(x, generator=self.generator)
            yield x, split.labels[idx]

    def eval_batches(self, split: SplitData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.binarize == "dynamic" and split.name not in self._eval_noise:
            fixed = torch.Generator(device=self.device).manual_seed(len(split))
            self._eval_noise[split.name] = torch.rand(split.images.shape, device=self.device, generator=fixed)
        for start in range(0, len(split), batch_size):
            x = self._to_float(split.images[start: start + batch_size])
            if self.binarize == "dynamic":
                x = (self._eval_noise[split.name][start: start + batch_size] < x).float()
            yield x, split.labels[start: start + batch_size]
