"""CIFAR-10 and SVHN, in torchvision's layout under the data root (``ROOT/cifar-10-batches-py/``,
``ROOT/train_32x32.mat`` and ``ROOT/test_32x32.mat``): downloaded by torchvision when missing
(never with ``CVAE_OFFLINE=1``), decoded by torchvision's dataset classes (which check the files'
MD5 first) once into the data cache. Identity: the SHA-256 of each file torchvision reads.

Our own table of the files, as for the IDX sets: torchvision is imported only to download or decode
(tests/test_own_images.py checks the table against torchvision's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.config import DataConfig
from pipelines.data.arrays import Decoded
from pipelines.data.cache import cached
from pipelines.data.digests import file_sha256
from pipelines.data.images import arrays_to_nchw, target_size
from pipelines.data.images import settings as image_settings
from pipelines.data.locations import OFFLINE_ENV, DataUnavailableError, first_line, offline


@dataclass(frozen=True)
class TorchvisionSet:
    cls: str  # torchvision's dataset class
    folder: str  # where under the data root torchvision's layout puts the files ("" = the root itself)
    files: tuple[str, ...]  # every file torchvision reads, train and test
    classes: tuple[str, ...]
    archive: str  # what a user downloads by hand


DATASETS = {
    "cifar10": TorchvisionSet("CIFAR10", "cifar-10-batches-py",
                              (*(f"data_batch_{k}" for k in range(1, 6)), "test_batch", "batches.meta"),
                              ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"), "cifar-10-python.tar.gz, extracted"),
    # SVHN's labels run 0..9 (torchvision turns the files' 10 into 0): the digit shown.
    "svhn": TorchvisionSet("SVHN", "", ("train_32x32.mat", "test_32x32.mat"), tuple(map(str, range(10))),
                           "train_32x32.mat and test_32x32.mat"),
}


def _missing_message(name: str, directory: Path, reason: str) -> str:
    return (f"{name} data not found and not downloadable ({reason}). Put {DATASETS[name].archive} in "
            f"{directory} (choose the root with --data-dir or $CVAE_DATA_DIR).")


def _dataset(name: str, root: Path, train: bool, download: bool):
    from torchvision import datasets

    info = DATASETS[name]
    cls = getattr(datasets, info.cls)
    if info.cls == "SVHN":
        return cls(str(root), split="train" if train else "test", download=download)
    return cls(str(root), train=train, download=download)


def ensure_files(name: str, root: Path) -> list[Path]:
    info = DATASETS[name]
    directory = root / info.folder
    paths = [directory / file for file in info.files]
    if all(path.is_file() for path in paths):
        return paths
    if offline():
        raise DataUnavailableError(_missing_message(name, directory, f"{OFFLINE_ENV} is set"))
    try:
        for train in (True, False):
            _dataset(name, root, train, download=True)
    except Exception as error:  # torchvision raises RuntimeError/URLError variants
        raise DataUnavailableError(_missing_message(name, directory, first_line(error))) from None
    return paths


def _decode(config: DataConfig, root: Path) -> Decoded:
    name = config.dataset
    arrays = {}
    for train in (True, False):
        try:
            dataset = _dataset(name, root, train, download=False)
        except RuntimeError as error:  # torchvision's MD5 check: "Dataset not found or corrupted"
            raise DataUnavailableError(f"{name} files in {root / DATASETS[name].folder} are damaged or "
                                       f"incomplete ({first_line(error)})") from None
        data = dataset.data if DATASETS[name].cls != "SVHN" else dataset.data.transpose(0, 2, 3, 1)  # (N, H, W, C)
        labels = dataset.targets if hasattr(dataset, "targets") else dataset.labels
        arrays[train] = (arrays_to_nchw(np.asarray(data, dtype=np.uint8), config.image_channels,
                                               target_size(config)), np.asarray(labels, dtype=np.int64))
    return Decoded(*arrays[True], *arrays[False], DATASETS[name].classes, {}, "")


def read(config: DataConfig, root: Path) -> Decoded:
    paths = ensure_files(config.dataset, root)
    source_files = {path.name: file_sha256(path) for path in paths}
    return cached(config.dataset, source_files, image_settings(config), str(paths[0].parent),
                  lambda: _decode(config, root), config.dataset)
