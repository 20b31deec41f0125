"""A tracking server lost mid-run: the spool a run continues in, and pushing it back.

The unit tests push between two local SQLite stores in-process (a spool is a local MLflow store;
the "server" here is another one). The slow test stops a real `mlflow server` (conftest's
``server_stack``) in the middle of a `train` command and pushes after restarting it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from conftest import REPO
from pipelines.tracking.spool import Spool, push_run, push_spool, spools


@pytest.fixture
def server_and_spool(tmp_path, monkeypatch):
    """A "server" store with a RUNNING run that logged epochs 1-2, and a spool of the same run that
    logged epochs 3-4, a model, a manifest naming the model, and the run's end FINISHED."""
    monkeypatch.setenv("CVAE_TRACKING_SPOOL_DIR", str(tmp_path / "spools"))
    server = MlflowClient(f"sqlite:///{tmp_path / 'server.db'}")
    experiment = server.create_experiment("e", artifact_location=(tmp_path / "server-artifacts").as_uri())
    run_id = server.create_run(experiment).info.run_id
    server.log_batch(run_id, metrics=[Metric("val/loss", 10.0 - e, 1000 + e, e) for e in (1, 2)])
    server.log_param(run_id, "model.latent_dim", "2")
    spool = Spool.create(server.tracking_uri, "no answer from http://x/health (ConnectionError)")
    spool.ensure_run(run_id, experiment)
    client = spool.client
    client.log_batch(run_id, metrics=[Metric("val/loss", 10.0 - e, 1000 + e, e) for e in (3, 4)])
    client.log_param(run_id, "model.latent_dim", "2")
    client.log_param(run_id, "objective.kl_weight", "1.0")
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id, name="model",
                                       source_run_id=run_id, params={"model.latent_dim": "2"})
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text(f"model_id: {model.model_id}\nrun_id: {run_id}\n")
    (model_dir / "weights.bin").write_bytes(b"\x00\x01" + model.model_id.encode())
    client.log_model_artifacts(model.model_id, str(model_dir))
    client.set_tag(run_id, "model_uri", f"models:/{model.model_id}")
    client.log_dict(run_id, {"model_uri": f"models:/{model.model_id}", "run_id": run_id}, "manifest.json")
    client.set_terminated(run_id, "FINISHED")
    return server, spool, run_id, model.model_id


def test_push_replays_the_spooled_run_into_the_server_once_and_removes_the_spool(server_and_spool):
    server, spool, run_id, spooled_model = server_and_spool
    assert spool.run_ids == [run_id] and spool.server == server.tracking_uri
    assert spools(server_uri=server.tracking_uri)[0].dir == spool.dir
    spooled = MlflowClient(spool.uri).get_run(run_id)  # MLflow reads a spool as it is
    assert spooled.info.status == "FINISHED" and spooled.data.metrics["val/loss"] == 6.0
    # Meanwhile `stale_runs --close` found the server's run silent and ended it.
    server.set_tag(run_id, "error", "closed as KILLED by `stale_runs --close`: last heartbeat 300 s ago")
    server.set_terminated(run_id, "KILLED")

    assert push_run(spool, server, run_id) == 2
    assert push_run(spool, server, run_id) == 0  # pushed twice (a push cut short, then repeated)
    runs, added = push_spool(spool)
    assert (runs, added) == ([run_id], 0) and not spool.dir.exists()

    history = server.get_metric_history(run_id, "val/loss")
    assert sorted((m.step, m.timestamp, m.value) for m in history) == [(e, 1000 + e, 10.0 - e) for e in (1, 2, 3, 4)]
    run = server.get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.params == {"model.latent_dim": "2", "objective.kl_weight": "1.0"}
    model_uri = run.data.tags["model_uri"]
    model_id = model_uri.removeprefix("models:/")
    model = server.get_logged_model(model_id)
    assert model_id != spooled_model and model.source_run_id == run_id and model.status.to_int() == 2  # READY
    assert [o.model_id for o in run.outputs.model_outputs] == [model_id]
    manifest = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/manifest.json")
    assert manifest == {"model_uri": model_uri, "run_id": run_id}
    local = mlflow.artifacts.download_artifacts(model.artifact_location)
    assert open(os.path.join(local, "MLmodel")).read() == f"model_id: {model_id}\nrun_id: {run_id}\n"
    with open(os.path.join(local, "weights.bin"), "rb") as weights:  # a binary file goes as it is
        assert weights.read() == b"\x00\x01" + spooled_model.encode()


def test_the_push_command_names_a_missing_spool_in_one_line(tmp_path, capsys):
    from pipelines.entrypoints.common import exit_code
    from pipelines.entrypoints.push_spool import main

    assert exit_code(main, [str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"error: DIR={str(tmp_path / 'nowhere')!r} is not valid; no such spool directory"


@contextlib.contextmanager
def messages_of(logger: logging.Logger, level: int = logging.INFO):
    """The messages ``logger`` emits while the block runs (whatever handlers the process has)."""
    said: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: said.append(record.getMessage())
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield said
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


TRAIN_ARGS = ["--device", "cpu", "--threads", "1", "--dataset", "fashion-mnist", "--limit-train", "400",
              "--val-size", "200", "--limit-test", "200", "--epochs", "4", "--patience", "0"]
EPOCHS = 4
WAIT_S = 3


@pytest.mark.slow
def test_a_train_run_whose_tracking_server_is_lost_ends_in_a_spool_that_push_replays(
        server_stack, data_dir, tmp_path, monkeypatch):
    from pipelines.entrypoints.common import EXIT_TRACKING_LOST, exit_code
    from pipelines.entrypoints.push_spool import main as push
    from pipelines.local_stack import start_tracking_server, stop_tracking_server
    from pipelines.tracking import runs, server_loss

    uri = server_stack.tracking_uri
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "spooled",
           "CVAE_DATA_DIR": str(data_dir), "CVAE_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "CVAE_TRACKING_WAIT_S": str(WAIT_S),
           "CVAE_TRACKING_SPOOL_DIR": str(tmp_path / "spools")}
    env.pop("MLFLOW_RUN_ID", None)
    trainer = subprocess.Popen([sys.executable, "-m", "pipelines.entrypoints.train", *TRAIN_ARGS], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in trainer.stdout:
            lines.append(line)
            if line.startswith("epoch 2:"):  # epochs 1 and 2 are on the server
                trainer.send_signal(signal.SIGSTOP)  # the server goes while the run is mid-way, wherever it is
                stop_tracking_server(server_stack)
                trainer.send_signal(signal.SIGCONT)
                break
        output = "".join(lines) + trainer.communicate(timeout=600)[0]
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        start_tracking_server(server_stack)

    assert trainer.returncode == EXIT_TRACKING_LOST, output[-3000:]
    assert "Traceback" not in output and "Retrying" not in output, output[-3000:]
    waiting = [line for line in output.splitlines() if "waiting up to" in line]
    assert waiting == [f"warning: waiting up to {WAIT_S} s for the tracking server at {uri} (no answer from "
                       f"{uri}/health (ConnectionError); CVAE_TRACKING_WAIT_S sets the wait)"], output[-3000:]
    last = output.strip().splitlines()[-1]
    (spool,) = spools(tmp_path / "spools")
    assert last.startswith(f"error: the tracking server at {uri} stopped answering (")
    assert last.endswith(f"push it with `python -m pipelines.entrypoints.push_spool {spool.dir}` once the server "
                         "answers"), last
    # Nothing else about tracking: no retries, no complaints of MLflow's system-metrics monitor.
    said = [line for line in output.splitlines() if line.startswith(("warning:", "error:"))
            and "posterior collapse" not in line]  # a tiny run's own warning
    assert said == [waiting[0], last], output[-3000:]
    (run_id,) = spool.run_ids
    spooled = spool.client.get_run(run_id)
    assert spooled.info.status == "FINISHED"
    # Epochs 1-2 went to the server (and maybe 3: the trainer runs on until it is stopped), the rest
    # to the spool, each once.
    on_server = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "val/loss")]
    in_spool = [m.step for m in spool.client.get_metric_history(run_id, "val/loss")]
    assert sorted(on_server + in_spool) == list(range(1, EPOCHS + 1)) and in_spool and {1, 2} <= set(on_server)
    assert spooled.data.tags["model_uri"].startswith("models:/") and "test/loss" in spooled.data.metrics

    # The next command pointed at the server, now back, says a spool waits.
    runs._reachable.discard(uri)
    monkeypatch.setenv("CVAE_TRACKING_SPOOL_DIR", str(tmp_path / "spools"))
    with messages_of(server_loss.log) as said:
        runs.require_tracking_server(uri)
    assert said == [
        f"1 spool(s) of runs logged while the tracking server at {uri} did not answer wait in "
        f"{tmp_path / 'spools'}: push them with `python -m pipelines.entrypoints.push_spool`"]

    assert exit_code(push, [str(spool.dir)]) == 0
    assert not spool.dir.exists()
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/loss")) == list(range(1, EPOCHS + 1))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pytorch.load_model(run.data.tags["model_uri"])
    finally:
        mlflow.set_tracking_uri(previous)
    assert str(model.latent_dim) == run.data.params["model.latent_dim"] and client.get_logged_model(
        run.data.tags["model_uri"].removeprefix("models:/")).source_run_id == run_id


@pytest.mark.slow
def test_a_tracking_server_back_within_the_wait_loses_nothing_and_spools_nothing(server_stack, tmp_path,
                                                                                   monkeypatch):
    import threading

    from conftest import wait_until
    from pipelines.local_stack import start_tracking_server, stop_tracking_server
    from pipelines.tracking import server_loss
    from pipelines.tracking.runs import RunLogger

    monkeypatch.setenv("CVAE_TRACKING_WAIT_S", "600")  # a bound never reached: the server is back first
    monkeypatch.setenv("CVAE_TRACKING_SPOOL_DIR", str(tmp_path / "spools"))
    for name, value in server_loss.HTTP_RETRY_DEFAULTS.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(server_stack.tracking_uri)
    experiment = client.create_experiment("short-outage")
    logger = RunLogger(client.create_run(experiment).info.run_id, client, experiment)
    logger.log_metrics({"val/loss": 3.0}, step=1)

    stop_tracking_server(server_stack)
    with messages_of(server_loss.log) as said:
        try:
            logging_epoch_2 = threading.Thread(target=logger.log_metrics, args=({"val/loss": 2.0}, 2))
            logging_epoch_2.start()
            wait_until(lambda: any(m.startswith("waiting up to 600 s") for m in said), "the waiting line")
        finally:
            start_tracking_server(server_stack)
        logging_epoch_2.join()

    assert server_loss.active_spool() is None and not (tmp_path / "spools").exists()
    assert len(said) == 2 and said[1].startswith(f"the tracking server at {server_stack.tracking_uri} answers again")
    assert [m.step for m in client.get_metric_history(logger.run_id, "val/loss")] == [1, 2]
