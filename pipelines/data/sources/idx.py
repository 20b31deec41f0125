"""The IDX datasets (MNIST, Fashion-MNIST, KMNIST): find or fetch their files and read them in place.

The IDX files are read where they lie, compressed (``.gz``) or not: nothing is unpacked or copied,
so a run in any directory leaves no ``./data`` behind when the files are installed elsewhere (e.g.
Debian's dataset-fashion-mnist). torchvision is used only to download missing files. The headers
alone give the split sizes, so a configuration that asks for more images than exist is rejected
before any run is created.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.config import DataConfig
from pipelines.data.arrays import Decoded
from pipelines.data.locations import OFFLINE_ENV, DataUnavailableError, first_line, offline


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
IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes, the only one these datasets use
GZIP_MAGIC = b"\x1f\x8b"
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
IDX_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)



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
    if offline():
        raise DataUnavailableError(_missing_message(dataset, root, f"{OFFLINE_ENV} is set"))
    try:
        return _download(dataset, root)
    except Exception as error:
        raise DataUnavailableError(_missing_message(dataset, root, first_line(error))) from None


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


def file_counts(files: dict[str, Path]) -> tuple[int, int]:
    """(training images, test images), from the headers; raises when images and labels disagree."""
    shapes = {name: idx_shape(files[name]) for name in IDX_NAMES}
    for images, labels in ((TRAIN_IMAGES, TRAIN_LABELS), (TEST_IMAGES, TEST_LABELS)):
        if shapes[images][0] != shapes[labels][0] or len(shapes[images]) != 3 or len(shapes[labels]) != 1:
            raise DataUnavailableError(f"{files[images]} and {files[labels]} do not match: "
                                       f"shapes {shapes[images]} and {shapes[labels]}")
    return shapes[TRAIN_LABELS][0], shapes[TEST_LABELS][0]


def image_size(files: dict[str, Path]) -> tuple[int, int]:
    _, height, width = idx_shape(files[TRAIN_IMAGES])
    return height, width


def check_files(files: dict[str, Path]) -> None:
    for name in IDX_NAMES:
        check_intact(files[name], idx_shape(files[name]))


def read(config: DataConfig, root: Path) -> Decoded:
    """The four files, read whole, with the SHA-256 of their uncompressed bytes."""
    files = ensure_files(config.dataset, root)
    file_counts(files)
    arrays, sources = {}, {}
    for name in IDX_NAMES:
        arrays[name], sources[name] = read_idx(files[name])
    # Copies: np.frombuffer's arrays are read-only, and torch must own what it may write to.
    return Decoded(train_images=arrays[TRAIN_IMAGES][:, None].copy(), train_labels=arrays[TRAIN_LABELS].astype(np.int64),
                   test_images=arrays[TEST_IMAGES][:, None].copy(), test_labels=arrays[TEST_LABELS].astype(np.int64),
                   class_names=DATASETS[config.dataset].classes, source_files=sources,
                   source_dir=str(files[TRAIN_IMAGES].parent))
