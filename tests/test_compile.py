"""`execution.compile`: compiled steps train like eager ones, and a compile failure falls back to eager.

Compiled steps draw the same random numbers as eager ones (inductor's fallback_random), so the
two differ only in float rounding: over these tiny runs the losses measured 1e-8 apart
(relative); RELATIVE_TOLERANCE leaves room for other CPUs and kernels.
"""
from __future__ import annotations

import logging

import pytest
import torch

from pipelines.config import RunConfig, with_overrides
from pipelines.training import steps
from pipelines.training.steps import should_compile

RELATIVE_TOLERANCE = 1e-5
# Whole batches only (256 = 2 x 128, 250 validation images = one evaluation batch): one graph per
# step, so the compile stays as short as it can be.
TINY = {"data.dataset": "fashion-mnist", "data.limit_train": 256, "data.val_size": 250, "model.hidden": "32",
        "model.latent_dim": 2, "optim.epochs": 2, "optim.patience": 0, "execution.device": "cpu"}
LOSSES = ("train/loss", "train/recon", "train/kl", "val/loss", "val/recon", "val/kl")


@pytest.fixture
def tiny(data_dir, monkeypatch):
    monkeypatch.setenv("CVAE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("CVAE_OFFLINE", "1")
    return with_overrides(RunConfig(), TINY)


def losses(result) -> list[float]:
    return [row[key] for row in result.history for key in LOSSES]


@pytest.mark.parametrize("asked, device, compiles", [
    ("auto", "cpu", False), ("auto", "cuda", False), ("true", "cpu", True), ("false", "cuda", False),
])
def test_auto_is_eager_where_compiling_was_not_shown_to_pay(asked, device, compiles):
    config = with_overrides(RunConfig(), {"execution.compile": asked})
    assert should_compile(config.execution, torch.device(device)) is compiles


@pytest.mark.slow
def test_compiled_steps_train_like_eager_ones(tiny):
    from pipelines.training.train import train

    eager = train(with_overrides(tiny, {"execution.compile": "false"}))
    compiled = train(with_overrides(tiny, {"execution.compile": "true"}))
    assert compiled.compiled and not eager.compiled and compiled.compile_fallback is None
    assert losses(compiled) == pytest.approx(losses(eager), rel=RELATIVE_TOLERANCE)
    assert losses(compiled) != losses(eager)  # compiled kernels did run: rounding differs somewhere


def failing_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler here")


def test_a_compile_failure_trains_on_eagerly_after_one_warning(tiny, monkeypatch, caplog):
    from pipelines.training.train import train

    monkeypatch.setattr(steps, "COMPILE_OPTIONS", {"backend": failing_backend})
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        fell_back = train(with_overrides(tiny, {"execution.compile": "true"}))
    eager = train(with_overrides(tiny, {"execution.compile": "false"}))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith("torch.compile failed (") and warning.endswith("); training on eagerly")
    assert "no C++ compiler here" in warning and "\n" not in warning
    assert not fell_back.compiled and "no C++ compiler here" in fell_back.compile_fallback
    assert losses(fell_back) == losses(eager)  # eager from the failed batch on: the same run, bitwise
