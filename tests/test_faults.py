"""Every fault ends cleanly: bad numbers stop before a run exists, divergence is one line and a
FAILED run, a killed run is found and closed by the stale-run command, cancellation under
`mlflow run` ends KILLED and leaves no training process behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_DATA, TINY_PARAMS, assert_no_running

TRAIN = "pipelines.entrypoints.train"


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture
def in_process(store, monkeypatch, capsys):
    """Runs an entry point's ``main`` in this process the way ``run_main`` does (same error
    handling and exit codes), against ``store``: seconds instead of a new interpreter each time."""
    import mlflow

    from pipelines.entrypoints.common import exit_code
    from pipelines.tracking import configure_tracking

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "CVAE_DATA_DIR", "CVAE_OFFLINE"):
        monkeypatch.setenv(name, store.env[name])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(store.root)
    previous = mlflow.get_tracking_uri()
    configure_tracking()

    def run(main, *argv: str) -> tuple[int, str]:
        capsys.readouterr()
        code = exit_code(main, list(argv))
        return code, capsys.readouterr().err

    yield run
    mlflow.set_tracking_uri(previous)


BAD_NUMBERS = [
    ("--lr", "inf", "error: optim.lr=inf is not valid; expected a finite number > 0"),
    ("--kl-weight", "nan", "error: objective.kl_weight=nan is not valid; expected a finite number >= 0"),
    ("--warmup-epochs", "inf", "error: objective.warmup_epochs=inf is not valid; expected a finite number >= 0"),
    ("--gaussian-std", "inf", "error: model.gaussian_std=inf is not valid; expected a finite number in"),
    ("--val-size", "100000", "error: data.val_size=100000 is not valid; expected fewer than the 60000 training "
                             "images of fashion-mnist"),
]


@pytest.mark.parametrize("flag, value, message", BAD_NUMBERS)
def test_bad_numbers_stop_before_any_run_with_one_line(store, in_process, flag, value, message):
    from pipelines.entrypoints.train import main

    code, stderr = in_process(main, *TINY_DATA, "--epochs", "1", flag, value)
    assert code == 2, stderr
    assert stderr.strip().startswith(message) and len(stderr.strip().splitlines()) == 1, stderr
    assert store.runs() == []


def test_a_bad_number_in_a_real_process_exits_2_with_one_line(store):
    done = store.cli(TRAIN, *TINY_DATA, "--epochs", "1", "--val-size", "100000")
    assert done.returncode == 2 and done.stderr.strip() == BAD_NUMBERS[-1][2], done.stderr[-2000:]
    assert store.runs() == []


@pytest.mark.slow
def test_divergence_fails_the_run_with_one_line_naming_the_cause_and_the_remedy(store):
    done = store.cli(TRAIN, *TINY_DATA, "--epochs", "2", "--lr", "1e10")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = error_lines(done.stderr)
    assert line.startswith("error: training diverged: the training loss became non-finite in epoch 1")
    assert "optim.lr=1e+10 is too high for adam; lower --lr" in line
    (run,) = store.runs()
    assert run.info.status == "FAILED" and "optim.lr=1e+10" in run.data.tags["error"]
