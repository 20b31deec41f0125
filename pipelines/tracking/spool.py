"""The spool: where a run's logging goes when its tracking server stops answering, and its push.

A spool is a directory holding a local MLflow store (``mlflow.db``, SQLite, and ``artifacts/``)
plus ``spool.json`` (the server it belongs to, why it was started). Its runs have the ids of the
server's runs they continue, so everything that logs by run id (metrics, params, tags, artifacts,
dataset inputs, logged models, the end status) works on it unchanged, and MLflow itself can read it
(``mlflow ui --backend-store-uri sqlite:///DIR/mlflow.db``). A local MLflow store rather than a
file of our own: the model is logged by MLflow's ``log_model`` exactly as it would be on the
server, and pushing is reading one store and writing another with MLflow's client.

``push_spool`` replays a spool into its server: the same runs get the metrics the server lacks (by
key, step, timestamp and value, so pushing twice adds nothing), params not already there, tags,
artifacts, the logged models (new model ids on the server: the spool's ids are replaced by the
server's in tags and text artifacts, ``MLmodel`` and ``manifest.json`` included), dataset inputs,
and the run's end status. The directory is removed only once every run in it is pushed.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.utils.file_utils import local_file_uri_to_path

log = logging.getLogger(__name__)

SPOOL_ROOT_ENV = "CVAE_TRACKING_SPOOL_DIR"
DEFAULT_SPOOL_ROOT = "mlruns-spool"  # beside the command's mlflow.db: in its working directory
RECORD = "spool.json"
PUSH_COMMAND = "python -m pipelines.entrypoints.push_spool"
SERVER_EXPERIMENT_TAG = "cvae.server_experiment_id"
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".md", ".html", "MLmodel")


def spool_root() -> Path:
    """Where spools are made: $CVAE_TRACKING_SPOOL_DIR, else ./mlruns-spool."""
    return Path(os.environ.get(SPOOL_ROOT_ENV) or DEFAULT_SPOOL_ROOT).absolute()


class Spool:
    """One spool directory: its local store's client and its record."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.uri = f"sqlite:///{self.dir / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)

    @classmethod
    def create(cls, server_uri: str, cause: str) -> Spool:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        directory = spool_root() / f"{stamp}-{os.getpid()}"
        directory.mkdir(parents=True)
        (directory / RECORD).write_text(json.dumps({"server": server_uri, "cause": cause, "runs": [],
                                                    "models": {}}, indent=2))
        return cls(directory)

    @property
    def record(self) -> dict:
        return json.loads((self.dir / RECORD).read_text())

    def _update(self, **changes) -> None:
        record = {**self.record, **changes}
        (self.dir / RECORD).write_text(json.dumps(record, indent=2))

    @property
    def server(self) -> str:
        return self.record["server"]

    @property
    def run_ids(self) -> list[str]:
        return list(self.record["runs"])

    def ensure_run(self, run_id: str, server_experiment_id: str) -> None:
        """The run ``run_id`` in this spool (RUNNING, in an experiment standing for the server's)."""
        if run_id in self.record["runs"]:
            return
        experiment_id = self._experiment(server_experiment_id)
        _create_run_with_id(self.client, experiment_id, run_id)
        forget_artifact_store(run_id)
        self._update(runs=[*self.record["runs"], run_id])

    def _experiment(self, server_experiment_id: str) -> str:
        name = f"server experiment {server_experiment_id}"
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        location = (self.dir / "artifacts" / server_experiment_id).as_uri()
        return self.client.create_experiment(name, artifact_location=location,
                                             tags={SERVER_EXPERIMENT_TAG: server_experiment_id})


def _create_run_with_id(client: MlflowClient, experiment_id: str, run_id: str) -> None:
    """A RUNNING run with a chosen id. MLflow's ``create_run`` draws its own id; this is the row it
    writes (``SqlAlchemyStore.create_run``), for a local store only this module writes to."""
    from mlflow.store.tracking.dbmodels.models import SqlRun

    store = client._tracking_client.store
    location = client.get_experiment(experiment_id).artifact_location
    with store.ManagedSessionMaker(read_only=False) as session:
        session.add(SqlRun(name=run_id, artifact_uri=f"{location}/{run_id}/artifacts", run_uuid=run_id,
                           experiment_id=int(experiment_id), source_type="UNKNOWN", source_name="",
                           entry_point_name="", user_id="", status="RUNNING", start_time=int(time.time() * 1000),
                           end_time=None, deleted_time=None, source_version="", lifecycle_stage="active"))


def forget_artifact_store(run_id: str) -> None:
    """MLflow's clients share one cache of artifact stores keyed by run id alone (3.17,
    ``_tracking_service.utils._artifact_repos_cache``): a run id in two stores (the server and its
    spool) would send one's artifacts to the other's. Forgotten whenever the run changes store."""
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.pop(run_id, None)


def spools(root: Path | None = None, server_uri: str | None = None) -> list[Spool]:
    """The spools under ``root`` (default ``spool_root()``), of ``server_uri`` if given, oldest first."""
    root = root or spool_root()
    found = [Spool(d) for d in sorted(root.glob("*")) if (d / RECORD).is_file()] if root.is_dir() else []
    return [s for s in found if server_uri is None or s.server.rstrip("/") == server_uri.rstrip("/")]


# Pushing.

def _metric_history(client: MlflowClient, run_id: str, key: str) -> list[Metric]:
    return list(client.get_metric_history(run_id, key))


def _rewrite(text: str, ids: dict[str, str]) -> str:
    for old, new in ids.items():
        text = text.replace(old, new)
    return text


@contextlib.contextmanager
def _copy_rewritten(source: Path, ids: dict[str, str]) -> Iterator[Path]:
    """A temporary copy of ``source`` with the spool's model ids replaced in its text files."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "copy"
        shutil.copytree(source, target)
        for path in target.rglob("*"):
            if path.is_file() and path.name.endswith(TEXT_SUFFIXES):
                text = path.read_text(errors="surrogateescape")
                rewritten = _rewrite(text, ids)
                if rewritten != text:
                    path.write_text(rewritten, errors="surrogateescape")
        yield target


def _push_models(spool: Spool, server: MlflowClient, run_id: str, experiment_id: str) -> dict[str, str]:
    """The run's logged models on the server (made once: the spool remembers which it made)."""
    source = spool.client.get_run(run_id)
    models = spool.client.search_logged_models([source.info.experiment_id],
                                               filter_string=f"source_run_id = '{run_id}'")
    steps = {o.model_id: o.step for o in (source.outputs.model_outputs if source.outputs else [])}
    ids = dict(spool.record["models"])
    for model in models:
        if model.model_id in ids:
            continue
        made = server.create_logged_model(experiment_id, name=model.name, source_run_id=run_id, tags=model.tags,
                                          params=model.params, model_type=model.model_type)
        ids[model.model_id] = made.model_id
        with _copy_rewritten(Path(local_file_uri_to_path(model.artifact_location)), ids) as copy:
            server.log_model_artifacts(made.model_id, str(copy))
        server.finalize_logged_model(made.model_id, LoggedModelStatus.READY)
        server.log_outputs(run_id, [LoggedModelOutput(made.model_id, steps.get(model.model_id, 0))])
        spool._update(models=ids)
    return ids


def push_run(spool: Spool, server: MlflowClient, run_id: str) -> int:
    """Replay one spooled run into the server's run of the same id; the number of metric values added.

    Idempotent: metrics already on the server (same key, step, timestamp, value) are not logged
    again, params already there are kept, models already made are not made again.
    """
    target = server.get_run(run_id)
    ids = _push_models(spool, server, run_id, target.info.experiment_id)
    source = spool.client.get_run(run_id)
    params = [Param(k, v) for k, v in source.data.params.items() if k not in target.data.params]
    for key, value in source.data.params.items():
        if key in target.data.params and target.data.params[key] != value:
            log.warning(f"run {run_id}: param {key} is {target.data.params[key]!r} on the server and "
                        f"{value!r} in the spool: the server's is kept")
    metrics = []
    for key in source.data.metrics:
        there = {(m.step, m.timestamp, m.value) for m in _metric_history(server, run_id, key)}
        metrics += [m for m in _metric_history(spool.client, run_id, key) if (m.step, m.timestamp, m.value) not in there]
    tags = [RunTag(k, _rewrite(v, ids)) for k, v in source.data.tags.items()]
    server.log_batch(run_id, metrics=metrics, params=params, tags=tags)
    if source.inputs and source.inputs.dataset_inputs and not (target.inputs and target.inputs.dataset_inputs):
        server.log_inputs(run_id, datasets=source.inputs.dataset_inputs)
    artifacts = Path(local_file_uri_to_path(source.info.artifact_uri))
    if artifacts.is_dir() and any(artifacts.iterdir()):
        with _copy_rewritten(artifacts, ids) as copy:
            forget_artifact_store(run_id)
            server.log_artifacts(run_id, str(copy))
            forget_artifact_store(run_id)
    if source.info.status != "RUNNING":
        if source.info.status == "FINISHED" and "error" in target.data.tags and "error" not in source.data.tags:
            server.delete_tag(run_id, "error")  # e.g. `stale_runs --close` found it silent meanwhile
        server.set_terminated(run_id, source.info.status, end_time=source.info.end_time)
    return len(metrics)


def push_spool(spool: Spool) -> tuple[list[str], int]:
    """Push every run of ``spool`` into its server, then remove the spool; (run ids, metric values added)."""
    server = MlflowClient(spool.server)
    added = sum(push_run(spool, server, run_id) for run_id in spool.run_ids)
    runs = spool.run_ids
    shutil.rmtree(spool.dir)
    return runs, added

