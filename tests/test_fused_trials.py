"""`tune --fuse K`: trials asked K at a time and trained fused are full trials, recorded as any other
(runs, models, manifests, the chosen trial's record), pruned on their own, and re-trained alone by
`reproduce` within the documented tolerance. In-process on tiny data."""
from __future__ import annotations

import subprocess
import sys

import optuna
import pytest
import torch
from optuna.trial import TrialState

from conftest import (
    TINY_DATA,
    artifact_paths,
    assert_no_running,
    assert_trials_recorded,
)
from pipelines.entrypoints import tune
from pipelines.recording.manifest import load_manifest
from pipelines.recording.record import BEST_TRIAL, DETAIL_TAG
from pipelines.studies.fused_trials import FUSED_POPULATION_TAG, FUSED_WITH_TAG

# A fixed small structure: every trial of the optimiser space fuses with those asked with it.
SMALL = ["--hidden", "32", "--latent-dim", "2", "--device", "cpu", *TINY_DATA]


def storage_url(store) -> str:
    return f"sqlite:///{store.root / 'optuna.db'}"


def run_tune(store, name: str, *args: str):
    assert tune.main([*SMALL, "--study", name, "--storage", storage_url(store), *args]) == 0
    study = optuna.load_study(study_name=name, storage=storage_url(store))
    return study, {r.info.run_id: r for r in store.runs()}


def test_fused_trials_are_recorded_as_full_trials_and_reproduce_alone(in_store):
    from pipelines.reproduce import AGREES, reproduce_run

    store = in_store
    study, runs = run_tune(store, "fused", "--space", "optimiser", "--fuse", "3", "--n-trials", "3",
                           "--epochs", "1", "--pruner", "none", "--register-as", "fused-model")
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert_trials_recorded(store, trials, runs)
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        others = sorted(str(t.number) for t in trials if t.number != trial.number)
        assert sorted(run.data.tags[FUSED_WITH_TAG].split(",")) == others
        assert run.data.tags[FUSED_POPULATION_TAG] == "3"
        fusion = load_manifest(store.client, run.info.run_id)["fusion"]
        assert fusion["population"] == 3 and fusion["members"][fusion["index"]] == f"trial {trial.number}"
    best = runs[study.best_trial.user_attrs["mlflow_run_id"]]
    assert best.data.tags[DETAIL_TAG] == BEST_TRIAL.name
    assert "figures/loss_curves.png" in artifact_paths(store.client, best.info.run_id)
    version = store.client.get_model_version_by_alias("fused-model", "best")
    assert version.source == best.data.tags["model_uri"]

    report = reproduce_run(best.info.run_id)
    assert report["verdict"] == AGREES, report
    assert report["tolerance"]["metrics_rel"] > 0, "a fused trial re-trained alone agrees to rounding, not bitwise"
    assert_no_running(store)


def test_a_pruned_member_leaves_its_group_and_ends_pruned(in_store, tmp_path):
    # Trials 0-1 (fused) complete, one learning, one barely: the median pruner's startup trials. Of trials
    # 2-3 (fused), trial 3 barely learns and is pruned at epoch 1, while trial 2 trains on alone in the group.
    space = tmp_path / "uneven.py"
    space.write_text("def uneven(trial, base):\n"
                     "    return {'optim.lr': 1e-7 if trial.number in (1, 3) else 1e-2}\n")
    store = in_store
    study, runs = run_tune(store, "pruned", "--space", f"{space}:uneven", "--fuse", "2", "--n-trials", "4",
                           "--epochs", "2", "--pruner", "median", "--pruner-startup-trials", "2",
                           "--objectives", "loss", "--register-as", "none")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED], states
    pruned = runs[study.trials[3].user_attrs["mlflow_run_id"]]
    assert pruned.info.status == "KILLED" and pruned.data.tags["trial_state"] == "PRUNED"
    assert pruned.data.tags[FUSED_WITH_TAG] == "2"
    assert [m.step for m in store.client.get_metric_history(pruned.info.run_id, "val/loss")] == [1]
    survivor = runs[study.trials[2].user_attrs["mlflow_run_id"]]
    assert [m.step for m in store.client.get_metric_history(survivor.info.run_id, "val/loss")] == [1, 2]
    assert_no_running(store)


@pytest.mark.parametrize("value", ["0", "-1", "1e9", "x"])
def test_a_bad_fuse_value_fails_in_one_line(in_store, capsys, value):
    from pipelines.entrypoints.common import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main(tune.main, [*SMALL, "--study", "bad", "--storage", storage_url(in_store), "--fuse", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "fuse" in err[0], err
    assert in_store.runs() == []


def test_ctrl_c_during_a_fused_group_leaves_no_trial_or_run_running(in_store, monkeypatch):
    from pipelines.training import fused

    def interrupted(self, split, batch_size=fused.EVAL_BATCH):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the group validates its first epoch

    store = in_store
    with monkeypatch.context() as patch:
        patch.setattr(fused._Group, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_tune(store, "interrupted", "--space", "optimiser", "--fuse", "2", "--n-trials", "2",
                     "--epochs", "1", "--register-as", "none")
    study = optuna.load_study(study_name="interrupted", storage=storage_url(store))
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    runs = {r.info.run_id: r for r in store.runs()}
    for trial in study.trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "FAIL"
    assert [r.info.status for r in runs.values() if "mlflow.parentRunId" not in r.data.tags] == ["KILLED"]
    assert_no_running(store)

    study, _ = run_tune(store, "interrupted", "--space", "optimiser", "--fuse", "2", "--n-trials", "2",
                        "--epochs", "1", "--register-as", "none")  # the study resumes
    assert [t.state for t in study.trials][2:] == [TrialState.COMPLETE] * 2
    assert_no_running(store)


@pytest.mark.slow
def test_a_sigkilled_fused_worker_leaves_its_trials_to_the_next_worker(store):
    # The worker dies mid-group (kill -9: nothing of it can clean up); the next one on this machine sees
    # its process gone and, without waiting for the heartbeat grace, fails both members' trials, closes
    # their runs and the parent's, and retries them (the grace path, for workers on other machines:
    # tests/test_scale_out.py).
    args = [*SMALL, "--study", "crash", "--storage", storage_url(store), "--space", "optimiser", "--fuse", "2",
            "--n-trials", "2", "--heartbeat-grace", "600"]
    doomed = subprocess.Popen([sys.executable, "-m", "pipelines.entrypoints.tune", *args, "--epochs", "500",
                               "--patience", "0"], cwd=store.root, env=store.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in doomed.stdout:
            if line.startswith("trial 1: epoch 2:"):
                break
    finally:
        doomed.kill()
        doomed.wait(timeout=60)
    done = store.cli("pipelines.entrypoints.tune", *args, "--epochs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    for number in (0, 1):
        assert f"trial {number} failed: the worker running this trial (pid {doomed.pid} on " in done.stderr
    study = optuna.load_study(study_name="crash", storage=storage_url(store))
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2
    runs = {r.info.run_id: r for r in store.runs()}
    for trial in study.trials[:2]:
        crashed = runs[trial.user_attrs["mlflow_run_id"]]
        assert crashed.info.status == "KILLED" and crashed.data.tags["trial_state"] == "FAIL"
        assert crashed.data.tags[FUSED_POPULATION_TAG] == "2"
    assert sorted(map(str, (t.params for t in study.trials[2:]))) == \
        sorted(map(str, (t.params for t in study.trials[:2]))), "retried as they were"
    assert_no_running(store)


def test_fuse_auto_sizes_the_population_from_free_memory_on_cuda_and_is_one_on_the_cpu(monkeypatch):
    from pipelines.config import RunConfig, with_overrides
    from pipelines.studies import fused_trials
    from pipelines.training.fused import member_bytes

    base = RunConfig()
    per_member = member_bytes(base, (1, 28, 28), 10)
    cuda = torch.device("cuda", 0)  # only its type is read: no GPU needed

    def with_free(gib: float, n_trials):
        monkeypatch.setattr(fused_trials, "free_memory_bytes", lambda device: int(gib * 2**30))
        return fused_trials.choose_fuse("auto", base, cuda, (1, 28, 28), 10, n_trials)

    assert with_free(1.0, 1000) == int(2**30 * fused_trials.AUTO_FUSE_MEMORY_SHARE // per_member) < 64
    assert with_free(139.0, 100) == 25  # a quarter of the trials: the sampler learns from four populations
    assert with_free(139.0, None) == fused_trials.AUTO_FUSE_MOST
    assert with_free(0.001, 100) == 1  # less than a member: one at a time, never zero
    assert fused_trials.choose_fuse("auto", base, torch.device("cpu"), (1, 28, 28), 10, 100) == \
        fused_trials.CPU_AUTO_FUSE
    assert fused_trials.choose_fuse(7, base, cuda, (1, 28, 28), 10, 100) == 7
    conv = member_bytes(with_overrides(base, {"model.arch": "conv"}), (1, 28, 28), 10)
    assert conv > per_member  # convolutions' activations are counted, not only weights
