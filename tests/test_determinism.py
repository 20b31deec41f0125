"""Deterministic mode: two CPU runs with the same configuration and seed are bitwise identical."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipelines.config import MAX_SEED, RunConfig, with_overrides
from pipelines.recording.manifest import result_metrics, weights_sha256
from pipelines.recording.record import held_out_test_metrics
from pipelines.training.execution import seed_everything

TINY = {"data.dataset": "fashion-mnist", "data.limit_train": 600, "data.val_size": 200,
        "data.limit_test": 200, "model.hidden": "64,32", "optim.epochs": 2, "execution.device": "cpu"}


@pytest.fixture(scope="module")
def runs(data_dir):
    """Three in-process trainings: seed 0 twice, seed 1 once (each loads its own data)."""
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CVAE_DATA_DIR", str(data_dir))
        patch.setenv("CVAE_OFFLINE", "1")
        base = with_overrides(RunConfig(), TINY)
        return {"first": train(base), "again": train(base),
                "other_seed": train(with_overrides(base, {"execution.seed": 1})), "config": base}


def test_deterministic_is_the_default_on_cpu(runs):
    settings = runs["first"].determinism
    assert settings["deterministic"] and settings["use_deterministic_algorithms"]
    assert settings["cudnn_deterministic"] and not settings["cudnn_benchmark"]
    assert settings["CUBLAS_WORKSPACE_CONFIG"]
    assert runs["first"].seeds == runs["again"].seeds != runs["other_seed"].seeds


def _draws() -> tuple:
    """One draw from each generator a run uses (CUDA's too, where there is one)."""
    cuda = (torch.rand(1, device="cuda").item(),) if torch.cuda.is_available() else ()
    return (random.random(), float(np.random.rand()), torch.rand(1).item(), *cuda)


@pytest.mark.parametrize("seed", [0, 12345, MAX_SEED])  # MAX_SEED: beyond NumPy's 32-bit seeds
def test_seeding_repeats_every_generators_draws_and_records_how_to_repeat_them(seed):
    recorded = seed_everything(seed)
    first = _draws()
    seed_everything(seed)
    assert _draws() == first
    seed_everything(seed - 1 if seed else 1)
    assert all(a != b for a, b in zip(_draws(), first))
    # The record (kept in the manifest) is enough to seed each generator alike by hand.
    random.seed(recorded["python"])
    np.random.seed(recorded["numpy"])
    torch.manual_seed(recorded["torch"])
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(recorded["cuda"])
    assert _draws() == first


def test_same_seed_gives_bitwise_identical_weights_and_metrics(runs):
    first, again = runs["first"].model.state_dict(), runs["again"].model.state_dict()
    assert first.keys() == again.keys()
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert weights_sha256(first) == weights_sha256(again)
    assert result_metrics(runs["first"], {}) == result_metrics(runs["again"], {})
    assert held_out_test_metrics(runs["first"], runs["config"]) == held_out_test_metrics(runs["again"], runs["config"])
    timing_free = [{k: v for k, v in row.items() if k not in ("epoch_time_s", "examples_per_s")}
                   for row in runs["first"].history]
    assert timing_free == [{k: v for k, v in row.items() if k not in ("epoch_time_s", "examples_per_s")}
                           for row in runs["again"].history]


def test_different_seed_gives_different_weights_and_metrics(runs):
    first, other = runs["first"].model.state_dict(), runs["other_seed"].model.state_dict()
    assert all(not torch.equal(first[name], other[name]) for name in first if first[name].is_floating_point())
    assert weights_sha256(first) != weights_sha256(other)
    assert runs["first"].best_val_loss != runs["other_seed"].best_val_loss
