"""``folder:PATH``: an ImageFolder tree, one sub-folder per class (its name is the class's name),
images in any format Pillow opens, found recursively as torchvision's ImageFolder finds them.

Identity: every image file's SHA-256, combined with its path under PATH into one digest (the
``folder`` entry of the run's source files), so the same images agree wherever the folder lies.
Decoded once into the data cache: without ``data.image_size`` all images must be one size;
``data.image_channels`` 0 means grey when every image is grey, else RGB.
"""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.config import DataConfig
from pipelines.data.arrays import Decoded
from pipelines.data.cache import cached
from pipelines.data.digests import bytes_sha256, combined_sha256, file_sha256
from pipelines.data.images import GREY_MODES, pil_to_chw, target_size
from pipelines.data.images import settings as image_settings
from pipelines.data.locations import DataUnavailableError, first_line

log = logging.getLogger(__name__)


def image_extensions() -> frozenset[str]:
    """The file extensions of the formats Pillow can open (not those it can only write)."""
    Image.init()
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def listing(config: DataConfig, root: Path) -> tuple[tuple[str, ...], list[tuple[int, Path]]]:
    """(class names, [(class index, image file)]) in a fixed order; refuses a folder without class
    sub-folders and a class without images."""
    classes = tuple(sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and _visible(entry.name)))
    if not classes:
        raise DataUnavailableError(f"{config.dataset}: {root} has no class sub-folders; put each class's images "
                                   f"in a sub-folder named after the class ({root / 'cat' / '1.png'}, ...)")
    extensions, files, skipped = image_extensions(), [], []
    for index, name in enumerate(classes):
        found = []
        for directory, subdirectories, names in os.walk(root / name, followlinks=True):
            subdirectories[:] = sorted(d for d in subdirectories if _visible(d))
            for file in sorted(filter(_visible, names)):
                (found if os.path.splitext(file)[1].lower() in extensions else skipped).append(Path(directory, file))
        if not found:
            raise DataUnavailableError(f"{config.dataset}: the class {name!r} ({root / name}) holds no images "
                                       "(files of a format Pillow opens): every class needs images")
        files += [(index, path) for path in found]
    if skipped:
        log.warning(f"{config.dataset}: {len(skipped)} file(s) that are not images were left out, e.g. {skipped[0]}")
    return classes, files


def _open(path: Path, content: bytes | None = None) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(content) if content is not None else path)
        if content is not None:
            image.load()
        return image
    except Exception as error:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise DataUnavailableError(f"{path} cannot be read as an image: {first_line(error)}") from None


def _decode(config: DataConfig, root: Path, classes: tuple[str, ...], files: list[tuple[int, Path]],
            digests: dict[Path, str]) -> Decoded:
    size = target_size(config)
    channels, first = config.image_channels, None
    grey = True
    for _, path in files:  # headers only: the size and mode of every image, before any is decoded
        with _open(path) as image:
            grey &= image.mode in GREY_MODES
            shape = (image.height, image.width)
        if size is None and first is not None and shape != first[1]:
            raise DataUnavailableError(
                f"{config.dataset} holds images of different sizes: {first[0]} is {first[1][0]}×{first[1][1]} (H×W), "
                f"{path} is {shape[0]}×{shape[1]}; give data.image_size=H[,W] to resize and centre-crop them to one size")
        first = first or (path, shape)
    channels = channels or (1 if grey else 3)
    height, width = size or first[1]
    decoded = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for k, (_, path) in enumerate(files):
        content = path.read_bytes()
        if bytes_sha256(content) != digests[path]:
            raise DataUnavailableError(f"{path} changed while {config.dataset} was being read: run again")
        with _open(path, content) as image:
            decoded[k] = pil_to_chw(image, channels, size)
    labels = np.array([index for index, _ in files], dtype=np.int64)
    return Decoded(decoded, labels, None, None, classes, {}, str(root))


def read(config: DataConfig, root: Path) -> Decoded:
    classes, files = listing(config, root)
    try:
        digests = {path: file_sha256(path) for _, path in files}
    except OSError as error:
        raise DataUnavailableError(f"{config.dataset}: {error.filename} cannot be read: {error.strerror}") from None
    source_files = {"folder": combined_sha256((path.relative_to(root).as_posix(), sha) for path, sha in digests.items())}
    return cached("folder", source_files, image_settings(config), str(root),
                  lambda: _decode(config, root, classes, files, digests), config.dataset)
