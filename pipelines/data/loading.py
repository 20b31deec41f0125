"""A configured dataset: which source reads it, what can be known before a run exists (sizes,
shape, classes; damaged or unusable data refused in one line), and its splits on the device.

The IDX datasets are read in place, their headers alone giving sizes and shape; every other source
(cifar10, svhn, ``folder:PATH``, ``npz:PATH``) is decoded once into the data cache
(``pipelines.data.cache``), which the checks before a run fill, so the run itself reads the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from pipelines.config import IDX_DATASETS, DataConfig
from pipelines.data.arrays import Decoded
from pipelines.data.images import settings as image_settings
from pipelines.data.locations import own_data_path, resolve_root, source_kind
from pipelines.data.sources import folder, idx, npz, torchvision_sets
from pipelines.data.splits import DatasetSplits, checked_sizes, make_splits

log = logging.getLogger(__name__)


def _read(config: DataConfig) -> tuple[Decoded, Path]:
    """The whole dataset as uint8 arrays, and where it was read from (a data root, or the path given)."""
    kind = source_kind(config)
    if kind in IDX_DATASETS:
        root = resolve_root(config)
        return idx.read(config, root), root
    if kind in torchvision_sets.DATASETS:
        root = resolve_root(config)
        return torchvision_sets.read(config, root), root
    path = own_data_path(config)
    return (folder.read(config, path) if kind == "folder" else npz.read(config, path)), path


def _counts(data: Decoded) -> tuple[int, int | None]:
    return len(data.train_labels), None if data.test_labels is None else len(data.test_labels)


def split_sizes(config: DataConfig) -> dict[str, int]:
    """The sizes the splits will have; raises ConfigError when the configuration asks for images
    that do not exist (e.g. a validation split as large as the training images). For the IDX
    datasets no image is read (their headers say)."""
    if config.dataset in IDX_DATASETS:
        return checked_sizes(config, *idx.file_counts(idx.ensure_files(config.dataset, resolve_root(config))))
    return checked_sizes(config, *_counts(_read(config)[0]))


def dataset_shape(config: DataConfig) -> tuple[tuple[int, int, int], int]:
    """((channels, height, width), number of classes): what the model is built for."""
    if config.dataset in IDX_DATASETS:
        height, width = idx.image_size(idx.ensure_files(config.dataset, resolve_root(config)))
        return (1, height, width), len(idx.DATASETS[config.dataset].classes)
    data = _read(config)[0]
    return data.image_shape, len(data.class_names)


def class_names(config: DataConfig) -> tuple[str, ...]:
    """The classes' names: the dataset's own, a folder's sub-folder names, or an npz file's ``classes``."""
    if config.dataset in IDX_DATASETS:
        return idx.DATASETS[config.dataset].classes
    return _read(config)[0].class_names


def source_identity(config: DataConfig) -> str:
    """What names the data a model was fitted to, for caches of such models (the judge classifier):
    an IDX dataset's name; else the name with a digest of the bytes read, the settings that change
    the images and, for a drawn test set, those that draw it (its images must not be trained on)."""
    if config.dataset in IDX_DATASETS:
        return config.dataset
    data = _read(config)[0]
    identity = {"files": data.source_files, **image_settings(config)}
    if data.test_labels is None:
        identity |= {"test_fraction": config.test_fraction, "split_seed": config.split_seed}
    return f"{config.dataset}@{hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]}"


def check_available(config: DataConfig) -> None:
    """Fail early (before any run is opened) when the data cannot be had, a file is cut short or
    unusable, or the configuration asks for more images than it holds; warn when a limit exceeds
    the data. The IDX datasets' checksums come later, when their files are read; every other source
    is decoded (or found in the cache) here."""
    if config.dataset in IDX_DATASETS:
        files = idx.ensure_files(config.dataset, resolve_root(config))
        counts = idx.file_counts(files)
        idx.check_files(files)
    else:
        counts = _counts(_read(config)[0])
    sizes = checked_sizes(replace(config, limit_train=0, limit_test=0), *counts)  # all there is
    if config.limit_train > sizes["train"]:
        log.warning(f"data.limit_train={config.limit_train} is more than the {sizes['train']} train images of "
                    f"{config.dataset} (less data.val_size={config.val_size}): using all {sizes['train']}")
    if config.limit_test > sizes["test"]:
        log.warning(f"data.limit_test={config.limit_test} is more than the {sizes['test']} test images of "
                    f"{config.dataset}: using all {sizes['test']}")


def load_splits(config: DataConfig, device: torch.device) -> DatasetSplits:
    data, root = _read(config)
    return make_splits(config, data, str(root), device)
