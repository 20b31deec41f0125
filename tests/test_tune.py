"""The `tune` entry point end to end: real studies on tiny data, checked in Optuna's storage and MLflow."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlflow
import optuna
import pandas as pd
import pytest
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from conftest import TINY_DATA, TINY_PARAMS, assert_no_running
from pipelines.entrypoints import tune as tune_entry_point
from pipelines.entrypoints.common import run_main

TUNE = "pipelines.entrypoints.tune"
PARENT_TAG = "mlflow.parentRunId"
# One short epoch on the tiny subset; configuration fixed for every trial of the study.
SMOKE_ARGS = ["--space", "smoke", "--epochs", "1", "--device", "cpu", *TINY_DATA]
PLOTS = {"plots/optimization_history.html", "plots/param_importances.html",
         "plots/parallel_coordinate.html", "plots/slice.html"}


def storage_url(store) -> str:
    return f"sqlite:///{store.root / 'optuna.db'}"


def study_args(store, name: str, *extra: str) -> list[str]:
    return [*SMOKE_ARGS, "--study", name, "--storage", storage_url(store), *extra]


def load_trials(store, name: str):
    return optuna.load_study(study_name=name, storage=storage_url(store)).trials


def by_id(runs):
    return {r.info.run_id: r for r in runs}


def parents_and_children(runs):
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    children = {}
    for run in runs:
        if PARENT_TAG in run.data.tags:
            children.setdefault(run.data.tags[PARENT_TAG], []).append(run)
    return parents, children


def assert_trials_link_to_children(store, trials, children):
    """Each trial names exactly one child run, and that child names the trial back."""
    runs = {r.info.run_id: r for group in children.values() for r in group}
    run_ids = [t.user_attrs["mlflow_run_id"] for t in trials]
    assert len(set(run_ids)) == len(run_ids) == len(runs), "one child run per trial, none shared"
    for trial in trials:
        child = runs[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["trial_number"] == str(trial.number)
        assert child.data.tags[PARENT_TAG] == trial.user_attrs["mlflow_parent_run_id"]
    return runs


def write_space(tmp_path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:{name}"


@pytest.mark.slow
def test_smoke_study_via_mlflow_run_records_trials_plots_and_a_registered_model_then_resumes(in_store):
    store = in_store
    params = {**TINY_PARAMS, "space": "smoke", "epochs": "1", "device": "cpu", "n_trials": "3",
              "study": "smoke", "storage": storage_url(store), "register_as": "smoke-model"}
    done = store.mlflow_run("tune", params)
    assert done.returncode == 0, done.stderr[-4000:]

    trials = load_trials(store, "smoke")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    runs = store.runs()
    parents, children = parents_and_children(runs)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags.get("mlflow.project.entryPoint") == "tune", "the parent is the run `mlflow run` made"
    assert parent.info.status == "FINISHED" and parent.data.tags["study"] == "smoke"
    assert set(children) == {parent.info.run_id}
    linked = assert_trials_link_to_children(store, trials, children)
    for trial in trials:
        child = linked[trial.user_attrs["mlflow_run_id"]]
        assert child.info.status == "FINISHED"
        assert child.data.tags["study"] == "smoke" and child.data.tags["trial_state"] == "COMPLETE"
        assert child.data.params["trial.lr"] == str(trial.params["lr"])
        assert float(child.data.params["optim.lr"]) == pytest.approx(trial.params["lr"])
        assert child.data.metrics["objective/neg_elbo"] == pytest.approx(trial.value)
        assert child.data.tags["model_uri"].startswith("models:/")

    client = store.client
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"trials.csv", *PLOTS} <= artifacts
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "trials.csv", str(store.root)))
    assert sorted(table["user_attrs_mlflow_run_id"]) == sorted(linked)
    study = optuna.load_study(study_name="smoke", storage=storage_url(store))
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)

    version = client.get_model_version_by_alias("smoke-model", "best")
    best_child = linked[study.best_trial.user_attrs["mlflow_run_id"]]
    assert version.source == best_child.data.tags["model_uri"]
    model = mlflow.pytorch.load_model("models:/smoke-model@best", map_location="cpu")
    labels = torch.arange(2)
    assert model(torch.zeros(2, *model.image_shape), labels).decoded.shape == (2, *model.image_shape)

    # Resume: the same name and storage add trials to the study, under a new parent run.
    done = store.cli(TUNE, *study_args(store, "smoke", "--n-trials", "1", "--register-as", "smoke-model"))
    assert done.returncode == 0, done.stderr[-4000:]
    trials = load_trials(store, "smoke")
    assert [t.number for t in trials] == [0, 1, 2, 3] and trials[-1].state == TrialState.COMPLETE
    parents, children = parents_and_children(store.runs())
    assert len(parents) == 2 and sorted(map(len, children.values())) == [1, 3]
    study = optuna.load_study(study_name="smoke", storage=storage_url(store))
    best_child = by_id(store.runs())[study.best_trial.user_attrs["mlflow_run_id"]]
    version = client.get_model_version_by_alias("smoke-model", "best")
    assert version.source == best_child.data.tags["model_uri"], "@best follows the study's best trial"
    versions = client.search_model_versions("name='smoke-model'")
    assert len({v.source for v in versions}) == len(versions), "a model is registered once"
    assert_no_running(store)


@pytest.mark.slow
def test_pruning_prunes_clearly_worse_trials_and_failures_do_not_stop_the_study(store, tmp_path):
    # Trials 0-1 learn; trial 2 diverges to NaN; trials 3-4 barely learn and must be pruned at epoch 1.
    space = write_space(tmp_path, "uneven_space", """
        def uneven_space(trial, base):
            overrides = {"model.hidden": (32,), "model.latent_dim": 2, "optim.batch_size": 32}
            if trial.number == 2:
                return {**overrides, "optim.optimizer": "sgd", "optim.lr": 1e4}
            return {**overrides, "optim.lr": 1e-2 if trial.number < 2 else 1e-7}
    """)
    done = store.cli(TUNE, *study_args(store, "pruning", "--space", space, "--epochs", "3", "--n-trials", "5",
                                      "--pruner", "median", "--pruner-startup-trials", "2",
                                      "--pruner-warmup-epochs", "0", "--objectives", "loss"))
    assert done.returncode == 0, done.stderr[-4000:]

    trials = load_trials(store, "pruning")
    states = [t.state for t in trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED,
                      TrialState.PRUNED], states
    runs = by_id(store.runs())
    for trial in trials[3:]:
        child = runs[trial.user_attrs["mlflow_run_id"]]
        assert child.info.status == "KILLED" and child.data.tags["trial_state"] == "PRUNED"
        assert "error" not in child.data.tags
        history = store.client.get_metric_history(child.info.run_id, "val/loss")
        assert [m.step for m in history] == [1], "a pruned trial keeps the epochs it reached"
    failed = runs[trials[2].user_attrs["mlflow_run_id"]]
    assert failed.info.status == "FAILED" and failed.data.tags["trial_state"] == "FAIL"
    assert "non-finite" in failed.data.tags["error"] and "NonFiniteLossError" in trials[2].user_attrs["error"]
    assert_no_running(store)


@pytest.mark.slow
def test_multi_objective_study_reports_a_pareto_front_and_does_not_prune(store):
    journal = store.root / "optuna.log"
    done = store.cli(TUNE, *SMOKE_ARGS, "--study", "front", "--storage", f"journal:{journal}",
                     "--objectives", "recon,kl", "--pruner", "median", "--n-trials", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "warning: pruner 'median' is off: a multi-objective study cannot prune" in done.stderr

    study = optuna.load_study(study_name="front", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    assert len(study.directions) == 2 and all(t.state == TrialState.COMPLETE for t in study.trials)
    runs = store.runs()
    parents, children = parents_and_children(runs)
    parent = parents[0]
    assert parent.data.params["study.pruner"] == "none" and parent.data.params["study.sampler"] == "auto"
    artifacts = {a.path for a in store.client.list_artifacts(parent.info.run_id)}
    artifacts |= {a.path for a in store.client.list_artifacts(parent.info.run_id, "plots")}
    assert {"trials.csv", "pareto_front.csv", "plots/pareto_front.html", "plots/optimization_history_kl.html"} <= artifacts
    linked = assert_trials_link_to_children(store, study.trials, children)
    for trial in study.trials:
        metrics = linked[trial.user_attrs["mlflow_run_id"]].data.metrics
        assert [metrics["objective/recon"], metrics["objective/kl"]] == pytest.approx(trial.values)
    assert store.client.search_registered_models() == [], "no single best model to register"


def start_worker(store, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", TUNE, *args], cwd=store.root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_workers_share_one_study_without_duplicating_trials_or_runs(store):
    # Fresh SQLite files for both Optuna and MLflow: the workers create the stores themselves.
    fresh_uri = f"sqlite:///{store.root / 'fresh-mlflow.db'}"
    env = {**store.env, "MLFLOW_TRACKING_URI": fresh_uri}
    workers = [start_worker(store, env, *study_args(store, "shared", "--n-trials", "2", "--sampler-seed", str(seed)))
               for seed in (1, 2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]
        assert "database is locked" not in output

    trials = load_trials(store, "shared")
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    client = mlflow.MlflowClient(fresh_uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents, children = parents_and_children(runs)
    assert len(parents) == 2 and sorted(map(len, children.values())) == [2, 2]
    assert_trials_link_to_children(store, trials, children)
    assert all(r.info.status == "FINISHED" for r in runs)


BAD_INPUTS = [
    (["--space", "nonexistent"], "space='nonexistent' is not valid; choose one of: default, architectures, optimiser, smoke"),
    (["--sampler", "annealing"], "sampler='annealing' is not valid; choose one of: auto, tpe, random, cmaes"),
    (["--pruner", "hopeful"], "pruner='hopeful' is not valid; choose one of: median, hyperband, none"),
    (["--n-trials", "0"], "n_trials=0 is not valid"),
    (["--objectives", "recon,sharpness"], "objectives='sharpness' is not valid; choose one of: neg_elbo, "),
    (["--storage", "sqlite:////nonexistent-dir/optuna.db"], "storage='sqlite:////nonexistent-dir/optuna.db' is not valid"),
    (["--storage", "postgresql://tuner:s3cret@127.0.0.1:1/optuna"], "storage='postgresql://tuner:***@127.0.0.1:1/optuna'"),
]


def test_bad_input_fails_clearly_and_leaves_nothing_running(in_store, capsys, subtests):
    # One store for all cases (the entry point runs in-process): each case must leave it empty.
    store = in_store
    for args, names in BAD_INPUTS:
        with subtests.test(args=args):
            with pytest.raises(SystemExit) as exit_info:
                run_main(tune_entry_point.main, [*SMOKE_ARGS, "--study", "bad", "--storage", storage_url(store), *args])
            out, err = capsys.readouterr()
            assert exit_info.value.code == 2, err[-3000:]
            last_line = err.strip().splitlines()[-1]
            assert last_line.startswith("error: ") and names in last_line, last_line
            assert "s3cret" not in err + out
            assert store.runs() == []
            if (store.root / "optuna.db").exists() and "bad" in optuna.get_all_study_names(storage_url(store)):
                assert load_trials(store, "bad") == []


@pytest.mark.slow
def test_bad_input_under_mlflow_run_fails_the_run_mlflow_created(store):
    done = store.mlflow_run("tune", {**TINY_PARAMS, "space": "nonexistent", "storage": storage_url(store)})
    assert done.returncode != 0
    assert "space='nonexistent' is not valid" in done.stderr
    assert [r.info.status for r in store.runs()] == ["FAILED"]


@pytest.mark.slow
def test_ctrl_c_fails_the_trial_kills_its_run_and_the_study_resumes(store, tmp_path):
    space = write_space(tmp_path, "interrupted_space", """
        import os
        import signal

        def interrupted_space(trial, base):
            if trial.number == 1:
                os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during this trial
            return {"model.hidden": (32,), "model.latent_dim": 2}
    """)
    done = store.cli(TUNE, *study_args(store, "interrupted", "--space", space, "--n-trials", "3"))
    assert done.returncode == 130, done.stderr[-3000:]
    trials = load_trials(store, "interrupted")
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL]
    runs = by_id(store.runs())
    interrupted = runs[trials[1].user_attrs["mlflow_run_id"]]
    assert interrupted.info.status == "KILLED" and interrupted.data.tags["trial_state"] == "FAIL"
    parent = runs[interrupted.data.tags[PARENT_TAG]]
    assert parent.info.status == "KILLED"
    assert "trials.csv" in {a.path for a in store.client.list_artifacts(parent.info.run_id)}

    done = store.cli(TUNE, *study_args(store, "interrupted", "--n-trials", "1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [t.state for t in load_trials(store, "interrupted")][-1] == TrialState.COMPLETE
    assert_no_running(store)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # retried_trial_number
def test_a_killed_workers_trial_is_failed_and_retried_at_once_by_a_worker_on_the_same_machine(store):
    # Worker A dies mid-trial (kill -9); worker B starts at once, well inside a heartbeat grace of 10
    # minutes. A's process is gone from this machine, so B need not wait: it fails A's trial, ends A's
    # child and parent runs KILLED, and runs A's parameters again.
    grace = ("--heartbeat-grace", "600")
    doomed = start_worker(store, store.env, *study_args(store, "gone", "--n-trials", "1", "--epochs", "500",
                                                        "--patience", "0", *grace))
    try:
        for line in doomed.stdout:
            if line.startswith("epoch 1:"):
                break
    finally:
        doomed.kill()
        doomed.wait(timeout=60)
    done = store.cli(TUNE, *study_args(store, "gone", "--n-trials", "1", *grace))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trial 0 failed: the worker running this trial (pid {doomed.pid} on " in done.stderr
    trials = load_trials(store, "gone")
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(trials[1]) == 0
    assert trials[1].params == trials[0].params
    runs = by_id(store.runs())
    crashed = runs[trials[0].user_attrs["mlflow_run_id"]]
    assert crashed.info.status == "KILLED" and crashed.data.tags["trial_state"] == "FAIL"
    assert "is gone (killed)" in crashed.data.tags["error"]
    old_parent = runs[crashed.data.tags[PARENT_TAG]]
    assert old_parent.info.status == "KILLED" and "is gone (killed)" in old_parent.data.tags["error"]
    assert_no_running(store)


def test_a_parent_run_whose_process_is_gone_is_closed_when_the_study_next_starts(in_store):
    # A study process killed between two trials leaves no trial RUNNING, only its parent run.
    from mlflow import MlflowClient

    from pipelines.config import RunConfig
    from pipelines.studies.settings import StudySettings
    from pipelines.studies.tune import prepare_study
    from pipelines.tracking.liveness import PROCESS_TAG, ProcessId, process_started
    from pipelines.tracking.runs import start_run

    killed = subprocess.Popen(["sleep", "300"])
    gone = ProcessId.current().as_dict() | {"pid": killed.pid, "started": process_started(killed.pid)}
    killed.kill()
    killed.wait()
    client = MlflowClient()
    orphan = start_run(client, "tests", "orphan", tags={"study": "orphan", PROCESS_TAG: json.dumps(gone)})
    alive = start_run(client, "tests", "alive", tags={"study": "orphan", PROCESS_TAG: ProcessId.current().to_json()})
    prepare_study(StudySettings(name="orphan", storage=storage_url(in_store)), RunConfig(), "tests")
    assert client.get_run(orphan).info.status == "KILLED"
    assert f"(pid {killed.pid} on " in client.get_run(orphan).data.tags["error"]
    assert client.get_run(alive).info.status == "RUNNING", "a run whose process still runs is left alone"
    client.set_terminated(alive)


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "nsga2"])
def test_every_sampler_builds_and_optimises_a_toy_problem(sampler):
    from pipelines.studies.sampling import build_sampler
    from pipelines.studies.settings import StudySettings

    settings = StudySettings(sampler=sampler)
    study = optuna.create_study(sampler=build_sampler(settings, seed=0))
    study.optimize(lambda t: (t.suggest_float("x", -2, 2) - 1) ** 2, n_trials=12)
    assert study.best_value < 1.0


def test_a_study_recorded_under_the_old_objective_name_resumes_under_the_new_one(in_store):
    from cvae.config import ConfigError
    from pipelines.config import RunConfig
    from pipelines.studies.settings import StudySettings
    from pipelines.studies.tune import prepare_study

    storage = storage_url(in_store)
    optuna.create_study(study_name="old", storage=storage).set_user_attr("objectives", ["nll"])
    assert StudySettings(objectives=("nll",)).objectives == ("neg_elbo",)
    study = prepare_study(StudySettings(name="old", storage=storage), RunConfig(), None)
    assert study.user_attrs["objectives"] == ["nll"]  # what the study recorded is left as it was
    with pytest.raises(ConfigError, match="which optimises nll"):
        prepare_study(StudySettings(name="old", storage=storage, objectives=("recon",)), RunConfig(), None)
