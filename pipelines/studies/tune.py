"""The flow of an Optuna study: prepare it, run trials under a parent run, conclude it.

Every trial trains through ``train`` with the study's base configuration plus a space's overrides.
A study with the same name and storage resumes, and several processes on one storage share the
work (``workers``). What each step uses lives beside this module: ``settings``, ``storage``,
``sampling``, ``pruning``, ``objective``, ``trial_runs`` (the trials' MLflow runs), ``chosen_trials``
and ``study_summary``.
"""
from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING, Callable

import mlflow
import optuna
from mlflow import MlflowClient

from cvae.config import ConfigError
from pipelines.config import RunConfig, flatten
from pipelines.data import DatasetSplits, load_splits
from pipelines.metrics import LIKELIHOOD_KIND_TAG, objective_name, run_likelihood_kind
from pipelines.studies.chosen_trials import chosen_trials, record_chosen_trials
from pipelines.studies.fused_trials import choose_fuse, run_fused_trials
from pipelines.studies.objective import TRIAL_FAILURES, TrialObjective
from pipelines.studies.optuna_log import one_line_stops
from pipelines.studies.pruning import build_pruner, pruning_note
from pipelines.studies.sampling import build_sampler
from pipelines.studies.settings import StudySettings, study_params, trials_to_run
from pipelines.studies.storage import load_or_create_study, local_stores_lock
from pipelines.studies.study_summary import summarise_study
from pipelines.studies.trial_runs import close_abandoned_trial, close_stale_trial, stop_when_tracking_lost
from pipelines.tracking.liveness import close_runs_of_gone_processes
from pipelines.tracking.runs import RunLogger, require_tracking_server, resolve_experiment_id
from pipelines.tracking.server_loss import active_spool, lost_error
from pipelines.training.devices import resolve_device

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # search spaces build on this layer; only their type is named here
    from search_spaces import SearchSpace

OBJECTIVES_ATTR = "objectives"


def prepare_study(settings: StudySettings, base: RunConfig, experiment: str | None) -> optuna.Study:
    """Create or load the study, and make sure the MLflow experiment exists, before any run opens.

    Returns the study with its sampler and pruner. An unreachable storage fails here with a
    ``ConfigError``, so bad input leaves nothing behind.
    """
    require_tracking_server(mlflow.get_tracking_uri())  # not even an empty study without a server
    with local_stores_lock([settings.storage, mlflow.get_tracking_uri()]):
        study = load_or_create_study(settings.storage, settings.name, len(settings.objectives),
                                     settings.heartbeat_grace_s, close_stale_trial)
        experiment_id = resolve_experiment_id(MlflowClient(), experiment)  # the client creates MLflow's tables
    # Parent runs of studies whose process was killed between trials (no trial of theirs was left RUNNING).
    for run_id in close_runs_of_gone_processes(MlflowClient(), [experiment_id]):
        log.warning(f"run {run_id} ended KILLED: the process holding it open is gone (killed)")
    recorded = study.user_attrs.get(OBJECTIVES_ATTR)
    if recorded is None:
        study.set_user_attr(OBJECTIVES_ATTR, list(settings.objectives))
        with warnings.catch_warnings():  # still "experimental" in Optuna 5.0, in use since 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(settings.objectives))  # optuna-dashboard shows "neg_elbo", not "Objective 0"
    elif tuple(objective_name(name) for name in recorded) != settings.objectives:
        raise ConfigError(f"objectives={','.join(settings.objectives)!r} is not valid for study "
                          f"{settings.name!r}, which optimises {','.join(recorded)}; use those or a new study name")
    study.sampler = build_sampler(settings, settings.sampler_seed)
    study.pruner = build_pruner(settings, base)
    return study


def run_trials(study: optuna.Study, settings: StudySettings, space: SearchSpace, base: RunConfig,
               parent: RunLogger, n_trials: int | None, splits: DatasetSplits | None = None,
               stop_at_trials: int | None = None) -> DatasetSplits:
    """Run this process's trials as children of ``parent`` (at most ``n_trials``, and none once the
    study holds ``stop_at_trials`` trials of any state); return the data they shared. Where
    ``settings.fuse`` (``choose_fuse`` for "auto") is above 1, trials are asked up to that many at a time
    and trained fused (``fused_trials``).

    Ctrl-C (or SIGTERM) fails the running trial, closes its run KILLED and propagates.
    """
    device = resolve_device(base.execution)
    splits = splits or load_splits(base.data, device)
    objective = TrialObjective(settings, space, base, parent, splits)
    callbacks = [stop_when_tracking_lost]
    if stop_at_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(stop_at_trials, states=None))
    try:
        with one_line_stops():
            fuse = choose_fuse(settings.fuse, base, device, splits.image_shape, splits.num_classes, n_trials)
            if fuse > 1:
                run_fused_trials(study, objective, fuse, n_trials, settings.timeout, stop_at_trials)
                return splits
            # No gc_after_trial: a full collection over torch's and MLflow's objects took seconds per
            # trial, and a trial's model and optimizer are freed by reference counting anyway.
            study.optimize(objective, n_trials=n_trials, timeout=settings.timeout, catch=TRIAL_FAILURES,
                           callbacks=callbacks)
    except KeyboardInterrupt:
        if objective.current is not None:
            close_abandoned_trial(study, parent.client, objective.current)
        raise
    return splits


def conclude_study(study: optuna.Study, settings: StudySettings, base: RunConfig, parent: RunLogger,
                   splits: DatasetSplits | None) -> None:
    """From one snapshot of the trials: record the chosen trials in full, then summarise the study
    in the parent run and register the best model, all about the same trials."""
    trials = study.get_trials(deepcopy=False)
    chosen = chosen_trials(trials, len(settings.objectives))
    record_chosen_trials(parent.client, chosen, base, splits, resolve_device(base.execution))
    summarise_study(study, parent, settings.objectives, run_likelihood_kind(base), settings.register_as or None,
                    trials, chosen)


def run_and_conclude(study: optuna.Study, settings: StudySettings, base: RunConfig, parent: RunLogger,
                     run: Callable[[], DatasetSplits | None]) -> None:
    """Record the study's settings in the parent run, ``run`` the trials (this process's, or its
    workers'), then conclude the study; after Ctrl-C too, on the trials so far, before it propagates."""
    note = pruning_note(settings)
    if note:
        log.warning(note)
    parent.log_params({**study_params(settings), **{f"base.{k}": v for k, v in flatten(base).items()}})
    # Every trial keeps the study's likelihood (the spaces leave it alone): what its values are.
    parent.set_tags({LIKELIHOOD_KIND_TAG: run_likelihood_kind(base)})
    try:
        splits = run()
    except KeyboardInterrupt:
        log.warning("interrupted: the running trials are marked failed; summarising the study so far")
        conclude_study(study, settings, base, parent, None)
        raise
    if parent.spooled:  # the tracking server was lost: the study is concluded by a later invocation
        raise lost_error(active_spool())
    conclude_study(study, settings, base, parent, splits)


def run_study(study: optuna.Study, settings: StudySettings, space: SearchSpace, base: RunConfig,
              parent: RunLogger) -> None:
    """Run this invocation's trials in this process, then conclude the study in the parent run."""
    run_and_conclude(study, settings, base, parent,
                     lambda: run_trials(study, settings, space, base, parent, trials_to_run(settings)))
