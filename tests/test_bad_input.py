"""Bad input a new user gives, each refused in one line naming the problem (exit 2, no traceback) before
any run exists, or worked around with a warning that says what was done instead: registered-model
names, damaged data, models whose artifacts are gone or that are not cVAEs, sizes that cannot fit,
an output folder that does not exist."""
from __future__ import annotations

import contextlib
import re
import urllib.parse
from pathlib import Path

import pytest

from conftest import assert_no_running, in_process_on, make_store, make_tiny_mnist

TINY = ["--dataset", "mnist", "--val-size", "20", "--epochs", "1", "--hidden", "16", "--latent-dim", "2"]


def one_error_line(stderr: str) -> str:
    """The command's one error line, its last, with no traceback above it (progress and warnings
    may come before it)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    return errors[0][len("error: "):]


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """One tiny conditional model trained in-process (with the judge classifier its training
    caches), on the test's own MNIST, in a store the module's tests share."""
    from types import SimpleNamespace

    from pipelines.entrypoints.train import main
    from pipelines.evaluation.classifier import CLASSIFIER_EXPERIMENT

    root = tmp_path_factory.mktemp("trained")
    store = make_store(root, data_dir)
    mnist = make_tiny_mnist(root / "mnist")
    with pytest.MonkeyPatch.context() as monkeypatch, in_process_on(store, monkeypatch) as run:
        code, _ = run(main, *TINY, "--data-dir", str(mnist))
    assert code == 0
    (model_run,) = store.runs()
    client = store.client
    (classifier_run,) = client.search_runs([client.get_experiment_by_name(CLASSIFIER_EXPERIMENT).experiment_id])
    return SimpleNamespace(store=store, run=model_run, classifier_run=classifier_run, mnist=mnist)


@pytest.fixture
def on_trained(trained, monkeypatch, capsys):
    with in_process_on(trained.store, monkeypatch, capsys) as run:
        yield run


def assert_nothing_recorded(store, before: int) -> None:
    assert len(store.runs()) == before  # no new run: refused before one existed
    assert_no_running(store)


@contextlib.contextmanager
def moved_away(uri: str):
    """The artifact folder at ``uri`` gone for the duration (deleted, as far as MLflow can tell)."""
    folder = Path(urllib.parse.urlparse(uri).path)
    aside = folder.with_name(folder.name + ".aside")
    folder.rename(aside)
    try:
        yield folder
    finally:
        aside.rename(folder)


def test_a_model_whose_artifacts_are_gone_is_named_in_one_line(trained, on_trained):
    from pipelines.entrypoints.evaluate import main as evaluate
    from pipelines.entrypoints.generate import main as generate
    from pipelines.entrypoints.reproduce import main as reproduce

    run_id = trained.run.info.run_id
    model_uri = trained.run.data.tags["model_uri"]
    logged = trained.store.client.get_logged_model(model_uri.removeprefix("models:/"))
    before = len(trained.store.runs())
    with moved_away(logged.artifact_location):
        for main in (evaluate, generate):
            code, stderr = on_trained(main, "--model-uri", run_id)
            assert code == 2 and one_error_line(stderr).startswith(
                f"model {model_uri} (run {run_id}) cannot be loaded: its files are missing or unreadable at "
                f"{logged.artifact_location} ("), stderr
    with moved_away(trained.run.info.artifact_uri):
        code, stderr = on_trained(reproduce, "--run-id", run_id)
        assert code == 2 and one_error_line(stderr) == (
            f"run {run_id} has no manifest.json artifact: its artifacts are missing from "
            f"{trained.run.info.artifact_uri} (deleted or moved); a run cannot be reproduced without its manifest")
    assert_nothing_recorded(trained.store, before)


def test_the_judge_classifier_is_not_taken_for_a_cvae(trained, on_trained):
    from pipelines.entrypoints.evaluate import main as evaluate
    from pipelines.entrypoints.generate import main as generate

    run_id = trained.classifier_run.info.run_id
    model_id = trained.classifier_run.data.tags["model_uri"].removeprefix("models:/")
    before = len(trained.store.runs())
    for main in (evaluate, generate):
        code, stderr = on_trained(main, "--model-uri", run_id)
        assert code == 2 and one_error_line(stderr).startswith(
            f"model_uri={run_id!r} is not valid: {model_id} is the 'classifier' model of run {run_id}, not a "
            "cVAE"), stderr
    assert_nothing_recorded(trained.store, before)


def test_sizes_that_cannot_fit_are_refused_before_a_run(trained, on_trained):
    from pipelines.entrypoints.evaluate import main as evaluate
    from pipelines.entrypoints.generate import main as generate

    run_id = trained.run.info.run_id
    before = len(trained.store.runs())
    code, stderr = on_trained(generate, "--model-uri", run_id, "--n", "1e9")
    assert code == 2 and re.match(r"n=1000000000 is not valid; 10 row\(s\) of 1,000,000,000 images need about "
                                  r"[\d,.]+ GiB, more than the [\d.]+ GiB free on cpu: choose a smaller --n or "
                                  r"fewer --labels$", one_error_line(stderr)), stderr
    code, stderr = on_trained(evaluate, "--model-uri", run_id, "--k", "1e9")
    assert code == 2 and re.match(r"k=1000000000 is not valid; 1,000,000,000 importance samples per image need "
                                  r"about [\d,.]+ GiB, more than the [\d.]+ GiB free on cpu: choose a smaller --k$",
                                  one_error_line(stderr)), stderr
    assert_nothing_recorded(trained.store, before)


def test_a_model_that_cannot_fit_in_free_memory_is_refused_before_a_run(store, in_process, tiny_mnist, monkeypatch):
    from pipelines.entrypoints.train import main as train
    from pipelines.training import preflight

    # What is free counts, not the total: 1.5 GiB of weights and moments where 1 GiB is free.
    monkeypatch.setattr(preflight, "free_memory_bytes", lambda device: 2**30)
    code, stderr = in_process(train, *TINY, "--data-dir", str(tiny_mnist), "--latent-dim", "2e6")
    assert code == 2 and one_error_line(stderr).endswith("1.5 GiB with their gradients and Adam's moments, more "
                                                         "than the 1.0 GiB free on cpu: choose a smaller model"), stderr
    monkeypatch.undo()

    code, stderr = in_process(train, *TINY, "--data-dir", str(tiny_mnist), "--latent-dim", "1e9")
    assert code == 2 and re.match(r"model.latent_dim=1000000000, model.hidden=16 is not valid; the model would have "
                                  r"[\d,]+ parameters, [\d,.]+ GiB with their gradients and Adam's moments, more than "
                                  r"the [\d.]+ GiB free on cpu: choose a smaller model$", one_error_line(stderr)), stderr
    assert store.runs() == []


def test_what_was_silently_accepted_is_refused_or_told(store, in_process, tiny_mnist, tmp_path, caplog):
    from pipelines.config import RunConfig, with_overrides
    from pipelines.entrypoints.generate import main as generate
    from pipelines.entrypoints.train import main as train
    from pipelines.training.preflight import preflight

    missing = tmp_path / "typo"
    code, stderr = in_process(train, *TINY, "--data-dir", str(missing))
    assert code == 2 and one_error_line(stderr) == (f"data.data_dir='{missing}' is not valid; no such directory "
                                                    "(create it to download the data into it)"), stderr
    output = tmp_path / "no" / "such" / "grid.png"
    code, stderr = in_process(generate, "--model-uri", "models:/never-looked-up", "--output", str(output))
    assert code == 2 and one_error_line(stderr) == (f"output='{output}' is not valid; no such folder: "
                                                    f"{output.parent} (create it first)"), stderr
    assert not (tmp_path / "no").exists() and store.runs() == []
    config = with_overrides(RunConfig(), {"dataset": "mnist", "data_dir": str(tiny_mnist), "val_size": "20",
                                          "limit_train": "500", "precision": "fp16", "device": "cpu"})
    with caplog.at_level("WARNING", logger="pipelines"):
        preflight(config)
    assert caplog.messages == [
        "execution.precision=fp16 does nothing on the cpu: training in fp32",
        "data.limit_train=500 is more than the 100 train images of mnist (less data.val_size=20): using all 100"]


def test_generate_takes_a_label_written_as_the_served_generator_takes_it():
    from pipelines.entrypoints.generate import parse_labels
    from pipelines.errors import UserError

    classes = [str(k) for k in range(10)]
    assert parse_labels("3.0, 7", classes) == [3, 7]  # as the served generator and every integer option
    for bad in ("3.5", "nan", "10", "-1", "x"):
        with pytest.raises(UserError, match=f"is not valid: {bad!r} is not a class of this model"):
            parse_labels(bad, classes)


def test_under_mlflow_run_a_typo_is_answered_with_the_p_name(store, in_process, monkeypatch):
    """`-P latent-dimm=4` reaches the command as --latent-dimm: the hint names the MLproject key
    latent_dim, the one `-P` takes, and the run `mlflow run` made ends FAILED with that line."""
    from pipelines.entrypoints.train import main
    from pipelines.tracking.runs import start_run

    run_id = start_run(store.client, "tests", "pending")
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    code, stderr = in_process(main, "--latent-dimm", "4", "--run-namee", "x")
    expected = ("unknown parameter latent-dimm; did you mean latent_dim?; "
                "unknown parameter run-namee; did you mean run_name?")
    assert code == 2 and one_error_line(stderr) == expected, stderr
    (run,) = store.runs()
    assert run.info.status == "FAILED" and run.data.tags["error"] == expected


SPACES = [
    ("def space(trial, base):\n    return 1 / 0\n", "failed in trial 0: ZeroDivisionError: division by zero"),
    ("def space(trial, base):\n    trial.suggest_int('latent_dim', 2, 4)\n",
     "returned NoneType 'None' in trial 0; expected a dict of overrides, e.g. {'model.latent_dim': 8}"),
]


@pytest.mark.parametrize("code_of_space, says", SPACES)
def test_a_search_space_that_raises_or_returns_no_overrides_is_named_in_one_line(
        store, in_process, tiny_mnist, tmp_path, code_of_space, says):
    import optuna

    from pipelines.entrypoints.tune import main

    space = tmp_path / "my_space.py"
    space.write_text(code_of_space)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    code, stderr = in_process(main, *TINY, "--data-dir", str(tiny_mnist), "--n-trials", "2", "--storage", storage,
                              "--study", "mine", "--space", f"{space}:space")
    assert code == 2 and one_error_line(stderr) == f"space='{space}:space' {says}", stderr
    (trial,) = optuna.load_study(study_name="mine", storage=storage).trials  # the study stopped at it
    assert trial.state == optuna.trial.TrialState.FAIL
    assert_no_running(store)
    assert {run.info.status for run in store.runs()} == {"FAILED"}  # the trial's run and the study's, with why
    assert all(says in run.data.tags["error"] for run in store.runs())
