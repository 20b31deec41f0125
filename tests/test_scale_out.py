"""Many `tune` workers against real servers: PostgreSQL for the study, `mlflow server` for tracking.

The servers run on 127.0.0.1 (``server_stack`` in conftest.py, from ``pipelines.local_stack``) for
the whole file and are stopped at its end. Workers are separate processes, as they would be on
separate machines, sharing two CPU cores (one thread each).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from conftest import REPO, as_if_on_another_machine, wait_until_a_trial_is_stale

TUNE = "pipelines.entrypoints.tune"
PARENT_TAG = "mlflow.parentRunId"
EPOCHS = 2
OBJECTIVE_METRIC = "val/neg_elbo"  # what the default objective (neg_elbo) reports to Optuna every epoch
HEARTBEAT_GRACE_S = 4
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER_ARGS = ["--space", "smoke", "--device", "cpu", "--threads", "1", "--dataset", "fashion-mnist",
               "--limit-train", "400", "--val-size", "200", "--limit-test", "200",
               "--heartbeat-grace", str(HEARTBEAT_GRACE_S), "--register-as", "none"]


def worker_env(stack, data_dir, experiment: str) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack.tracking_uri, "MLFLOW_EXPERIMENT_NAME": experiment,
           "CVAE_DATA_DIR": str(data_dir), "CVAE_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def start_worker(env: dict, cwd, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", TUNE, *WORKER_ARGS, *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_all(workers: list[subprocess.Popen]) -> list[str]:
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-4000:]
    return outputs


def experiment_runs(client: MlflowClient, experiment: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], max_results=1000)


def children_by_trial(runs) -> dict[int, list]:
    children: dict[int, list] = {}
    for run in runs:
        if PARENT_TAG in run.data.tags:
            children.setdefault(int(run.data.tags["trial_number"]), []).append(run)
    return children


def lost_or_duplicated(client: MlflowClient, trials, children) -> list[str]:
    """Every way a trial's record can be lost or doubled between Optuna and MLflow, as readable lines."""
    problems = []
    for trial in trials:
        runs = children.get(trial.number, [])
        if len(runs) != 1:
            problems.append(f"trial {trial.number}: {len(runs)} child runs")
            continue
        run = runs[0]
        if trial.user_attrs.get("mlflow_run_id") != run.info.run_id:
            problems.append(f"trial {trial.number}: user attr names run {trial.user_attrs.get('mlflow_run_id')}, "
                            f"its run is {run.info.run_id}")
        if trial.state not in FINISHED:
            continue
        logged_params = {k[len("trial."):]: v for k, v in run.data.params.items() if k.startswith("trial.")}
        if logged_params != {k: str(v) for k, v in trial.params.items()}:
            problems.append(f"trial {trial.number}: params {trial.params} logged as {logged_params}")
        history = client.get_metric_history(run.info.run_id, OBJECTIVE_METRIC)
        steps = [m.step for m in history]
        if len(steps) != len(set(steps)):
            problems.append(f"trial {trial.number}: {OBJECTIVE_METRIC} logged twice for an epoch: {sorted(steps)}")
        logged = {m.step: m.value for m in history}
        reported = trial.intermediate_values
        if set(logged) != set(reported) or any(not math.isclose(logged[s], reported[s], rel_tol=1e-9) for s in logged):
            problems.append(f"trial {trial.number}: Optuna saw {reported}, MLflow has {logged}")
        if trial.state == TrialState.COMPLETE:
            if sorted(logged) != list(range(1, EPOCHS + 1)):
                problems.append(f"trial {trial.number}: epochs {sorted(logged)} logged, not 1..{EPOCHS}")
            objective = run.data.metrics.get("objective/neg_elbo")
            if objective is None or not math.isclose(objective, trial.value, rel_tol=1e-9):
                problems.append(f"trial {trial.number}: value {trial.value}, run's objective/neg_elbo {objective}")
    return problems


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        files += all_artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return files


@pytest.mark.slow
def test_three_workers_share_a_postgresql_study_through_a_tracking_server_and_lose_nothing(
        server_stack, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may fall back to a store in the working directory
    env = worker_env(server_stack, data_dir, "scale-out")
    # Two spellings of one database: SQLAlchemy's psycopg 3 URL, and the plain one users write.
    plain_url = server_stack.optuna_storage.replace("postgresql+psycopg://", "postgresql://")
    started = time.monotonic()
    workers = [start_worker(env, tmp_path, "--study", "shared", "--storage", storage, "--n-trials", "2",
                            "--epochs", str(EPOCHS), "--sampler-seed", str(seed))
               for seed, storage in ((1, server_stack.optuna_storage), (2, server_stack.optuna_storage),
                                     (3, plain_url))]
    wait_all(workers)
    print(f"3 workers, 6 trials: {time.monotonic() - started:.1f} s wall")

    trials = optuna.load_study(study_name="shared", storage=server_stack.optuna_storage).trials
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state in FINISHED for t in trials), [t.state for t in trials]
    client = MlflowClient(server_stack.tracking_uri)
    runs = experiment_runs(client, "scale-out")
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 3
    children = children_by_trial(runs)
    assert lost_or_duplicated(client, trials, children) == []
    assert sorted(children) == list(range(6))
    assert all(r.info.status == "FINISHED" for r in parents)

    for trial in trials:
        (run,) = children[trial.number]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts must go through the server"
        if trial.state != TrialState.COMPLETE:
            continue
        assert run.info.status == "FINISHED"
        files = all_artifacts(client, run.info.run_id)
        assert "manifest.json" in files
        download = tmp_path / "downloads" / run.info.run_id
        for path in files:
            local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path,
                                                        dst_path=str(download), tracking_uri=server_stack.tracking_uri)
            assert os.path.getsize(local) > 0, path
        model = client.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
        assert model.artifact_location.startswith("mlflow-artifacts:")
        model_dir = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                        dst_path=str(download / "model"),
                                                        tracking_uri=server_stack.tracking_uri)
        assert os.path.isfile(os.path.join(model_dir, "MLmodel"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # retried_trial_number
def test_a_sigkilled_workers_trial_fails_and_is_retried_once_by_another_worker(server_stack, data_dir, tmp_path):
    env = worker_env(server_stack, data_dir, "scale-out-crash")
    study = ["--study", "crash", "--storage", server_stack.optuna_storage]
    # The doomed worker's trial would run for minutes; the others' take seconds.
    doomed = start_worker(env, tmp_path, *study, "--n-trials", "1", "--epochs", "500", "--patience", "0")
    survivor = start_worker(env, tmp_path, *study, "--n-trials", "3", "--epochs", str(EPOCHS), "--sampler-seed", "2")
    try:
        for line in doomed.stdout:
            if line.startswith("epoch 1:"):
                break
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=60)
    as_if_on_another_machine(server_stack.optuna_storage, "crash", doomed.pid, MlflowClient(server_stack.tracking_uri))
    # Started once the dead worker's trial is stale, so this worker is sure to find it (the
    # survivor may find it first).
    wait_until_a_trial_is_stale(server_stack.optuna_storage, "crash", HEARTBEAT_GRACE_S)
    latecomer = start_worker(env, tmp_path, *study, "--n-trials", "3", "--epochs", str(EPOCHS), "--sampler-seed", "3")
    outputs = wait_all([survivor, latecomer])
    assert any("stopped sending heartbeats" in output for output in outputs)

    trials = optuna.load_study(study_name="crash", storage=server_stack.optuna_storage).trials
    states = Counter(t.state for t in trials)
    assert states[TrialState.FAIL] == 1 and states[TrialState.COMPLETE] + states[TrialState.PRUNED] == 6, states
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) is not None]
    assert [RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in retries] == [dead.number]
    (retry,) = retries
    assert retry.state in FINISHED and retry.params == dead.params

    client = MlflowClient(server_stack.tracking_uri)
    runs = experiment_runs(client, "scale-out-crash")
    children = children_by_trial(runs)
    assert lost_or_duplicated(client, trials, children) == []
    (dead_run,) = children[dead.number]
    assert dead_run.info.status in ("FAILED", "KILLED") and dead_run.data.tags["trial_state"] == "FAIL"
    assert "stopped sending heartbeats" in dead_run.data.tags["error"]
    assert client.get_run(dead_run.data.tags[PARENT_TAG]).info.status in ("FAILED", "KILLED")
    (retry_run,) = children[retry.number]
    assert retry_run.info.run_id != dead_run.info.run_id and retry_run.info.status in ("FINISHED", "KILLED")
    assert [r.info.run_id for r in runs if r.info.status == "RUNNING"] == []


@pytest.mark.slow
def test_a_tracking_server_lost_mid_trial_spools_the_trial_and_starts_no_other(server_stack, data_dir, tmp_path):
    from pipelines.entrypoints.common import EXIT_TRACKING_LOST
    from pipelines.local_stack import start_tracking_server, stop_tracking_server
    from pipelines.tracking.spool import spools

    # A wait of a few seconds (CVAE_TRACKING_WAIT_S), then the trial goes on into a spool.
    env = {**worker_env(server_stack, data_dir, "scale-out-lost"), "CVAE_TRACKING_WAIT_S": "2",
           "CVAE_TRACKING_SPOOL_DIR": str(tmp_path / "spools")}
    worker = start_worker(env, tmp_path, "--study", "lost", "--storage", server_stack.optuna_storage,
                          "--n-trials", "2", "--epochs", "4", "--patience", "0")
    lines = []
    try:
        for line in worker.stdout:
            lines.append(line)
            if line.startswith("epoch 2:"):
                worker.send_signal(signal.SIGSTOP)  # the server goes mid-trial, wherever the trial is
                stop_tracking_server(server_stack)
                worker.send_signal(signal.SIGCONT)
                break
        output = "".join(lines) + worker.communicate(timeout=300)[0]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        start_tracking_server(server_stack)
    assert worker.returncode == EXIT_TRACKING_LOST, output[-3000:]
    assert "Traceback" not in output and output.strip().splitlines()[-1].startswith("error: the tracking server at ")
    # The trial went on to its end; no further trial was started while the server was gone.
    (trial,) = optuna.load_study(study_name="lost", storage=server_stack.optuna_storage).trials
    assert trial.state == TrialState.COMPLETE and sorted(trial.intermediate_values) == [1, 2, 3, 4]
    (spool,) = spools(tmp_path / "spools")
    trial_run = spool.client.get_run(trial.user_attrs["mlflow_run_id"])
    assert trial_run.info.status == "FINISHED" and trial_run.data.tags["trial_state"] == "COMPLETE"
    client = MlflowClient(server_stack.tracking_uri)
    logged = {m.step for m in client.get_metric_history(trial_run.info.run_id, OBJECTIVE_METRIC)}
    spooled = {m.step for m in spool.client.get_metric_history(trial_run.info.run_id, OBJECTIVE_METRIC)}
    assert {1, 2} <= logged and logged | spooled == set(trial.intermediate_values), (logged, spooled)


def test_an_unreachable_tracking_server_stops_the_worker_before_any_trial(data_dir, tmp_path):
    from pipelines.server_process import free_port

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CVAE_DATA_DIR": str(data_dir), "CVAE_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run([sys.executable, "-m", TUNE, *WORKER_ARGS, "--epochs", "1", "--study", "offline",
                           "--storage", storage, "--n-trials", "1"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: MLFLOW_TRACKING_URI={uri} is not valid; "), done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "epoch 1:" not in done.stderr
    if "offline" in optuna.get_all_study_names(storage):
        assert optuna.load_study(study_name="offline", storage=storage).trials == []


def test_a_missing_postgresql_driver_names_the_package_to_install(tmp_path, monkeypatch):
    from cvae.config import ConfigError
    from pipelines.config import RunConfig
    from pipelines.studies.settings import StudySettings
    from pipelines.studies.tune import prepare_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    settings = StudySettings(name="nodriver", storage="postgresql+psycopg://tuner:s3cret@127.0.0.1:1/optuna")
    with pytest.raises(ConfigError) as error:
        prepare_study(settings, RunConfig(), None)
    message = str(error.value)
    assert message.startswith("storage='postgresql+psycopg://tuner:***@127.0.0.1:1/optuna' is not valid")
    assert "pip install 'cvae-harness[postgres]'" in message and "s3cret" not in message


@pytest.fixture
def private_stack_dir(tmp_path, monkeypatch):
    """The local stack's private directory, made under the test's tmp_path (root's: under <tmp>)."""
    import tempfile

    from pipelines.local_stack import private_dir

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return private_dir()


def test_the_local_stacks_directory_is_private_and_refused_when_it_is_not(private_stack_dir, tmp_path):
    import stat

    from pipelines.local_stack import UnsafeStackFiles, private_dir

    info = os.lstat(private_stack_dir)
    assert info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o067 == 0, oct(info.st_mode)
    assert private_dir() == private_stack_dir  # an existing private one is used again
    os.rmdir(private_stack_dir)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", private_stack_dir)
    with pytest.raises(UnsafeStackFiles, match="not a private directory"):
        private_dir()
    os.unlink(private_stack_dir)
    private_stack_dir.mkdir()
    private_stack_dir.chmod(0o777)
    with pytest.raises(UnsafeStackFiles, match="not a private directory"):
        private_dir()


def test_down_signals_and_removes_only_what_up_started(private_stack_dir, tmp_path, capsys):
    import json
    import tempfile

    from pipelines.local_stack import STATE_FILE, main

    state = private_stack_dir / STATE_FILE
    # A process that is not the stack's server, whose PID a planted or stale state file names.
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    stack_dir = Path(tempfile.mkdtemp(prefix="stack-", dir=private_stack_dir))
    stack_dir.chmod(private_stack_dir.stat().st_mode)
    if os.geteuid() == 0:
        os.chown(stack_dir, 0, private_stack_dir.stat().st_gid)

    def record(root, started: float, path=state) -> None:
        path.write_text(json.dumps({"root": str(root), "postgres_port": 1, "mlflow_port": 1,
                                    "mlflow_pid": bystander.pid, "pg_bin": "/nonexistent",
                                    "mlflow_started": started}))
    try:
        record(victim, 0.0)  # a directory outside the private one
        assert main(["down"]) == 2
        assert "not a stack directory" in capsys.readouterr().err
        assert victim.is_dir() and state.exists()

        state.unlink()
        record(stack_dir, 0.0, tmp_path / "planted.json")  # the state file a symlink to someone's file
        os.symlink(tmp_path / "planted.json", state)
        assert main(["down"]) == 2
        assert "is a symlink" in capsys.readouterr().err
        assert stack_dir.is_dir()

        state.unlink()
        record(stack_dir, 0.0)  # the stack's own directory, and a PID that is someone else's by now
        assert main(["down"]) == 0
        assert not stack_dir.exists() and not state.exists()
        assert bystander.poll() is None, "down signalled a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.slow
def test_the_stacks_postgresql_wants_the_password_only_its_private_file_holds(server_stack, monkeypatch, tmp_path):
    import stat

    import psycopg

    from pipelines.local_stack import private_dir

    assert Path(server_stack.root).parent == private_dir()
    assert stat.S_IMODE(server_stack.password_file.stat().st_mode) == 0o600
    assert os.environ["PGPASSFILE"] == str(server_stack.password_file)
    dsn = server_stack.optuna_storage.replace("postgresql+psycopg://", "postgresql://")
    assert ":" not in dsn.split("//", 1)[1].split("@", 1)[0], "no password in the URL"
    with psycopg.connect(dsn, connect_timeout=30) as connection:
        assert connection.execute("SELECT 1").fetchone() == (1,)
    monkeypatch.delenv("PGPASSFILE")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass either
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(dsn, connect_timeout=30)


def test_a_urls_password_is_hidden_wherever_it_is_shown():
    from pipelines.tracking.redaction import hide_passwords

    assert hide_passwords("postgresql+psycopg://tuner:s3:c/r@t@db:5432/optuna") == \
        "postgresql+psycopg://tuner:***@t@db:5432/optuna"  # as SQLAlchemy reads it: up to the first @
    assert hide_passwords("python -m tune --storage=postgresql://u:p%40ss@h/db --x http://h:5000/a") == \
        "python -m tune --storage=postgresql://u:***@h/db --x http://h:5000/a"
    assert hide_passwords("postgresql://tuner:a/b?c@db/optuna") == "postgresql://tuner:***@db/optuna"  # unencoded
    for unchanged in ("postgresql://tuner@db/optuna", "sqlite:///optuna.db", "http://127.0.0.1:5000/#/experiments/1",
                      "journal:optuna.log", "mlflow-artifacts:/1/abc"):
        assert hide_passwords(unchanged) == unchanged
    # A command's log lines, whatever a message puts in them.
    import logging

    from pipelines.entrypoints.logs import _HidePasswords

    record = logging.LogRecord("pipelines.x", logging.WARNING, __file__, 1, "cannot open %s", ("postgresql://u:pw@h/db",),
                               None)
    assert _HidePasswords().filter(record) and record.getMessage() == "cannot open postgresql://u:***@h/db"


@pytest.mark.slow
def test_a_storage_password_is_in_no_param_tag_artifact_or_log_line(server_stack, data_dir, tmp_path):
    """One worker is given the password in --storage (and told once where it shows), the other in
    OPTUNA_STORAGE (the documented way); neither may record it anywhere."""
    password = server_stack.password_file.read_text().strip().rsplit(":", 1)[1]
    with_password = server_stack.optuna_storage.replace("postgres@", f"postgres:{password}@")
    env = {k: v for k, v in worker_env(server_stack, data_dir, "secret").items() if k != "PGPASSFILE"}
    study = ["--study", "secret", "--n-trials", "1", "--epochs", "1"]
    on_command_line = start_worker(env, tmp_path, *study, "--storage", with_password)
    from_environment = start_worker({**env, "OPTUNA_STORAGE": with_password}, tmp_path, *study, "--sampler-seed", "2")
    warned, quiet = wait_all([on_command_line, from_environment])

    warnings = [line for line in warned.splitlines() if "holds a password" in line]
    assert warnings == ["warning: --storage holds a password: it is visible in the process list; give it in "
                        "PGPASSFILE (or ~/.pgpass), or the whole URL in $OPTUNA_STORAGE, instead"], warned[-3000:]
    assert "holds a password" not in quiet
    assert password not in warned + quiet
    assert len(optuna.load_study(study_name="secret", storage=server_stack.optuna_storage).trials) == 2
    client = MlflowClient(server_stack.tracking_uri)
    runs = experiment_runs(client, "secret")
    assert len(runs) == 4
    for run in runs:
        recorded = {**run.data.params, **run.data.tags, "description": run.data.tags.get("mlflow.note.content", "")}
        assert not [key for key, value in recorded.items() if password in value], run.info.run_id
        if PARENT_TAG not in run.data.tags:
            assert run.data.params["study.storage"] == server_stack.optuna_storage.replace("postgres@", "postgres:***@")
        else:
            manifest = json.loads(Path(mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="manifest.json", dst_path=str(tmp_path / run.info.run_id),
                tracking_uri=server_stack.tracking_uri)).read_text())
            assert "--storage" not in manifest["command_line"] or "postgres:***@" in manifest["command_line"]
            assert password not in json.dumps(manifest)
