"""What a study records per trial and for its chosen trial, and studies run by several workers.

Trials keep params, per-epoch metrics, objective values, a reloadable model and the manifest;
the chosen trial also gets test metrics, figures, evaluation and the generator; `--workers N`
starts N processes on the study, each with its share of the CPU, and no two draw the same trial.
"""
from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from conftest import TINY_DATA, artifact_paths, assert_no_running, assert_trials_recorded, make_store
from pipelines.config import RunConfig, with_overrides
from pipelines.evaluation.evaluate import LIKELIHOOD_KIND_TAG, iwae_metric
from pipelines.recording.record import BEST_TRIAL, DETAIL_TAG, FULL, TRIAL
from pipelines.reproduce import AGREES
from pipelines.studies.sampling import trial_seed
from pipelines.studies.workers import plan_workers, worker_command

TUNE = "pipelines.entrypoints.tune"
REPRODUCE = "pipelines.entrypoints.reproduce"
PARENT_TAG = "mlflow.parentRunId"
SMOKE = ["--space", "smoke", "--epochs", "1", "--device", "cpu", *TINY_DATA]


def storage_url(store) -> str:
    return f"sqlite:///{store.root / 'optuna.db'}"


def run_study(store, name: str, *extra: str):
    done = store.cli(TUNE, *SMOKE, "--study", name, "--storage", storage_url(store), *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = optuna.load_study(study_name=name, storage=storage_url(store))
    runs = {r.info.run_id: r for r in store.runs()}
    parents = [r for r in runs.values() if PARENT_TAG not in r.data.tags and r.data.tags.get("study") == name]
    return study, runs, parents, done


@pytest.fixture(scope="module")
def default_study(tmp_path_factory, data_dir):
    """Four smoke trials with the default recording (`--trial-artifacts best`)."""
    store = make_store(tmp_path_factory.mktemp("study-recording"), data_dir)
    study, runs, parents, _ = run_study(store, "light", "--n-trials", "4", "--pruner", "none",
                                        "--register-as", "light-model")
    return store, study, runs, parents


@pytest.mark.slow
def test_every_trial_keeps_metrics_manifest_and_a_reloadable_model(default_study):
    store, study, runs, _ = default_study
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4
    assert_trials_recorded(store, complete, runs)


@pytest.mark.slow
def test_only_the_best_trial_gets_test_metrics_figures_evaluation_and_generator(default_study):
    store, study, runs, (parent,) = default_study
    client = store.client
    best = study.best_trial
    for trial in study.trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        paths = artifact_paths(client, run.info.run_id)
        has_test = any(name.startswith("test/") for name in run.data.metrics)
        if trial.number == best.number:
            assert run.data.tags[DETAIL_TAG] == BEST_TRIAL.name
            iwae = iwae_metric(run.data.tags[LIKELIHOOD_KIND_TAG], 10)  # an NLL only for exact likelihoods
            assert {"test/loss", "test/neg_elbo", iwae, "test/active_units"} <= set(run.data.metrics)
            assert {"figures/loss_curves.png", "figures/latent_scatter_test.png"} <= paths
            assert run.data.tags["generator_model_uri"].startswith("models:/")
        else:
            assert run.data.tags[DETAIL_TAG] == TRIAL.name
            assert not has_test, "trials are compared on validation; the test set is for the chosen one"
            assert not any(p.startswith("figures/") for p in paths)
            assert "generator_model_uri" not in run.data.tags
    assert parent.data.tags["best_run_id"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["best_value"] == best.value
    version = client.get_model_version_by_alias("light-model", "best")
    assert version.source == runs[best.user_attrs["mlflow_run_id"]].data.tags["model_uri"]
    assert_no_running(store)


@pytest.mark.slow
def test_a_trial_that_was_not_chosen_still_reproduces_bitwise(default_study):
    store, study, runs, _ = default_study
    other = next(t for t in study.trials if t.number != study.best_trial.number)
    run_id = other.user_attrs["mlflow_run_id"]
    done = store.cli(REPRODUCE, "--run-id", run_id)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (rerun,) = store.runs(f"tags.reproduces = '{run_id}'")
    assert rerun.data.tags["reproduction_verdict"] == AGREES
    assert rerun.data.metrics["reproduction/max_abs_weight_diff"] == 0.0


@pytest.mark.slow
def test_trial_artifacts_all_records_everything_for_every_trial(store):
    study, runs, _, _ = run_study(store, "full", "--n-trials", "2", "--pruner", "none", "--trial-artifacts", "all",
                                  "--register-as", "none")
    client = store.client
    for trial in study.trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags[DETAIL_TAG] == FULL.name
        assert "test/loss" in run.data.metrics and "generator_model_uri" in run.data.tags
        assert "figures/reconstructions.png" in artifact_paths(client, run.info.run_id)


@pytest.mark.slow
def test_workers_started_by_one_command_share_the_cpu_and_never_repeat_a_trial(store):
    study, runs, parents, done = run_study(store, "pool", "--workers", "2", "--n-trials", "4", "--pruner", "none",
                                           "--register-as", "none")
    assert "worker 0:" in done.stderr and "worker 1:" in done.stderr  # the log
    assert len(parents) == 1, "the workers report to the one parent run of the command"
    (parent,) = parents
    trials = study.trials
    # Workers draw trials until the study holds 4; two finishing at the same instant may each start
    # one more (Optuna's MaxTrialsCallback counts, then asks), so at most one extra with 2 workers.
    assert 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials)
    children = [r for r in runs.values() if r.data.tags.get(PARENT_TAG) == parent.info.run_id]
    assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    for child in children:
        assert child.data.params["execution.threads"] == "1", "2 cores shared by 2 workers"
    drawn = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(set(drawn)) == len(drawn), f"workers repeated each other's trials: {drawn}"
    best = min(trials, key=lambda t: t.value)
    assert parent.data.tags["best_trial_number"] == str(best.number)
    assert runs[best.user_attrs["mlflow_run_id"]].data.tags[DETAIL_TAG] == BEST_TRIAL.name
    assert_no_running(store)


def test_trial_seeds_differ_for_every_trial_and_depend_on_the_study_seed():
    seeds = {trial_seed(0, n) for n in range(1000)}
    assert len(seeds) == 1000
    assert trial_seed(1, 0) != trial_seed(0, 0) and trial_seed(0, 5) == trial_seed(0, 5)


def test_two_samplers_with_the_same_seed_draw_differently_for_different_trials():
    """The old scheme (seed + trials seen) made a late-starting worker replay another's draws."""
    from pipelines.studies.sampling import build_sampler
    from pipelines.studies.settings import StudySettings

    study = optuna.create_study(sampler=build_sampler(StudySettings(sampler="random"), 1))
    drawn = [study.ask().suggest_float("x", 0, 1) for _ in range(20)]
    assert len(set(drawn)) == 20
    again = optuna.create_study(sampler=build_sampler(StudySettings(sampler="random"), 1))
    assert [again.ask().suggest_float("x", 0, 1) for _ in range(20)] == drawn, "still reproducible"


def test_never_more_workers_than_trials_and_the_cores_are_shared_by_those_started():
    base = with_overrides(RunConfig(), {"execution.device": "cpu"})
    assert [(p.index, p.threads) for p in plan_workers(base, 4, 2, cpu_count=8, gpu_count=0)] == [(0, 4), (1, 4)]
    assert len(plan_workers(base, 3, None, cpu_count=8, gpu_count=0)) == 3, "a timeout-only study: all of them"


@pytest.mark.parametrize("device, threads, cpus, gpus, expected", [
    ("cpu", 0, 16, 0, [(None, 4)] * 4),  # cores / workers each
    ("cpu", 3, 16, 0, [(None, None)] * 4),  # `threads` given: kept
    ("auto", 0, 16, 2, [("cuda:0", 4), ("cuda:1", 4), ("cuda:0", 4), ("cuda:1", 4)]),  # spread over GPUs
    ("cuda:1", 0, 16, 2, [(None, 4)] * 4),  # a device named by the user is kept
    ("cpu", 0, 2, 0, [(None, 1)] * 4),  # never below one thread
])
def test_workers_get_their_share_of_cores_and_gpus(device, threads, cpus, gpus, expected):
    base = with_overrides(RunConfig(), {"execution.device": device, "execution.threads": threads})
    plans = plan_workers(base, 4, 8, cpu_count=cpus, gpu_count=gpus)
    assert [(p.device, p.threads) for p in plans] == expected


def test_a_worker_command_keeps_the_users_flags_and_adds_its_own_last():
    (plan,) = plan_workers(with_overrides(RunConfig(), {"execution.device": "cpu"}), 1, 3, cpu_count=2, gpu_count=0)
    command = worker_command(["--space", "smoke", "--workers", "2"], plan, "parent123", stop_at_trials=7)
    assert command[1:3] == ["-m", TUNE]
    # argparse keeps the last of a repeated flag: the worker's own settings win over the user's.
    assert command[3:] == ["--space", "smoke", "--workers", "2", "--workers", "1", "--worker-of", "parent123",
                           "--worker-index", "0", "--stop-at-trials", "7", "--threads", "2"]
