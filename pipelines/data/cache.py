"""The decoded-data cache: what a folder, an npz file, CIFAR-10 or SVHN decode to, kept as uint8
arrays in one file per (source bytes, settings), so decoding happens once.

A file's key is the SHA-256 of the source's bytes (every file read) and of the settings that change
the arrays (``image_size``, ``image_channels``): other bytes or settings, another file. It is
written to a temporary file in the cache directory and renamed into place (``os.replace``), so a
cache file is whole or absent whatever stops the writer; it is read with numpy, never unpickled.
Where: ``$CVAE_CACHE_DIR``, else ``$XDG_CACHE_HOME/cvae-harness/data`` (``~/.cache/...``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from pipelines.data.arrays import Decoded
from pipelines.data.locations import first_line

log = logging.getLogger(__name__)

CACHE_ENV = "CVAE_CACHE_DIR"
CACHE_FORMAT = 1  # change when what a cache file holds, or how sources decode, changes
_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def cache_dir() -> Path:
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cvae-harness" / "data"


def cache_key(kind: str, source_files: dict[str, str], settings: dict) -> str:
    identity = {"format": CACHE_FORMAT, "source": kind, "files": dict(sorted(source_files.items())),
                "settings": settings}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_path(kind: str, source_files: dict[str, str], settings: dict) -> Path:
    return cache_dir() / f"{kind}-{cache_key(kind, source_files, settings)[:32]}.npz"


def _read(path: Path, source_files: dict[str, str], source_dir: str) -> Decoded | None:
    """The cached arrays, or None (with a warning) when the file cannot be read as one."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] if name in stored else None for name in _ARRAYS}
            class_names = tuple(str(name) for name in stored["class_names"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        log.warning(f"the data cache file {path} cannot be read ({first_line(error)}): decoding again")
        return None
    if arrays["train_images"] is None or arrays["train_images"].dtype != np.uint8 or arrays["train_images"].ndim != 4:
        log.warning(f"the data cache file {path} does not hold uint8 images (N, C, H, W): decoding again")
        return None
    return Decoded(**arrays, class_names=class_names, source_files=source_files, source_dir=source_dir)


def _write(path: Path, data: Decoded) -> None:
    """Whole or not at all: a temporary file beside ``path``, renamed over it once complete."""
    arrays = {name: getattr(data, name) for name in _ARRAYS if getattr(data, name) is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays, class_names=np.array(data.class_names, dtype=str))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cached(kind: str, source_files: dict[str, str], settings: dict, source_dir: str,
           decode: Callable[[], Decoded], what: str) -> Decoded:
    """The decoded data of ``source_files`` with ``settings``: from the cache, else ``decode()``d and
    cached. A cache that cannot be written is warned about, and the data are used all the same."""
    path = cache_path(kind, source_files, settings)
    if path.is_file():
        found = _read(path, source_files, source_dir)
        if found is not None:
            log.debug(f"{what}: decoded images from the cache {path}")
            return found
    started = time.perf_counter()
    data = decode()
    data.source_files, data.source_dir = source_files, source_dir
    seconds = time.perf_counter() - started
    try:
        _write(path, data)
    except OSError as error:
        log.warning(f"{what}: the decoded images cannot be cached in {path.parent} ({first_line(error)}); "
                    f"set ${CACHE_ENV} to a writable directory, or each run decodes them again")
        return data
    log.info(f"{what}: decoded {len(data.train_labels) + len(data.test_labels if data.test_labels is not None else ())}"
             f" images in {seconds:.2f} s (once); cached as {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return data
