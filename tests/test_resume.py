"""Resuming a killed run: `train --resume RUN_ID` continues the same run from its last checkpoint, bitwise
as if it had never stopped (CPU); a study's retried trial resumes the checkpoint of the trial it retries."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import assert_no_running, wait_until_a_trial_is_stale

TRAIN = "pipelines.entrypoints.train"
# Two short epochs of a small unconditional MLP (no classifier to train for its evaluation) on a few
# hundred images; no early stop, so both epochs run.
ARGS = ["--dataset", "fashion-mnist", "--limit-train", "500", "--val-size", "200", "--limit-test", "200",
        "--hidden", "32", "--latent-dim", "2", "--conditioning", "none", "--epochs", "2", "--patience", "0",
        "--device", "cpu"]
PER_EPOCH = ("train/loss", "train/recon", "train/kl", "val/loss", "val/recon", "val/kl")


class Died(BaseException):
    """A process dying where it stands: no handler of ours or Optuna's catches it (they catch Exception
    and KeyboardInterrupt), so, as after a SIGKILL, nothing is closed."""


def die_after_epoch(monkeypatch, epoch: int) -> None:
    """The process dies right after writing epoch ``epoch``'s checkpoint, before logging its metrics
    (the worst moment), leaving its run RUNNING as a kill would."""
    from pipelines.studies import trial_runs
    from pipelines.tracking import runs
    from pipelines.training.resume import Checkpointer

    save, end_run_for = Checkpointer.save, runs.end_run_for

    def save_then_die(self, state):
        save(self, state)
        if state["epoch"] == epoch:
            raise Died

    def no_end_when_dead(logger, error):
        if not isinstance(error, Died):
            end_run_for(logger, error)

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    for module in (runs, trial_runs):
        monkeypatch.setattr(module, "end_run_for", no_end_when_dead)


def a_gone_process() -> str:
    """``PROCESS_TAG``'s value for a process of this machine that has ended (and been reaped)."""
    from pipelines.tracking.liveness import ProcessId, process_started

    process = subprocess.Popen(["sleep", "300"])
    gone = ProcessId.current().as_dict() | {"pid": process.pid, "started": process_started(process.pid)}
    process.kill()
    process.wait()
    return json.dumps(gone)


def dead_as_a_killed_process_would_be(store) -> None:
    """The runs this process left RUNNING (its "death" was an exception) held by a process that is gone."""
    from pipelines.tracking.liveness import PROCESS_TAG

    gone = a_gone_process()
    for run in store.runs():
        if run.info.status == "RUNNING" and PROCESS_TAG in run.data.tags:
            store.client.set_tag(run.info.run_id, PROCESS_TAG, gone)


def histories(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in PER_EPOCH}


def manifest(client, run_id: str) -> dict:
    from pipelines.recording.manifest import load_manifest
    return load_manifest(client, run_id)


def test_a_run_killed_after_an_epoch_resumes_bitwise_as_if_never_stopped(store, in_process, monkeypatch):
    from pipelines.entrypoints.train import main
    from pipelines.tracking.checkpoints import local_path
    from pipelines.tracking.liveness import PROCESS_TAG, ProcessId

    client = store.client
    code, stderr = in_process(main, *ARGS)
    assert code == 0, stderr
    (whole,) = store.runs()

    with monkeypatch.context() as patch:
        die_after_epoch(patch, 1)
        with pytest.raises(Died):
            in_process(main, *ARGS)
    killed = store.runs()[-1]
    assert killed.info.status == "RUNNING" and local_path(killed.info.run_id).is_file()
    run_id = killed.info.run_id

    # Its heartbeat is fresh and its process (this one) runs: it may be alive, and is left alone.
    code, stderr = in_process(main, "--resume", run_id)
    assert code == 2 and stderr.strip() == (
        f"error: resume={run_id!r} is not valid; the run is RUNNING and may still be training: its process "
        f"({ProcessId.current()}) is still running; resume it once its process is gone"), stderr
    # Its process gone (as this one is after a kill): dead, without waiting for the heartbeat's grace.
    client.set_tag(run_id, PROCESS_TAG, a_gone_process())
    code, stderr = in_process(main, "--resume", run_id)
    assert code == 0, stderr

    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED" and "error" not in resumed.data.tags
    assert resumed.data.tags["resumed_from_epoch"] == "1"
    assert len(store.runs()) == 2  # the same run went on: no new one
    # Each epoch logged once (epoch 1's metrics from the checkpoint: it died before logging them),
    # every value bitwise that of the run that never stopped.
    assert histories(client, run_id) == histories(client, whole.info.run_id)
    assert [step for step, _ in histories(client, run_id)["val/loss"]] == [1, 2]
    samples = [m.step for m in client.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert samples and len(samples) == len(set(samples))  # the system metrics go on from the last sample's step
    original, continued = manifest(client, whole.info.run_id), manifest(client, run_id)
    assert continued["results"]["weights_sha256"] == original["results"]["weights_sha256"]
    assert continued["results"]["metrics"] == original["results"]["metrics"]
    assert original["resumed"] is None
    assert continued["resumed"]["run_id"] == run_id and continued["resumed"]["after_epoch"] == 1
    assert not local_path(run_id).exists()  # a finished run's checkpoint is removed
    assert_no_running(store)


def test_resume_refuses_what_cannot_be_resumed_in_one_line(store, in_process):
    from pipelines.entrypoints.train import main
    from pipelines.tracking.checkpoints import local_path
    from pipelines.tracking.liveness import HEARTBEAT_TAG, PROCESS_TAG

    client = store.client
    experiment = client.get_experiment_by_name("tests").experiment_id
    finished = client.create_run(experiment).info.run_id
    client.set_terminated(finished, "FINISHED")
    killed = client.create_run(experiment).info.run_id
    client.set_terminated(killed, "KILLED")
    cut_short = client.create_run(experiment).info.run_id
    client.set_terminated(cut_short, "FAILED")
    local_path(cut_short).parent.mkdir(parents=True)
    local_path(cut_short).write_bytes(b"PK\x03\x04 not a whole checkpoint")
    alive = client.create_run(experiment, tags={HEARTBEAT_TAG: str(int(time.time())), PROCESS_TAG: json.dumps(
        {"host": "elsewhere", "pid": 1, "started": 0.0, "pid_namespace": "elsewhere"})}).info.run_id
    cases = [
        (["--resume", "nope"], "error: resume='nope' is not valid; no such run in the tracking store"),
        (["--resume", finished], f"error: resume={finished!r} is not valid; the run is FINISHED: there is nothing to "
                                 "resume"),
        (["--resume", killed], f"error: resume={killed!r} is not valid; the run has no checkpoint"),
        (["--resume", cut_short], f"error: the checkpoint of run {cut_short} cannot be read ("),
        (["--resume", alive], f"error: resume={alive!r} is not valid; the run is RUNNING and may still be training: "
                              "its last heartbeat was"),
        (["--resume", killed, "--epochs", "9"], f"error: resume={killed!r} continues the run with its own "
                                                "configuration, experiment and name; only --data-dir may be given"),
    ]
    for args, message in cases:
        code, stderr = in_process(main, *args)
        assert code == 2 and stderr.strip().startswith(message) and len(stderr.strip().splitlines()) == 1, stderr
    assert [client.get_run(r).info.status for r in (finished, killed, cut_short, alive)] == [
        "FINISHED", "KILLED", "FAILED", "RUNNING"]
    assert len(store.runs()) == 4


@pytest.mark.slow
def test_a_sigkilled_train_process_resumes_on_another_machine_from_its_artifact(store, monkeypatch):
    from pipelines.tracking.checkpoints import ARTIFACT_PATH, CHECKPOINT_DIR_ENV, local_path
    from pipelines.tracking.liveness import PROCESS_TAG

    monkeypatch.setenv(CHECKPOINT_DIR_ENV, store.env[CHECKPOINT_DIR_ENV])  # where the processes keep theirs

    # The real entry point in a real process, which stops itself (SIGSTOP) once its first epoch's
    # checkpoint is written and uploaded: there the test kills it, whatever the machine's speed.
    stop_after_first_epoch = (
        "import os, signal, sys\n"
        "from pipelines.training.resume import Checkpointer\n"
        "save = Checkpointer.save\n"
        "def save_and_stop(self, state):\n"
        "    save(self, state)\n"
        "    os.kill(os.getpid(), signal.SIGSTOP)\n"
        "Checkpointer.save = save_and_stop\n"
        "from pipelines.entrypoints.common import run_main\n"
        "from pipelines.entrypoints.train import main\n"
        "run_main(main, sys.argv[1:])\n")
    process = subprocess.Popen([sys.executable, "-c", stop_after_first_epoch, *ARGS, "--checkpoint-upload-s", "0"],
                               cwd=store.root, env=store.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _, status = os.waitpid(process.pid, os.WUNTRACED)  # returns once it has stopped (or ended)
        assert os.WIFSTOPPED(status), f"the training ended (status {status}) before its first checkpoint"
    finally:
        process.kill()  # SIGKILL: nothing of the process can clean up
        process.wait(timeout=60)
    (run,) = store.runs()
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"
    assert json.loads(run.data.tags[PROCESS_TAG])["pid"] == process.pid  # who held it: gone now
    assert ARTIFACT_PATH in {f.path for f in store.client.list_artifacts(run_id, "checkpoints")}
    local_path(run_id).unlink()  # another machine: only the artifact is there

    done = store.cli(TRAIN, "--resume", run_id)  # its process is gone: no need to wait for the grace
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming run {run_id} after epoch 1, from artifact {ARTIFACT_PATH}" in done.stderr
    run = store.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == "1"
    assert [m.step for m in store.client.get_metric_history(run_id, "val/loss")] == [1, 2]
    assert manifest(store.client, run_id)["resumed"]["after_epoch"] == 1
    assert len(store.runs()) == 1
    assert_no_running(store)


def test_a_retried_trial_resumes_the_checkpoint_of_the_trial_it_retries(store, in_process, monkeypatch):
    from pipelines.entrypoints.tune import main

    storage = f"sqlite:///{store.root / 'optuna.db'}"
    args = ["--space", "smoke", *ARGS, "--study", "spot", "--storage", storage, "--n-trials", "1",
            "--heartbeat-grace", "2", "--pruner", "none"]
    with monkeypatch.context() as patch:
        die_after_epoch(patch, 1)
        with pytest.raises(Died):
            in_process(main, *args)
    dead_as_a_killed_process_would_be(store)
    wait_until_a_trial_is_stale(storage, "spot", grace_s=2)
    code, stderr = in_process(main, *args)
    assert code == 0, stderr

    first, retry = optuna.load_study(study_name="spot", storage=storage).trials
    assert (first.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.params == first.params
    client = store.client
    dead, resumed = (client.get_run(t.user_attrs["mlflow_run_id"]) for t in (first, retry))
    assert dead.info.status == "KILLED" and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumes"] == dead.info.run_id and resumed.data.tags["resumed_from_epoch"] == "1"
    # The trial's run holds its whole history: epoch 1 copied from the checkpoint (the dead trial died
    # before logging it), epoch 2 trained.
    assert histories(client, dead.info.run_id)["val/loss"] == []
    assert [step for step, _ in histories(client, resumed.info.run_id)["val/loss"]] == [1, 2]
    assert manifest(client, resumed.info.run_id)["resumed"]["after_epoch"] == 1
    assert_no_running(store)
