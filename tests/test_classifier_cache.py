"""The judge classifier's cache trusts nothing it finds in the store: a run someone else logged
under the cache key is reloaded as tensors into this code's network, or passed over, never unpickled."""
from __future__ import annotations

import logging
import pickle

import mlflow
import pytest
import torch

from pipelines.config import DataConfig
from pipelines.evaluation.classifier import (
    CLASSIFIER_EXPERIMENT,
    WEIGHTS_ARTIFACT,
    WEIGHTS_DIGEST_TAG,
    cache_key,
    get_classifier,
)

TRAIN_SIZE, EPOCHS = 80, 1
CPU = torch.device("cpu")


class Planted:
    """Unpickling this runs code: what a planted pickle could do in every trainer."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def cache(store, tiny_mnist, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store.uri)
    yield store.client, DataConfig(dataset="mnist", data_dir=str(tiny_mnist), val_size=20)
    mlflow.set_tracking_uri(previous)


def plant(client, data: DataConfig, tmp_path, payload: bytes, digest: str | None) -> str:
    """A FINISHED run under the cache key with ``payload`` as its weights file and its model."""
    experiment = client.get_experiment_by_name(CLASSIFIER_EXPERIMENT).experiment_id
    tags = {"cache_key": cache_key(data.dataset, (1, 28, 28), 10, TRAIN_SIZE, EPOCHS)}
    if digest is not None:
        tags[WEIGHTS_DIGEST_TAG] = digest
    run_id = client.create_run(experiment, tags=tags).info.run_id
    (tmp_path / WEIGHTS_ARTIFACT).write_bytes(payload)
    client.log_artifact(run_id, str(tmp_path / WEIGHTS_ARTIFACT))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_a_cached_classifier_comes_back_with_the_same_weights(cache):
    client, data = cache
    trained = get_classifier(data, CPU, TRAIN_SIZE, EPOCHS, client=client)
    again = get_classifier(data, CPU, TRAIN_SIZE, EPOCHS, client=client)
    assert not trained.cached and again.cached and again.run_id == trained.run_id
    for (name, a), (_, b) in zip(trained.net.state_dict().items(), again.net.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case", ["pickle with code", "digest mismatch", "no digest", "wrong shapes"])
def test_a_planted_or_altered_cache_run_is_passed_over_and_never_unpickled(cache, tmp_path, caplog, case):
    import hashlib

    client, data = cache
    get_classifier(data, CPU, TRAIN_SIZE, EPOCHS, client=client)  # the experiment, and an honest run
    marker = tmp_path / "code-ran"
    if case == "wrong shapes":
        payload = __import__("io").BytesIO()
        torch.save({"conv.0.weight": torch.zeros(3)}, payload)
        payload = payload.getvalue()
    else:
        payload = pickle.dumps(Planted(str(marker)))
    digest = {"digest mismatch": "0" * 64, "no digest": None}.get(case, hashlib.sha256(payload).hexdigest())
    planted = plant(client, data, tmp_path, payload, digest)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        judge = get_classifier(data, CPU, TRAIN_SIZE, EPOCHS, client=client)
    assert not marker.exists(), "the harness ran code from a run it found in the store"
    assert judge.run_id != planted and not judge.cached  # trained anew, not the planted run
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    (warning,) = [w for w in warnings if "classifier" in w]
    assert warning.startswith(f"passing over cached classifier run {planted}: ") and "training a new one" in warning


def test_the_key_names_the_image_shape_and_class_count():
    key = cache_key("folder:/data/pets", (3, 20, 24), 3, 0, 2)
    assert "|shape=3x20x24|classes=3|" in key
    assert len({key, cache_key("folder:/data/pets", (1, 20, 24), 3, 0, 2),
                cache_key("folder:/data/pets", (3, 24, 20), 3, 0, 2),
                cache_key("folder:/data/pets", (3, 20, 24), 4, 0, 2)}) == 4


def test_a_colour_classifier_of_any_size_trains_and_judges():
    from pipelines.data import SplitData
    from pipelines.evaluation.classifier import accuracy, judge_samples, train_net

    # 3 classes told apart by which colour channel is bright: learnable in a few steps, even at 7x9.
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(96) % 3
    images = torch.randint(0, 60, (96, 3, 7, 9), generator=g, dtype=torch.uint8)
    images[torch.arange(96), labels] += 180
    train = SplitData("train", images, labels)
    net, losses = train_net(train, (3, 7, 9), 3, epochs=6, device=CPU)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert accuracy(net, images, labels) > 0.9
    floats = images.float() / 255
    judged = judge_samples(net, floats, labels, floats)
    assert judged["accuracy"] > 0.9 and judged["frechet_distance"] == pytest.approx(0.0, abs=1e-6)
