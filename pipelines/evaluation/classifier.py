"""The auxiliary classifier that judges generated images, trained once per dataset and cached.

Each trained classifier is an MLflow run in the experiment CLASSIFIER_EXPERIMENT with its model
logged (`mlflow.pytorch`, for people to load), its weights as a plain `state_dict` file
(WEIGHTS_ARTIFACT) and tags `dataset`, `train_size`, `epochs`, `test_accuracy`, `cache_key` and
`weights_sha256`. ``get_classifier`` finds a finished run with the same key and reloads it, so only
the first evaluation on a dataset pays for training.

The harness finds that run by itself, in a store others may write to (a shared tracking server):
it never unpickles it. It builds the network from this code and loads only tensors
(``torch.load(weights_only=True)``) whose SHA-256 matches the run's tag; a run that fails any of
that is passed over with a warning and a classifier is trained anew.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from cvae.classifier_net import ImageClassifier
from cvae.evaluation import frechet_distance
from pipelines.config import DataConfig
from pipelines.data import SplitData, as_unit_floats, dataset_shape, load_splits, source_identity
from pipelines.tracking.runs import (
    REPO_ROOT,
    RunLogger,
    end_run_for,
    new_logged_model,
    resolve_experiment_id,
    start_run,
)

log = logging.getLogger(__name__)

CLASSIFIER_EXPERIMENT = "cvae-harness-classifiers"
ARCHITECTURE_VERSION = "strided-cnn-v2"  # change when ImageClassifier changes, to retrain (v2: pooled to <= 8x8)
DEFAULT_EPOCHS = 2
BATCH_SIZE = 256  # ~1.4x the CPU throughput of 128; 0.875 vs 0.888 test accuracy on Fashion-MNIST
LEARNING_RATE = 2e-3
SEED = 0
EVAL_BATCH = 1000
WEIGHTS_ARTIFACT = "classifier_weights.pt"  # the state_dict alone: tensors, no code
WEIGHTS_DIGEST_TAG = "weights_sha256"  # of that file's bytes


@dataclass
class Classifier:
    net: ImageClassifier
    test_accuracy: float
    model_uri: str
    run_id: str
    cached: bool  # found in the store rather than trained now


def cache_key(dataset: str, image_shape, num_classes: int, train_size: int, epochs: int) -> str:
    """The image shape and class count are part of the key, so a classifier is never reloaded into
    a network of another shape; training size and epochs, so quick test classifiers never stand in
    for the full one."""
    shape = "x".join(str(int(s)) for s in image_shape)
    return (f"{dataset}|shape={shape}|classes={int(num_classes)}|train_size={train_size or 'all'}"
            f"|epochs={epochs}|{ARCHITECTURE_VERSION}")


@torch.no_grad()
def _batched(fn, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(as_unit_floats(images[s: s + EVAL_BATCH])) for s in range(0, len(images), EVAL_BATCH)])


def predict(net: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    net.eval()
    return _batched(net, images).argmax(dim=1)


def embed(net: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer features, (N, feature_dim)."""
    net.eval()
    return _batched(net.embed, images)


def accuracy(net: ImageClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict(net, images) == labels.to(images.device)).double().mean().item())


def judge_samples(net: ImageClassifier, images: torch.Tensor, labels: torch.Tensor,
                  reference_images: torch.Tensor) -> dict[str, float]:
    """How often the classifier recognises the intended label in ``images``, and the Fréchet
    distance between ``images`` and ``reference_images`` in the classifier's features."""
    return {"accuracy": accuracy(net, images, labels),
            "frechet_distance": frechet_distance(embed(net, images), embed(net, reference_images))}


def train_net(train: SplitData, image_shape, num_classes: int, epochs: int, device: torch.device,
              seed: int = SEED) -> tuple[ImageClassifier, list[float]]:
    """Adam on cross-entropy; returns the net and the mean training loss of each epoch."""
    torch.manual_seed(seed)
    net = ImageClassifier(tuple(image_shape), num_classes).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    order_rng = torch.Generator(device=device).manual_seed(seed)
    losses = []
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), device=device, generator=order_rng)
        total = torch.zeros((), device=device, dtype=torch.float64)
        for start in range(0, len(train), BATCH_SIZE):
            idx = order[start: start + BATCH_SIZE]
            loss = F.cross_entropy(net(as_unit_floats(train.images[idx])), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().double() * len(idx)
        losses.append(float(total.item()) / len(train))
    net.eval()
    return net, losses


def _signature(net: ImageClassifier) -> ModelSignature:
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *net.image_shape), "images")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, net.num_classes), "logits")]))


def find_cached(client: MlflowClient, key: str):
    experiment = client.get_experiment_by_name(CLASSIFIER_EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.cache_key = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _train_and_log(client: MlflowClient, data: DataConfig, key: str, train_size: int, epochs: int,
                   device: torch.device) -> Classifier:
    import mlflow.pytorch

    started = time.perf_counter()
    splits = load_splits(replace(data, limit_train=train_size, limit_test=0, binarize="none"), device)
    tags = {"dataset": data.dataset, "train_size": str(len(splits.train)), "epochs": str(epochs),
            "cache_key": key, "architecture": ARCHITECTURE_VERSION}
    resolve_experiment_id(client, CLASSIFIER_EXPERIMENT)
    run_id = start_run(client, CLASSIFIER_EXPERIMENT, run_name=f"classifier-{data.dataset}", tags=tags)
    logger = RunLogger(run_id, client)
    try:
        logger.log_params({"epochs": epochs, "train_size": len(splits.train), "batch_size": BATCH_SIZE,
                           "lr": LEARNING_RATE, "seed": SEED, "architecture": ARCHITECTURE_VERSION})
        net, losses = train_net(splits.train, splits.image_shape, splits.num_classes, epochs, device)
        for epoch, loss in enumerate(losses, start=1):
            logger.log_metrics({"train/loss": loss}, step=epoch)
        test_accuracy = accuracy(net, splits.test.images, splits.test.labels)
        seconds = time.perf_counter() - started
        logger.log_metrics({"test_accuracy": test_accuracy, "train_seconds": seconds}, step=epochs)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buffer)
        with tempfile.TemporaryDirectory(prefix="cvae-classifier-") as tmp:
            weights_file = Path(tmp, WEIGHTS_ARTIFACT)
            weights_file.write_bytes(buffer.getvalue())
            client.log_artifact(run_id, str(weights_file))
        logger.set_tags({WEIGHTS_DIGEST_TAG: hashlib.sha256(buffer.getvalue()).hexdigest()})
        info = mlflow.pytorch.log_model(
            net.to("cpu"), name="classifier", run_id=run_id, model_id=new_logged_model(client, run_id, "classifier"),
            signature=_signature(net),
            code_paths=[str(REPO_ROOT / "cvae")], serialization_format="pickle",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
        net.to(device)
        logger.set_tags({"test_accuracy": f"{test_accuracy:.4f}", "model_uri": info.model_uri})
    except BaseException as error:
        end_run_for(logger, error)
        raise
    end_run_for(logger, None)
    log.info(f"trained the {data.dataset} classifier in {seconds:.0f} s on {len(splits.train)} images: "
             f"test accuracy {test_accuracy:.4f} (run {run_id})")
    return Classifier(net, test_accuracy, info.model_uri, run_id, cached=False)


def get_classifier(data: DataConfig, device: torch.device, train_size: int = 0,
                   epochs: int = DEFAULT_EPOCHS, client: MlflowClient | None = None) -> Classifier:
    """The cached classifier for ``data.dataset`` (training it on the training split if none is
    cached). ``train_size`` 0 means the whole training split."""

    if train_size < 0 or epochs < 1:
        raise ValueError(f"train_size must be >= 0 and epochs >= 1, got {train_size}, {epochs}")
    client = client or MlflowClient()
    image_shape, num_classes = dataset_shape(data)
    # Own data: keyed with its bytes' digest (source_identity), so changed images get their own judge.
    key = cache_key(source_identity(data), image_shape, num_classes, train_size, epochs)
    run = find_cached(client, key)
    if run is not None:
        try:
            net = _load_weights(client, run, image_shape, num_classes, device)
        except CachedClassifierRefused as refused:
            log.warning(f"passing over cached classifier run {run.info.run_id}: {refused}; training a new one")
        else:
            test_accuracy = float(run.data.metrics.get("test_accuracy", math.nan))
            return Classifier(net, test_accuracy, run.data.tags.get("model_uri", ""), run.info.run_id, cached=True)
    return _train_and_log(client, data, key, train_size, epochs, device)


class CachedClassifierRefused(Exception):
    """A cached classifier run that cannot be trusted or used; the reason is the message."""


def _load_weights(client: MlflowClient, run, image_shape, num_classes: int,
                  device: torch.device) -> ImageClassifier:
    """The network of ``run`` built from this code, with the run's weights file loaded as tensors only,
    after checking its SHA-256 against the run's tag."""
    expected = run.data.tags.get(WEIGHTS_DIGEST_TAG)
    if not expected:
        raise CachedClassifierRefused(f"it has no {WEIGHTS_DIGEST_TAG} tag (logged before weights were kept apart)")
    with tempfile.TemporaryDirectory(prefix="cvae-classifier-") as tmp:
        try:
            path = client.download_artifacts(run.info.run_id, WEIGHTS_ARTIFACT, tmp)
        except Exception as error:  # MLflow raises several kinds for a missing artifact
            raise CachedClassifierRefused(f"its {WEIGHTS_ARTIFACT} cannot be read ({type(error).__name__})") from None
        content = Path(path).read_bytes()
    if hashlib.sha256(content).hexdigest() != expected:
        raise CachedClassifierRefused(f"its {WEIGHTS_ARTIFACT} does not match its {WEIGHTS_DIGEST_TAG} tag")
    try:
        state = torch.load(io.BytesIO(content), map_location=device, weights_only=True)
    except Exception as error:
        raise CachedClassifierRefused(f"its {WEIGHTS_ARTIFACT} is not a plain state_dict "
                                      f"({type(error).__name__})") from None
    net = ImageClassifier(tuple(image_shape), num_classes).to(device)
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CachedClassifierRefused(f"its weights do not fit this classifier: {reason}") from None
    return net.eval()
