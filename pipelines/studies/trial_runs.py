"""The MLflow runs of a study's trials: one child run per trial, closed whatever happens to the trial.

Every call names its run explicitly (``MlflowClient`` + run id): trials never go through MLflow's
thread-local "active run". Optuna's ``MLflowCallback`` is not used: it is deprecated and logs
after the trial ends, from one place, so it serialises trials and cannot see pruning as it happens.
A trial keeps its run's id (``RUN_ID_ATTR``) and its parent's (``PARENT_RUN_ID_ATTR``).
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

from pipelines.tracking.checkpoints import discard_local
from pipelines.tracking.liveness import heartbeat
from pipelines.tracking.runs import RunLogger, end_run_for, start_run

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
    says what Optuna recorded: COMPLETE, PRUNED or FAIL.
    """
    run_id = start_run(client, run_name=f"trial-{trial.number}", parent_run_id=parent_run_id,
                       tags={"study": study_name, "trial_number": str(trial.number), STATE_TAG: "RUNNING"})
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    trial.set_user_attr(PARENT_RUN_ID_ATTR, parent_run_id)
    try:
        with heartbeat(client, run_id):  # `stale_runs` can close it if this worker is killed
            try:
                yield RunLogger(run_id, client)
            except (Exception, KeyboardInterrupt):
                # Every ending Optuna records (pruned, failed, interrupted: what its `_run_trial` catches)
                # is final: only a trial whose worker died is retried, from its checkpoint (``objective``).
                discard_local(run_id)
                raise
            discard_local(run_id)
    except optuna.TrialPruned:
        client.set_tag(run_id, STATE_TAG, TrialState.PRUNED.name)
        client.set_terminated(run_id, "KILLED")
        raise
    except BaseException as error:
        client.set_tag(run_id, STATE_TAG, TrialState.FAIL.name)
        end_run_for(client, run_id, error)
        raise
    client.set_tag(run_id, STATE_TAG, TrialState.COMPLETE.name)
    client.set_terminated(run_id, "FINISHED")


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


def close_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna failed ``trial`` because its worker stopped sending heartbeats: that worker is gone,
    so its child run and its parent run end KILLED here, by the worker that noticed."""
    reason = "the worker running this trial stopped sending heartbeats (killed or lost)"
    log.warning(f"trial {trial.number} failed: {reason}")
    client = MlflowClient()
    try:
        for attr in (RUN_ID_ATTR, PARENT_RUN_ID_ATTR):
            run_id = trial.user_attrs.get(attr)
            if run_id and client.get_run(run_id).info.status == "RUNNING":
                client.set_tag(run_id, "error", reason)
                if attr == RUN_ID_ATTR:
                    client.set_tag(run_id, STATE_TAG, TrialState.FAIL.name)
                client.set_terminated(run_id, "KILLED")
    except MlflowException as error:  # the study goes on; the runs stay RUNNING in the UI until closed
        log.warning(f"could not close trial {trial.number}'s MLflow runs: {error}")
