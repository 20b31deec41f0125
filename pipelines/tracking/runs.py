"""MLflow tracking: where runs go, how they open and close, and logging into one explicit run.

Everything logs through ``RunLogger`` (an ``MlflowClient`` plus a run id) so that code running in
threads or nested studies never depends on MLflow's thread-local "active run".
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator, Mapping, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags as resolve_context_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from pipelines.errors import TrackingLostError, UserError
from pipelines.tracking.redaction import hide_passwords
from pipelines.tracking.server_loss import (
    active_spool,
    bound_http_retries,
    health_problem,
    is_server_uri,
    lost_error,
    mention_unpushed_spools,
    server_back_after_wait,
    start_spooling,
)
from pipelines.tracking.store_lock import prepare_local_store

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the UI (3.x) to pick the experiment's view
MACHINE_LEARNING_KIND = "custom_model_development"  # the UI's "Machine learning": the runs table
log = logging.getLogger(__name__)


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


HEALTH_RETRIES = 2  # a tracking server just (re)starting gets a few seconds before we give up
_reachable: set[str] = set()


def get_run_or_refuse(client: MlflowClient, run_id: str, field: str, expected: str):
    """The run ``run_id`` of the store ``client`` reads, or a one-line ``UserError`` naming ``field``:
    for an empty id (``expected`` says what was wanted) or a run the store does not hold."""
    if not run_id.strip():
        raise UserError(f"{field}='' is not valid; expected {expected}")
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"{field}={run_id!r} is not valid; no such run in the tracking store "
                        f"{client.tracking_uri}") from None


def require_tracking_server(uri: str) -> None:
    """Stop with a one-line ``ConfigError`` when no MLflow server answers at an http(s) tracking URI.

    Asked once per process and URI, before anything is created or trained: without it, the first
    logging call would retry for minutes and end in a traceback. Local stores need no check. A
    server that answers is told about spools of its runs still waiting to be pushed, in one line.
    """
    if not is_server_uri(uri) or uri in _reachable:
        return
    from cvae.config import ConfigError

    problem = health_problem(uri, retries=HEALTH_RETRIES)
    if problem is None:
        _reachable.add(uri)
        mention_unpushed_spools(uri)
        return
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


T = TypeVar("T")


class RunLogger:
    """Logs into one run by id. Safe to use from any thread.

    Every call goes through ``call``: when the tracking server stops answering, it waits for it
    (``server_loss``), then logs into the process's spool instead; ``client`` is then the spool's.
    """

    def __init__(self, run_id: str, client: MlflowClient | None = None, experiment_id: str | None = None):
        self.run_id = run_id
        self._server = client or MlflowClient()
        self._experiment_id = experiment_id

    @property
    def client(self) -> MlflowClient:
        """The store this run logs into now: its tracking server's, or the spool's once that was lost."""
        spool = active_spool()
        if spool is None:
            return self._server
        spool.ensure_run(self.run_id, self._experiment_id or "unknown")
        return spool.client

    def call(self, log: Callable[[MlflowClient], T]) -> T:
        """``log(client)``, into the spool when the tracking server does not answer within the wait."""
        while active_spool() is None:
            try:
                return log(self._server)
            except Exception:
                uri = self._server.tracking_uri
                problem = health_problem(uri) if is_server_uri(uri) else None
                if problem is None:  # the server answers: the call failed for a reason of its own
                    raise
                if active_spool() is None and not server_back_after_wait(uri, problem):
                    start_spooling(uri, problem)
        return log(self.client)

    @property
    def spooled(self) -> bool:
        return active_spool() is not None

    @property
    def experiment_id(self) -> str:
        """The run's experiment on the tracking server (asked once, while the server answers)."""
        if self._experiment_id is None:
            self._experiment_id = self.call(lambda client: client.get_run(self.run_id).info.experiment_id)
        return self._experiment_id

    # MlflowClient.log_batch splits what it is given into the store's batch limits itself.
    # Params and tags go through hide_passwords: a URL's password never reaches the store.
    def log_params(self, params: Mapping[str, object]) -> None:
        """Empty values (an option left unset) are not logged: the UI would show a blank cell."""
        batch = [Param(k, hide_passwords(str(v))) for k, v in params.items() if str(v) != ""]
        self.call(lambda client: client.log_batch(self.run_id, params=batch))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.call(lambda client: client.log_batch(self.run_id, metrics=batch))

    def set_tags(self, tags: Mapping[str, object]) -> None:
        batch = [RunTag(k, hide_passwords(str(v))) for k, v in tags.items()]
        self.call(lambda client: client.log_batch(self.run_id, tags=batch))

    def log_figure(self, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt
        try:
            self.call(lambda client: client.log_figure(self.run_id, figure, artifact_file))
        finally:
            plt.close(figure)

    def log_dict(self, data, artifact_file: str) -> None:
        self.call(lambda client: client.log_dict(self.run_id, data, artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.call(lambda client: client.log_text(self.run_id, text, artifact_file))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.call(lambda client: client.log_artifact(self.run_id, path, artifact_path))

    def set_terminated(self, status: str) -> None:
        self.call(lambda client: client.set_terminated(self.run_id, status))


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
    """Create a run explicitly (no global state). Child runs carry their parent's id as a tag.

    None begins once this process lost its tracking server: it ends with ``TrackingLostError``.
    """
    if active_spool() is not None:
        raise lost_error(active_spool())
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


def end_run_for(logger: RunLogger, error: BaseException | None) -> None:
    """Close a run with the status its outcome deserves; the error text goes along with it."""
    if error is None:
        logger.set_terminated("FINISHED")
        return
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    message = "".join(traceback.format_exception_only(type(error), error)).strip() or type(error).__name__
    try:
        logger.set_tags({"error": message[:5000]})  # set_tags hides passwords
        if status == "FAILED":
            logger.log_text(hide_passwords("".join(traceback.format_exception(error))), "error.txt")
    finally:
        logger.set_terminated(status)


@contextlib.contextmanager
def entry_point_run(experiment: str | None = None, run_name: str | None = None,
                    tags: Mapping[str, str] | None = None, reopen: str | None = None) -> Iterator[RunLogger]:
    """The run of an entry point: the one `mlflow run` created ($MLFLOW_RUN_ID), else ``reopen`` (an
    ended or dead run, RUNNING again, as ``mlflow.start_run(run_id=...)`` makes it), else a new one.

    Whatever happens inside, the run does not stay RUNNING: FINISHED on success (its local
    checkpoint, no longer needed, is removed), KILLED on Ctrl-C, FAILED on an error. When the
    tracking server was lost meanwhile, the run ends so in the spool, and a run that succeeded
    raises ``TrackingLostError`` (naming the spool) after.
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
    logger.experiment_id  # asked now, while the server answers: a spool records it
    from pipelines.tracking.liveness import heartbeat  # the tag `stale_runs` reads to find killed runs
    try:
        with heartbeat(client, run_id):
            yield logger
    except BaseException as error:
        end_run_for(logger, error)
        if logger.spooled and not isinstance(error, TrackingLostError):  # the error's line names it
            log.warning(str(lost_error(active_spool())))
        raise
    end_run_for(logger, None)
    from pipelines.tracking.checkpoints import discard_local  # imports torch: only where a run ends
    discard_local(run_id)
    if logger.spooled:
        raise lost_error(active_spool())


def command_line() -> str:
    """The command as started (``-m module`` and empty arguments included), shell-quoted, with
    any password in a URL shown as ``***``."""
    return hide_passwords(shlex.join(sys.orig_argv))
