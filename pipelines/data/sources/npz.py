"""``npz:PATH``: a NumPy ``.npz`` file of arrays ``x`` (uint8 images, N×H×W or N×H×W×C with C 1 or
3) and ``y`` (integer labels 0..K-1); optional ``classes`` (K names) and ``x_test``/``y_test`` (else
a seeded ``data.test_fraction`` of x is the test set). Read without pickle; identity: the file's
SHA-256, under its file name. Converted once into the data cache (``image_size``, ``image_channels``).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from pipelines.config import DataConfig
from pipelines.data.arrays import Decoded, check_labels
from pipelines.data.cache import cached
from pipelines.data.digests import bytes_sha256, file_sha256
from pipelines.data.images import arrays_to_nchw, target_size
from pipelines.data.images import settings as image_settings
from pipelines.data.locations import DataUnavailableError, first_line


def _images(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    """``x`` checked and given a channel axis: (N, H, W, C)."""
    if x.dtype != np.uint8:
        raise DataUnavailableError(f"{path}: {name} is {x.dtype}; expected uint8 images (0..255), e.g. "
                                   f"(x * 255).round().astype(np.uint8) for floats in [0, 1]")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataUnavailableError(f"{path}: {name} has shape {x.shape}; expected N×H×W or N×H×W×C with C 1 or 3")
    if len(x) == 0:
        raise DataUnavailableError(f"{path}: {name} holds no images (shape {x.shape})")
    return x


def _labels(path: Path, name: str, y: np.ndarray, count: int, images_name: str) -> np.ndarray:
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
        raise DataUnavailableError(f"{path}: {name} has dtype {y.dtype} and shape {y.shape}; expected integer "
                                   "labels, one per image")
    if len(y) != count:
        raise DataUnavailableError(f"{path}: {images_name} holds {count} images but {name} {len(y)} labels")
    return y.astype(np.int64)


def _class_names(path: Path, arrays, labels: np.ndarray) -> tuple[str, ...]:
    if "classes" not in arrays:
        if labels.min() < 0:
            raise DataUnavailableError(f"{path}: y holds the label {int(labels.min())}; labels are 0..K-1")
        return tuple(str(k) for k in range(int(labels.max()) + 1))
    names = arrays["classes"]
    if names.ndim != 1 or len(names) == 0:
        raise DataUnavailableError(f"{path}: classes has shape {names.shape}; expected one name per class")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())


def _decode(config: DataConfig, path: Path, digest: str) -> Decoded:
    content = path.read_bytes()
    if bytes_sha256(content) != digest:
        raise DataUnavailableError(f"{path} changed while it was being read: run again")
    try:
        with np.load(io.BytesIO(content), allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except ValueError as error:  # an object array: numpy would need pickle to read it
        raise DataUnavailableError(f"{path}: {first_line(error)} (arrays of Python objects are not read)") from None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DataUnavailableError(f"{path} cannot be read as an .npz file: {first_line(error)}") from None
    for name in ("x", "y"):
        if name not in arrays:
            raise DataUnavailableError(f"{path} has no array {name!r} (it holds: {', '.join(arrays) or 'none'})")
    if ("x_test" in arrays) != ("y_test" in arrays):
        given, missing = ("x_test", "y_test") if "x_test" in arrays else ("y_test", "x_test")
        raise DataUnavailableError(f"{path} has {given} but no {missing}: give both, or neither (then a seeded "
                                   "data.test_fraction of x is the test set)")
    x = _images(path, "x", arrays["x"])
    y = _labels(path, "y", arrays["y"], len(x), "x")
    classes = _class_names(path, arrays, y)
    check_labels(y, classes, f"{path}: y")
    size, channels = target_size(config), config.image_channels or x.shape[-1]
    test_images = test_labels = None
    if "x_test" in arrays:
        x_test = _images(path, "x_test", arrays["x_test"])
        test_labels = _labels(path, "y_test", arrays["y_test"], len(x_test), "x_test")
        check_labels(test_labels, classes, f"{path}: y_test", every_class=False)
        if size is None and x_test.shape[1:3] != x.shape[1:3]:
            raise DataUnavailableError(f"{path}: x_test's images are {x_test.shape[1]}×{x_test.shape[2]} and x's "
                                       f"{x.shape[1]}×{x.shape[2]}; give data.image_size=H[,W] to fit both to one size")
        test_images = arrays_to_nchw(x_test, channels, size)
    return Decoded(arrays_to_nchw(x, channels, size), y, test_images, test_labels, classes, {}, str(path.parent))


def read(config: DataConfig, path: Path) -> Decoded:
    source_files = {path.name: file_sha256(path)}
    return cached("npz", source_files, image_settings(config), str(path.parent),
                  lambda: _decode(config, path, source_files[path.name]), config.dataset)
