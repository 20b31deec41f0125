"""The MLflow runs of a study's trials: one child run per trial, closed whatever happens to the trial.

Every call names its run explicitly (``MlflowClient`` + run id): trials never go through MLflow's
thread-local "active run". Optuna's ``MLflowCallback`` is not used: it is deprecated and logs
after the trial ends, from one place, so it serialises trials and cannot see pruning as it happens.
A trial keeps its run's id (``RUN_ID_ATTR``), its parent's (``PARENT_RUN_ID_ATTR``) and the
process running it (``WORKER_ATTR``).
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

import optuna
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipelines.studies.storage import WORKER_ATTR, worker_of
from pipelines.tracking.checkpoints import discard_local
from pipelines.tracking.liveness import PROCESS_TAG, ProcessId, heartbeat
from pipelines.tracking.runs import RunLogger, end_run_for, start_run
from pipelines.tracking.server_loss import active_spool

log = logging.getLogger(__name__)

RUN_ID_ATTR = "mlflow_run_id"
PARENT_RUN_ID_ATTR = "mlflow_parent_run_id"
STATE_TAG = "trial_state"


@contextlib.contextmanager
def trial_run(client: MlflowClient, parent_run_id: str, study_name: str,
              trial: optuna.Trial) -> Iterator[RunLogger]:
    """The child run of one trial, closed with the status its outcome deserves.

    Complete: FINISHED. Pruned: KILLED (MLflow has no "pruned" status) with the metrics it
    reached. Interrupted: KILLED. Any error: FAILED with the error text. The ``trial_state`` tag
    says what Optuna recorded: COMPLETE, PRUNED or FAIL. A trial whose tracking server was lost
    meanwhile ends so in the process's spool, and the study starts no further run.
    """
    trial.set_user_attr(WORKER_ATTR, ProcessId.current().as_dict())  # first: a worker killed from here on can be seen gone
    run_id = start_run(client, run_name=f"trial-{trial.number}", parent_run_id=parent_run_id,
                       tags={"study": study_name, "trial_number": str(trial.number), STATE_TAG: "RUNNING"})
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    trial.set_user_attr(PARENT_RUN_ID_ATTR, parent_run_id)
    logger = RunLogger(run_id, client)
    logger.experiment_id  # asked now, while the server answers: a spool records it
    try:
        with heartbeat(client, run_id):  # `stale_runs` can close it if this worker is killed
            try:
                yield logger
            except (Exception, KeyboardInterrupt):
                # Every ending Optuna records (pruned, failed, interrupted: what its `_run_trial` catches)
                # is final: only a trial whose worker died is retried, from its checkpoint (``objective``).
                discard_local(run_id)
                raise
            discard_local(run_id)
    except optuna.TrialPruned:
        logger.set_tags({STATE_TAG: TrialState.PRUNED.name})
        logger.set_terminated("KILLED")
        raise
    except BaseException as error:
        logger.set_tags({STATE_TAG: TrialState.FAIL.name})
        end_run_for(logger, error)
        raise
    logger.set_tags({STATE_TAG: TrialState.COMPLETE.name})
    logger.set_terminated("FINISHED")


def stop_when_tracking_lost(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna callback: no further trial once the tracking server was lost (this trial went on
    into the spool); the study is then not concluded (see ``tune.run_and_conclude``)."""
    if active_spool() is not None:
        study.stop()


def retried_run_id(trial: optuna.Trial) -> str | None:
    """The MLflow run of the trial ``trial`` retries, when it is Optuna's retry of a trial whose worker died
    (``RetryHeartbeatStaleTrialCallback``, which gives the retry the user attributes of the trial it
    retries, that trial's run id among them); None otherwise. Call it before ``trial_run`` sets the
    trial's own run id."""
    frozen = next((t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.number == trial.number), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable in use since 2.8
        retried = frozen is not None and RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen) is not None
    return trial.user_attrs.get(RUN_ID_ATTR) if retried else None


def close_abandoned_trial(study: optuna.Study, client: MlflowClient, trial: optuna.Trial) -> None:
    """After Ctrl-C outside the objective: neither the trial nor its run may stay RUNNING."""
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    if run_id and client.get_run(run_id).info.status == "RUNNING":
        client.set_tag(run_id, STATE_TAG, TrialState.FAIL.name)
        client.set_terminated(run_id, "KILLED")


def _stale_reason(trial: FrozenTrial) -> str:
    worker = worker_of(trial)
    if worker is not None and worker.is_gone():
        return f"the worker running this trial ({worker}) is gone (killed)"
    return "the worker running this trial stopped sending heartbeats (killed or lost)"


def close_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna failed ``trial`` because its worker is gone (no heartbeats, or its process ended on
    this machine), so its child run ends KILLED here, by the worker that noticed; and so does its
    parent run, unless the process holding that one (``PROCESS_TAG``: the coordinator of
    `--workers N`) is known to run still."""
    reason = _stale_reason(trial)
    log.warning(f"trial {trial.number} failed: {reason}")
    client = MlflowClient()
    try:
        for attr in (RUN_ID_ATTR, PARENT_RUN_ID_ATTR):
            run_id = trial.user_attrs.get(attr)
            run = client.get_run(run_id) if run_id else None
            if run is None or run.info.status != "RUNNING":
                continue
            owner = ProcessId.parse(run.data.tags.get(PROCESS_TAG))
            if attr == PARENT_RUN_ID_ATTR and owner is not None and owner.is_running():
                continue
            client.set_tag(run_id, "error", reason)
            if attr == RUN_ID_ATTR:
                client.set_tag(run_id, STATE_TAG, TrialState.FAIL.name)
            client.set_terminated(run_id, "KILLED")
    except MlflowException as error:  # the study goes on; the runs stay RUNNING in the UI until closed
        log.warning(f"could not close trial {trial.number}'s MLflow runs: {error}")
