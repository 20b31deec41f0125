"""Bad input a new user gives, each refused in one line naming the problem (exit 2, no traceback) before
any run exists, or worked around with a warning that says what was done instead: registered-model
names, damaged data, models whose artifacts are gone or that are not cVAEs, sizes that cannot fit,
an output folder that does not exist."""
from __future__ import annotations

import pytest

from conftest import assert_no_running

TINY = ["--dataset", "mnist", "--val-size", "20", "--epochs", "1", "--hidden", "16", "--latent-dim", "2"]


def one_error_line(stderr: str) -> str:
    """The command's only output line that is not a warning: its error, with no traceback above it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0][len("error: "):]


REFUSED_NAMES = [
    (["--study", "team/exp:1"], "register_as='team/exp:1' is not valid (the study name, which names the registered "
                                "model when --register-as is not given): names cannot contain '/' or ':'; give "
                                "--register-as NAME, or --register-as none to register nothing"),
    (["--study", "ok", "--register-as", "bad/name@x"], "register_as='bad/name@x' is not valid (the registered "
                                                       "model's name): names cannot contain '/' or ':'"),
]


def test_tune_refuses_a_name_the_registry_would_refuse_before_the_first_trial(store, in_process, tiny_mnist, tmp_path):
    from pipelines.entrypoints.tune import main

    storage = tmp_path / "optuna.db"
    for flags, message in REFUSED_NAMES:
        code, stderr = in_process(main, *TINY, "--data-dir", str(tiny_mnist), "--n-trials", "1",
                                  "--storage", f"sqlite:///{storage}", *flags)
        assert code == 2 and one_error_line(stderr).startswith(message), stderr
    assert store.runs() == [] and not storage.exists()  # no trial, no parent run, no study


def test_train_on_a_truncated_file_stops_before_a_run_naming_the_file(store, in_process, tiny_mnist):
    from pipelines.entrypoints.train import main

    images = tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-100])
    code, stderr = in_process(main, *TINY, "--data-dir", str(tiny_mnist))
    assert code == 2 and one_error_line(stderr).startswith(f"{images} cannot be read: "), stderr
    assert store.runs() == []
    assert_no_running(store)
