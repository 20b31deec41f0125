"""Datasets: find or fetch the IDX files, read them in place, split them, and serve batches.

The IDX files are read where they lie, compressed (``.gz``) or not: nothing is unpacked or copied,
so a run in any directory leaves no ``./data`` behind when the files are installed elsewhere (e.g.
Debian's dataset-fashion-mnist). torchvision is used only to download missing files. The headers
alone give the split sizes, so a configuration that asks for more images than exist is rejected
before any run is created.

The split tensors stay uint8 and move to the device once; an epoch is a permutation on that
device and a batch is an index slice of it, so no DataLoader worker sits on the hot path.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cvae.config import ConfigError
from pipelines.config import DataConfig
from pipelines.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    folder: str  # torchvision's dataset class, and the folder of its layout (ROOT/<folder>/raw)
    classes: tuple[str, ...]  # as torchvision names them (tests/test_data.py checks they agree)


# Our own table rather than torchvision's dataset classes: importing torchvision costs over a
# second of CPU per process, and it is only needed to download missing files.
DATASETS = {
    "mnist": DatasetInfo("MNIST", ("0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five",
                                   "6 - six", "7 - seven", "8 - eight", "9 - nine")),
    "fashion-mnist": DatasetInfo("FashionMNIST", ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
    "kmnist": DatasetInfo("KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
# Debian packages that ship a dataset's IDX files, so offline machines need no download.
DEBIAN_DATASET_DIRS = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"), "dataset-fashion-mnist"),
}
OFFLINE_ENV = "CVAE_OFFLINE"  # set to 1 to never try a download
STATIC_BINARIZATION_THRESHOLD = 0.5
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these datasets use
GZIP_MAGIC = b"\x1f\x8b"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
IDX_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
# Salts that tell the two IDX files' example 0 apart in the evaluation binarization noise.
_FILE_SALT = {"train": 0x2545F491, "test": 0x6A09E667}


class DataUnavailableError(UserError):
    """The dataset's files are not on disk and could not be downloaded."""


@dataclass
class SplitData:
    name: str
    images: torch.Tensor  # uint8 (N, C, H, W) on the training device
    labels: torch.Tensor  # int64 (N,) on the training device
    # Each example's position in its IDX file (None: its position in this split) and which file
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
    source_files: dict[str, str]  # IDX name -> SHA-256 of its uncompressed content, as read
    root: str
    source_dir: str = ""  # where the IDX files were read from

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
            "image_shape": list(self.image_shape),
            "sizes": {s.name: len(s) for s in (self.train, self.val, self.test)},
        }


def resolve_root(config: DataConfig) -> Path:
    """The data root; a ``data_dir`` the user names must exist (a typo must not fall back to other data)."""
    if config.data_dir:
        given = Path(config.data_dir).expanduser()
        if given.is_file():
            raise ConfigError(f"data.data_dir={config.data_dir!r} is not valid; it is a file, not a directory")
        if not given.is_dir():
            raise ConfigError(f"data.data_dir={config.data_dir!r} is not valid; no such directory (create it "
                              "to download the data into it)")
    return Path(config.data_dir or os.environ.get("CVAE_DATA_DIR") or "data").expanduser().resolve()


def required_files(dataset: str) -> list[str]:
    return [f"{name}.gz" for name in IDX_NAMES]


def _missing_message(dataset: str, root: Path, reason: str) -> str:
    raw = root / DATASETS[dataset].folder / "raw"
    hint = ""
    if dataset in DEBIAN_DATASET_DIRS:
        path, package = DEBIAN_DATASET_DIRS[dataset]
        hint = f"; or install Debian's package {package} (apt-get install {package}), which puts them in {path}"
    return (f"{dataset} data not found and not downloadable ({reason}). Put {', '.join(required_files(dataset))} "
            f"in {raw} (choose the root with --data-dir or $CVAE_DATA_DIR){hint}.")


def _candidate_dirs(dataset: str, root: Path) -> list[Path]:
    dirs = [root / DATASETS[dataset].folder / "raw", root]
    if dataset in DEBIAN_DATASET_DIRS:
        dirs.append(DEBIAN_DATASET_DIRS[dataset][0])
    return dirs


def _find_in(directory: Path) -> dict[str, Path] | None:
    """IDX name -> file in ``directory``, compressed or not; None unless all four are there."""
    found = {}
    for name in IDX_NAMES:
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                found[name] = candidate
                break
        else:
            return None
    return found


def _download(dataset: str, root: Path) -> dict[str, Path]:
    """Fetch the compressed IDX files into ROOT/<Dataset>/raw with torchvision (MD5-checked,
    first mirror that answers). They stay compressed: they are read in place like any others."""
    from torchvision import datasets as tv_datasets
    from torchvision.datasets.utils import download_url

    cls = getattr(tv_datasets, DATASETS[dataset].folder)
    raw = root / DATASETS[dataset].folder / "raw"
    for filename, md5 in cls.resources:
        if (raw / filename).is_file():
            continue
        errors = []
        for mirror in cls.mirrors:
            try:
                download_url(f"{mirror}{filename}", str(raw), filename=filename, md5=md5)
                break
            except Exception as error:  # torchvision raises RuntimeError/URLError variants per mirror
                errors.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        else:
            raise RuntimeError(f"cannot download {filename}: {'; '.join(errors)}")
    found = _find_in(raw)
    if found is None:
        raise RuntimeError(f"the download left {raw} incomplete")
    return found


def ensure_files(dataset: str, root: Path) -> dict[str, Path]:
    """IDX name -> the file to read for it; downloads them (compressed) when none are found.

    Looked for in ROOT/<Dataset>/raw (torchvision's layout), in ROOT, and in a Debian package's
    directory; a directory counts when it holds all four files, each as ``.gz`` or uncompressed.
    """
    for directory in _candidate_dirs(dataset, root):
        found = _find_in(directory)
        if found:
            return found
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise DataUnavailableError(_missing_message(dataset, root, f"{OFFLINE_ENV} is set"))
    try:
        return _download(dataset, root)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataUnavailableError(_missing_message(dataset, root, reason)) from None


def _compressed(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _open(path: Path):
    """Open an IDX file for reading whether or not it is gzip-compressed (judged by its bytes)."""
    return gzip.open(path, "rb") if _compressed(path) else open(path, "rb")


@contextmanager
def _reading(path: Path):
    """A file that cannot be read (cut short, damaged) named in one line instead of a traceback."""
    try:
        yield
    except EOFError as error:
        raise DataUnavailableError(f"{path} cannot be read: {error}; the file is truncated") from None
    except (OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataUnavailableError(f"{path} cannot be read: {error}; the file is damaged") from None


def _length_message(path: Path, shape: tuple[int, ...], data_bytes: int) -> str:
    return (f"{path} holds {data_bytes} data bytes; its header declares {'x'.join(map(str, shape))} = "
            f"{int(np.prod(shape))}: the file is truncated or damaged")


def check_intact(path: Path, shape: tuple[int, ...]) -> None:
    """Raise unless ``path`` holds as many bytes as its header declares. Cheap: an uncompressed
    file's size, or a gzip file's trailer (its length mod 2**32); only when the trailer disagrees is
    the file decompressed, to say what is wrong (a truncated file ends without a trailer)."""
    expected = 4 + 4 * len(shape) + int(np.prod(shape))
    with _reading(path):
        if not _compressed(path):
            actual = path.stat().st_size
        else:
            with open(path, "rb") as handle:
                handle.seek(-4, os.SEEK_END)
                if struct.unpack("<I", handle.read(4))[0] == expected % 2**32:
                    return
            actual = 0
            with gzip.open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    actual += len(chunk)
    if actual != expected:
        raise DataUnavailableError(_length_message(path, shape, actual - (expected - int(np.prod(shape)))))


def _parse_header(head: bytes, path: Path) -> tuple[int, ...]:
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] != IDX_UBYTE:
        raise DataUnavailableError(f"{path} is not an IDX file of unsigned bytes (header {head[:4].hex()})")
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        raise DataUnavailableError(f"{path} is truncated: its IDX header is incomplete")
    return struct.unpack(f">{ndim}I", head[4: 4 + 4 * ndim])


def idx_shape(path: Path) -> tuple[int, ...]:
    """The array shape an IDX file declares, from its header only (a few bytes decompressed)."""
    with _reading(path), _open(path) as handle:
        head = handle.read(4)
        return _parse_header(head + handle.read(4 * head[3] if len(head) == 4 else 0), path)


def read_idx(path: Path) -> tuple[np.ndarray, str]:
    """(array, SHA-256 of the uncompressed IDX bytes): the same data gives the same checksum
    whether it was read from a ``.gz`` or from an extracted copy."""
    with _reading(path), _open(path) as handle:
        content = handle.read()
    shape = _parse_header(content[: 4 + 4 * content[3]] if len(content) >= 4 else content, path)
    offset = 4 + 4 * len(shape)
    expected = int(np.prod(shape))
    if len(content) - offset != expected:
        raise DataUnavailableError(_length_message(path, shape, len(content) - offset))
    array = np.frombuffer(content, dtype=np.uint8, offset=offset).reshape(shape)
    return array, hashlib.sha256(content).hexdigest()


def split_sizes(config: DataConfig) -> dict[str, int]:
    """The sizes the splits will have, from the IDX headers; raises ConfigError when the
    configuration asks for images that do not exist (e.g. a validation split as large as the
    training file). Cheap: no image is read."""
    return _checked_sizes(config, ensure_files(config.dataset, resolve_root(config)))


def _checked_sizes(config: DataConfig, files: dict[str, Path]) -> dict[str, int]:
    shapes = {name: idx_shape(files[name]) for name in IDX_NAMES}
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        if shapes[images][0] != shapes[labels][0] or len(shapes[images]) != 3 or len(shapes[labels]) != 1:
            raise DataUnavailableError(f"{files[images]} and {files[labels]} do not match: "
                                       f"shapes {shapes[images]} and {shapes[labels]}")
    n_train, n_test = shapes[TRAIN_LABELS][0], shapes[TEST_LABELS][0]
    if config.val_size >= n_train:
        raise ConfigError(f"data.val_size={config.val_size} is not valid; expected fewer than the "
                          f"{n_train} training images of {config.dataset}")
    train = n_train - config.val_size
    return {"train": min(train, config.limit_train) if config.limit_train else train, "val": config.val_size,
            "test": min(n_test, config.limit_test) if config.limit_test else n_test}


def dataset_shape(config: DataConfig) -> tuple[tuple[int, int, int], int]:
    """((channels, height, width), number of classes) of the dataset, from its IDX header."""
    files = ensure_files(config.dataset, resolve_root(config))
    _, height, width = idx_shape(files[TRAIN_IMAGES])
    return (1, height, width), len(DATASETS[config.dataset].classes)


def check_available(config: DataConfig) -> None:
    """Fail early (before any run is opened) when the data cannot be had, a file is cut short, or
    the configuration asks for more images than it holds; warn when a limit exceeds the data.
    Checksums come later, when the files are read."""
    files = ensure_files(config.dataset, resolve_root(config))
    sizes = _checked_sizes(replace(config, limit_train=0, limit_test=0), files)  # all there is
    for name in IDX_NAMES:
        check_intact(files[name], idx_shape(files[name]))
    if config.limit_train > sizes["train"]:
        log.warning(f"data.limit_train={config.limit_train} is more than the {sizes['train']} train images of "
                    f"{config.dataset} (less data.val_size={config.val_size}): using all {sizes['train']}")
    if config.limit_test > sizes["test"]:
        log.warning(f"data.limit_test={config.limit_test} is more than the {sizes['test']} test images of "
                    f"{config.dataset}: using all {sizes['test']}")


def load_splits(config: DataConfig, device: torch.device) -> DatasetSplits:
    root = resolve_root(config)
    files = ensure_files(config.dataset, root)
    _checked_sizes(config, files)  # the same checks, and messages, as before a run
    arrays, sources = {}, {}
    for name in IDX_NAMES:
        arrays[name], sources[name] = read_idx(files[name])
    images = torch.from_numpy(arrays[TRAIN_IMAGES].copy()).unsqueeze(1)  # uint8 (N, 1, H, W)
    labels = torch.from_numpy(arrays[TRAIN_LABELS].astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.split_seed))
    val_idx, train_idx = order[: config.val_size], order[config.val_size:]
    if config.limit_train:
        train_idx = train_idx[: config.limit_train]
    test_count = config.limit_test or len(arrays[TEST_LABELS])
    test_images = torch.from_numpy(arrays[TEST_IMAGES][:test_count].copy()).unsqueeze(1)
    test_labels = torch.from_numpy(arrays[TEST_LABELS][:test_count].astype(np.int64))

    def split(name, imgs, labs, index, source):
        return SplitData(name, imgs.contiguous().to(device), labs.contiguous().to(device),
                         index.to(device), source)

    return DatasetSplits(
        dataset=config.dataset,
        class_names=DATASETS[config.dataset].classes,
        image_shape=tuple(images.shape[1:]),
        train=split("train", images[train_idx], labels[train_idx], train_idx, "train"),
        val=split("val", images[val_idx], labels[val_idx], val_idx, "train"),
        test=split("test", test_images, test_labels, torch.arange(len(test_labels)), "test"),
        source_files=sources,
        root=str(root),
        source_dir=str(files[TRAIN_IMAGES].parent),
    )


_MASK32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """(h * constant) mod 2**32 for h < 2**32, in 16-bit halves so int64 never overflows."""
    low, high = h & 0xFFFF, h >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def evaluation_noise(example_ids: torch.Tensor, pixels: int, source: str) -> torch.Tensor:
    """Uniform [0, 1) noise, (N, pixels), a pure function of (IDX file, example index, pixel).

    Evaluation's dynamic binarization compares against it, so an example is binarized the same
    way whatever the split's size (``--limit-test``, ``--val-size``), batch, device or seed.
    """
    keys = _mix32((_mix32(example_ids.long() & _MASK32) + _FILE_SALT[source]) & _MASK32)
    pixel = torch.arange(pixels, device=example_ids.device, dtype=torch.int64)
    hashed = _mix32(keys[:, None] ^ _mix32(pixel + 1)[None, :])
    return (hashed >> 8).float() * (1.0 / (1 << 24))  # 24 bits: exact in float32


def as_unit_floats(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float images pass through."""
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()


class Batcher:
    """Turns uint8 device tensors into float batches, binarized as configured.

    Evaluation batches with dynamic binarization use one fixed Bernoulli draw per example (a hash
    of its index in its IDX file), so validation and test losses are comparable across epochs,
    runs and ``--limit-test`` values.
    """

    def __init__(self, binarize: str, seed: int, device: torch.device):
        self.binarize = binarize
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._eval_noise: dict[int, tuple[SplitData, torch.Tensor]] = {}

    def _noise(self, split: SplitData, pixels: int) -> torch.Tensor:
        """The split's evaluation noise, computed once per split (hashing costs ~0.1 s per 1000 images)."""
        cached = self._eval_noise.get(id(split))
        if cached is None or cached[0] is not split:
            ids = split.example_ids().to(self.device)
            cached = self._eval_noise[id(split)] = (split, evaluation_noise(ids, pixels, split.source))
        return cached[1]

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
        noise = self._noise(split, split.images[0].numel()) if self.binarize == "dynamic" else None
        for start in range(0, len(split), batch_size):
            x = self._to_float(split.images[start: start + batch_size])
            if noise is not None:
                x = (noise[start: start + batch_size].view_as(x) < x).float()
            yield x, split.labels[start: start + batch_size]
