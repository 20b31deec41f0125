"""The data a run used, as MLflow dataset inputs: the runs table's Dataset column.

Each split (training, validation, test) is one input: the dataset's name (``folder:PATH`` and
``npz:PATH`` as given) and source (where it was read), a digest from the SHA-256 of the bytes read
and the split settings (two runs with the same digest saw the same images), and
its size and shape as a profile. The images stay where they are.
"""
from __future__ import annotations

import hashlib
import json
from typing import Mapping

import numpy as np
from mlflow.data.dataset_source_registry import get_registered_sources
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines.config import DataConfig, RunConfig
from pipelines.data import DatasetSplits
from pipelines.tracking.runs import RunLogger

SPLIT_CONTEXTS = (("train", "training"), ("val", "validation"), ("test", "test"))


class SplitDataset(MetaDataset):
    """One split of a dataset, as metadata: the images stay where they are.

    Its digest identifies exactly the examples used: the source files' SHA-256 plus the split
    settings, so two runs with the same digest saw the same images.
    """

    def __init__(self, source, name: str, digest: str, schema: Schema, profile: dict):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def split_digest(source_files: Mapping[str, str], config: RunConfig, split: str) -> str:
    data = config.data
    identity = {"files": dict(sorted(source_files.items())), "split": split, "val_size": data.val_size,
                "split_seed": data.split_seed, "limit_train": data.limit_train, "limit_test": data.limit_test}
    # Settings that change the images or the drawn test set, named only when set (so the digests of
    # runs made before they existed stay what they were).
    defaults = DataConfig()
    identity |= {name: getattr(data, name) for name in ("image_size", "image_channels", "test_fraction")
                 if getattr(data, name) != getattr(defaults, name)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def dataset_inputs(config: RunConfig, splits: DatasetSplits) -> list[DatasetInput]:
    """The training, validation and test splits as MLflow dataset inputs (one per context)."""
    source = _local_source(splits.root)
    c, h, w = splits.image_shape
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, c, h, w), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    inputs = []
    for attr, context in SPLIT_CONTEXTS:
        split = getattr(splits, attr)
        profile = {"examples": len(split), "split": split.name, "classes": splits.num_classes,
                   "image_shape": [c, h, w], "split_seed": config.data.split_seed,
                   "source_files_sha256": splits.source_files, "class_names": list(splits.class_names)}
        if splits.test_split:
            profile["test_split"] = splits.test_split
        dataset = SplitDataset(source, name=splits.dataset, digest=split_digest(splits.source_files, config, attr),
                               schema=schema, profile=profile)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def _local_source(path: str):
    """MLflow's local-file dataset source (registered twice, so resolving a path would warn)."""
    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    return local(path)


def log_dataset(logger: RunLogger, config: RunConfig, splits: DatasetSplits) -> None:
    inputs = dataset_inputs(config, splits)
    from mlflow.exceptions import MlflowException

    def log_inputs(client) -> None:
        try:
            client.log_inputs(logger.run_id, datasets=inputs)
        except MlflowException:  # the store's IntegrityError, wrapped
            # MLflow's SQL store checks for a dataset, then inserts it: two workers logging the same
            # dataset at once can both miss it and one insert fails on the unique key. Once more,
            # the dataset is there and is only linked to this run.
            client.log_inputs(logger.run_id, datasets=inputs)

    logger.call(log_inputs)
