"""MLflow tracking: where runs go, how they open and close, and logging into one explicit run.

Everything logs through ``RunLogger`` (an ``MlflowClient`` plus a run id) so that code running in
threads or nested studies never depends on MLflow's thread-local "active run".
"""
from __future__ import annotations

import contextlib
import functools
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags as resolve_context_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines.tracking.store_lock import prepare_local_store

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the UI (3.x) to pick the experiment's view
MACHINE_LEARNING_KIND = "custom_model_development"  # the UI's "Machine learning": the runs table


def configure_tracking() -> str:
    """Use $MLFLOW_TRACKING_URI when set, else the embedded SQLite store in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    mlflow.set_tracking_uri(uri)
    prepare_local_store(uri)  # commands started together on a new mlflow.db take turns creating it
    # MLflow draws a "Downloading artifacts" bar for every model it loads (each run, each trial):
    # noise in logs and CI output. Whoever wants it back sets the variable to true.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    bound_http_retries(uri)
    return uri


# A tracking server that goes away mid-study (restart, network) is retried by MLflow's client
# with exponential backoff: waits of 0, 4, 8, 16, 32 s (about a minute per call, enough for a
# server restart), each attempt giving up after 30 s without an answer; then the call raises.
# MLflow's own defaults (7 retries, 120 s timeouts) keep a worker hanging for up to 20 minutes
# per call, and a failing trial makes several calls while it closes its runs.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
HEALTH_RETRIES = 2  # a tracking server just (re)starting gets a few seconds before we give up
_reachable: set[str] = set()


def _is_server_uri(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in ("http", "https")


def bound_http_retries(uri: str) -> None:
    """For a tracking server, MLflow's HTTP retries get the bounds above, where the user set none."""
    if _is_server_uri(uri):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)


def require_tracking_server(uri: str) -> None:
    """Stop with a one-line ``ConfigError`` when no MLflow server answers at an http(s) tracking URI.

    Asked once per process and URI, before anything is created or trained: without it, the first
    logging call would retry for minutes and end in a traceback. Local stores need no check.
    """
    if not _is_server_uri(uri) or uri in _reachable:
        return
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    from cvae.config import ConfigError

    health = uri.rstrip("/") + "/health"
    # The TLS settings MLflow's own client honours (/health needs no credentials).
    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or \
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() not in ("true", "1")
    with requests.Session() as session:
        retry = Retry(total=HEALTH_RETRIES, backoff_factor=1, status_forcelist=(502, 503, 504), raise_on_status=False)
        session.mount(health, HTTPAdapter(max_retries=retry))
        try:
            response = session.get(health, timeout=10, verify=verify)
            if response.ok:
                _reachable.add(uri)
                return
            problem = f"{health} answered HTTP {response.status_code}"
        except requests.RequestException as error:
            problem = f"no answer from {health} ({type(error).__name__})"
    raise ConfigError(f"MLFLOW_TRACKING_URI={uri} is not valid; {problem}: start the tracking server "
                      "(`mlflow server ...`, see docs/scaling.md) or point MLFLOW_TRACKING_URI at a running one")


@functools.cache
def git_commit() -> tuple[str, bool]:
    """(commit, dirty) of the code being run; ('unknown', False) outside a git checkout.

    Asked once per process: the code that runs is the code imported at start, and a study would
    otherwise ask git again for every trial.
    """
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True, timeout=10).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


class RunLogger:
    """Logs into one run by id. Safe to use from any thread."""

    def __init__(self, run_id: str, client: MlflowClient | None = None):
        self.run_id = run_id
        self.client = client or MlflowClient()

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    # MlflowClient.log_batch splits what it is given into the store's batch limits itself.
    def log_params(self, params: Mapping[str, object]) -> None:
        """Empty values (an option left unset) are not logged: the UI would show a blank cell."""
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items() if str(v) != ""])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Mapping[str, object]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_figure(self, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt
        try:
            self.client.log_figure(self.run_id, figure, artifact_file)
        finally:
            plt.close(figure)

    def log_dict(self, data, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)


def mark_machine_learning_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment as model development so MLflow's UI opens it on the runs table.

    Without ``mlflow.experimentKind`` the UI (3.x) opens experiments on its GenAI overview
    (traces, token usage). A kind someone already chose is left alone.
    """
    experiment = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MACHINE_LEARNING_KIND)


def _get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Workers starting together on one tracking server race to create the experiment: the
    losers get RESOURCE_ALREADY_EXISTS and use the winner's."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MACHINE_LEARNING_KIND})
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def resolve_experiment_id(client: MlflowClient, name: str | None) -> str:
    """The experiment named (created if needed), else $MLFLOW_EXPERIMENT_ID/NAME, else Default.

    Whichever it is (ours, one `mlflow run` created, Default), it is tagged as model development.
    """
    require_tracking_server(client.tracking_uri)  # the first call to the store, in every entry point
    name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if not name and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
    else:
        experiment_id = _get_or_create_experiment(client, name or "Default")
    mark_machine_learning_experiment(client, experiment_id)
    return experiment_id


def start_run(client: MlflowClient, experiment: str | None = None, run_name: str | None = None,
              parent_run_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
    """Create a run explicitly (no global state). Child runs carry their parent's id as a tag."""
    # What `mlflow run` records as the run's source (user, entry point file, git commit), as MLflow's
    # own fluent API does for a script; the UI's Source column shows it.
    all_tags = {**resolve_context_tags(), **(tags or {})}
    if run_name:
        all_tags[MLFLOW_RUN_NAME] = run_name
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        experiment_id = client.get_run(parent_run_id).info.experiment_id
    else:
        experiment_id = resolve_experiment_id(client, experiment)
    return client.create_run(experiment_id, tags=all_tags, run_name=run_name).info.run_id


def new_logged_model(client: MlflowClient, run_id: str, name: str, params: Mapping[str, object] | None = None) -> str:
    """A LoggedModel of ``run_id`` in the run's own experiment; give its id to ``log_model(model_id=...)``.

    Logged with only ``run_id=``, MLflow (3.17) files the model under the process's current
    experiment ($MLFLOW_EXPERIMENT_ID/NAME, else Default), not the run's; the runs table's Models
    column lists the run's experiment's models only, so such a model would not show beside its run.
    """
    experiment_id = client.get_run(run_id).info.experiment_id
    return client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                      params={k: str(v) for k, v in (params or {}).items()}).model_id


def end_run_for(client: MlflowClient, run_id: str, error: BaseException | None) -> None:
    """Close a run with the status its outcome deserves; the error text goes along with it."""
    if error is None:
        client.set_terminated(run_id, "FINISHED")
        return
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    message = "".join(traceback.format_exception_only(type(error), error)).strip() or type(error).__name__
    try:
        client.set_tag(run_id, "error", message[:5000])
        if status == "FAILED":
            client.log_text(run_id, "".join(traceback.format_exception(error)), "error.txt")
    finally:
        client.set_terminated(run_id, status)


@contextlib.contextmanager
def entry_point_run(experiment: str | None = None, run_name: str | None = None,
                    tags: Mapping[str, str] | None = None, reopen: str | None = None) -> Iterator[RunLogger]:
    """The run of an entry point: the one `mlflow run` created ($MLFLOW_RUN_ID), else ``reopen`` (an
    ended or dead run, RUNNING again, as ``mlflow.start_run(run_id=...)`` makes it), else a new one.

    Whatever happens inside, the run does not stay RUNNING: FINISHED on success (its local
    checkpoint, no longer needed, is removed), KILLED on Ctrl-C, FAILED on an error.
    """
    client = MlflowClient()
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if reopen and not run_id:
        run_id = reopen
        client.update_run(run_id, status="RUNNING")
        if "error" in client.get_run(run_id).data.tags:  # why it ended before; it goes on now
            client.delete_tag(run_id, "error")
        if tags:
            RunLogger(run_id, client).set_tags(tags)
    elif run_id:
        mark_machine_learning_experiment(client, client.get_run(run_id).info.experiment_id)
        if run_name:
            client.set_tag(run_id, MLFLOW_RUN_NAME, run_name)
        if tags:
            RunLogger(run_id, client).set_tags(tags)
    else:
        run_id = start_run(client, experiment, run_name, tags=tags)
    logger = RunLogger(run_id, client)
    from pipelines.tracking.liveness import heartbeat  # the tag `stale_runs` reads to find killed runs
    try:
        with heartbeat(client, run_id):
            yield logger
    except BaseException as error:
        end_run_for(client, run_id, error)
        raise
    end_run_for(client, run_id, None)
    from pipelines.tracking.checkpoints import discard_local
    discard_local(run_id)


def command_line() -> str:
    """The command exactly as started (``-m module`` and empty arguments included), shell-quoted."""
    return shlex.join(sys.orig_argv)
