"""Datasets: the IDX sets read in place (mnist, fashion-mnist, kmnist), CIFAR-10 and SVHN through
torchvision, and one's own images (``folder:PATH``, ``npz:PATH``) decoded once into a cache; split
with ``split_seed``, kept as uint8 tensors on the training device, and served as index-slice batches.

One module per job: ``locations`` (data root, paths, offline mode, the error type), ``sources/``
(one reader per kind of source), ``images`` (channel and size conversions), ``digests`` (SHA-256 of
the bytes read), ``cache`` (the decoded-data cache), ``arrays`` (what a source gives, label checks),
``splits``, ``loading`` (the checks before a run and the splits) and ``batches``. The names below
are what the rest of the harness imports.
"""
from pipelines.data.batches import STATIC_BINARIZATION_THRESHOLD, Batcher, as_unit_floats, evaluation_noise
from pipelines.data.loading import (
    check_available,
    class_names,
    dataset_shape,
    load_splits,
    source_identity,
    split_sizes,
)
from pipelines.data.locations import OFFLINE_ENV, DataUnavailableError, resolve_root
from pipelines.data.sources.idx import DATASETS, DEBIAN_DATASET_DIRS, IDX_UBYTE, idx_shape, read_idx
from pipelines.data.splits import DatasetSplits, SplitData

__all__ = [
    "DATASETS", "DEBIAN_DATASET_DIRS", "IDX_UBYTE", "OFFLINE_ENV", "STATIC_BINARIZATION_THRESHOLD", "Batcher",
    "DataUnavailableError", "DatasetSplits", "SplitData", "as_unit_floats", "check_available", "class_names",
    "dataset_shape", "evaluation_noise", "idx_shape", "load_splits", "read_idx", "resolve_root", "source_identity",
    "split_sizes",
]
