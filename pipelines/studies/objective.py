"""The function Optuna calls for a trial: the space's overrides -> ``train`` in a child run -> objective values.

A trial that diverges (NaN) or runs out of memory fails on its own (``TRIAL_FAILURES``) and the
study goes on; anything else stops the study.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Sequence

import optuna
import torch
from mlflow.exceptions import MlflowException

from pipelines.config import RunConfig, with_overrides
from pipelines.data import DatasetSplits
from pipelines.errors import UserError
from pipelines.metrics import OBJECTIVES
from pipelines.recording.record import FULL, TRIAL, record_run
from pipelines.recording.run_description import name_trial
from pipelines.studies.pruning import epoch_reporter
from pipelines.studies.sampling import SAMPLER_SEED_ATTR, trial_seed
from pipelines.studies.settings import StudySettings
from pipelines.studies.trial_runs import retried_run_id, trial_run
from pipelines.tracking.checkpoints import discard_local
from pipelines.tracking.runs import RunLogger
from pipelines.tracking.system_metrics import run_system_metrics
from pipelines.training.resume import RESUMES_TAG, Resume, load_checkpoint
from pipelines.training.train import NonFiniteLossError, TrainResult, train

if TYPE_CHECKING:  # search spaces build on this layer; only their type is named here
    from search_spaces import SearchSpace

log = logging.getLogger(__name__)

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Failures that end one trial (FAIL) while the study goes on; anything else is a bug and stops it.
TRIAL_FAILURES = (NonFiniteLossError, OUT_OF_MEMORY)


def parameter_count(result: TrainResult) -> int:
    return sum(p.numel() for p in result.model.parameters())


def objective_values(objectives: Sequence[str], result: TrainResult) -> list[float]:
    # The epoch whose weights the trial keeps: its model, and the test metrics of a chosen trial, are of those.
    kept = result.history[result.kept_epoch - 1]
    values = [float(parameter_count(result)) if OBJECTIVES[name].metric is None
              else float(kept[OBJECTIVES[name].metric]) for name in objectives]
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLossError(f"objective values are not finite: {dict(zip(objectives, values))}")
    return values


class SearchSpaceError(UserError):
    """A search space raised or returned something other than overrides: named with the trial."""


def _reason(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def trial_config(space: SearchSpace, name: str, trial: optuna.Trial, base: RunConfig) -> RunConfig:
    """The configuration ``space`` asks of ``trial``, or a one-line ``SearchSpaceError`` naming the
    space, the trial and what went wrong (a bug in a user's space is theirs to fix: no traceback of
    ours around it). Optuna's own signals (a pruned trial) and errors that already name a field
    (an override out of range) pass through."""
    try:
        overrides = space(trial, base)
    except (UserError, optuna.TrialPruned):
        raise
    except Exception as error:
        raise SearchSpaceError(f"space={name!r} failed in trial {trial.number}: {_reason(error)}") from None
    if not isinstance(overrides, Mapping) or not all(isinstance(key, str) for key in overrides):
        raise SearchSpaceError(f"space={name!r} returned {type(overrides).__name__} {str(overrides)[:80]!r} in "
                               f"trial {trial.number}; expected a dict of overrides, e.g. "
                               "{'model.latent_dim': 8}")
    try:
        return with_overrides(base, overrides)
    except UserError:
        raise
    except Exception as error:  # a value of a type no field takes (a list for an integer...)
        raise SearchSpaceError(f"space={name!r} returned overrides that cannot be applied in trial "
                               f"{trial.number}: {_reason(error)}") from None


def note_failure(trial: optuna.Trial, error: BaseException) -> None:
    """Keep why a trial failed on the trial itself; free the GPU memory an out-of-memory trial held."""
    trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
    if isinstance(error, OUT_OF_MEMORY) and torch.cuda.is_available():
        torch.cuda.empty_cache()


class TrialObjective:
    """The function Optuna calls: space -> config -> ``train`` in a child run -> objective values.

    Its steps (``trial_context``, ``configure``, ``conclude``) are also those of a trial trained fused
    with others (``studies.fused_trials``): a fused trial is recorded by the same code."""

    def __init__(self, settings: StudySettings, space: SearchSpace, base: RunConfig,
                 parent: RunLogger, splits: DatasetSplits):
        self.settings = settings
        self.space = space
        self.base = base
        self.parent = parent
        self.splits = splits
        self.current: optuna.Trial | None = None  # the trial running now, for clean-up after Ctrl-C

    def trial_context(self, trial: optuna.Trial) -> tuple[contextlib.ExitStack, RunLogger]:
        """The trial's child run (closed as its outcome deserves) and its system metrics, entered, and
        its ``RunLogger``. Leaving the stack with an exception closes the run with it."""
        with contextlib.ExitStack() as stack:
            logger = stack.enter_context(trial_run(self.parent.client, self.parent.run_id, self.settings.name, trial))
            stack.enter_context(run_system_metrics(logger, self.base.execution))
            return stack.pop_all(), logger

    def configure(self, trial: optuna.Trial, logger: RunLogger) -> RunConfig:
        """The trial's configuration from the space, named and logged in its run."""
        config = trial_config(self.space, self.settings.space, trial, self.base)
        name_trial(logger, trial.number, config)
        logger.log_params({f"trial.{k}": v for k, v in trial.params.items()})
        trial.set_user_attr(SAMPLER_SEED_ATTR, trial_seed(self.settings.sampler_seed, trial.number))
        return config

    def shared_splits(self, config: RunConfig) -> DatasetSplits | None:
        """The study's data when the trial uses the same (None: the trial loads its own)."""
        same_data = config.data == self.base.data and config.execution.device == self.base.execution.device
        return self.splits if same_data else None

    def reporter(self, trial: optuna.Trial, config: RunConfig):
        return epoch_reporter(self.settings, trial, config.optim.epochs)

    def conclude(self, logger: RunLogger, result: TrainResult, config: RunConfig) -> list[float]:
        """Objective values of a trained trial; its model and manifest recorded."""
        values = objective_values(self.settings.objectives, result)
        record_run(logger, result, config, FULL if self.settings.trial_artifacts == "all" else TRIAL)
        return values

    def log_values(self, logger: RunLogger, result: TrainResult, values: list[float]) -> None:
        logger.log_metrics({f"objective/{name}": v for name, v in zip(self.settings.objectives, values)},
                           step=result.kept_epoch)

    def retried_checkpoint(self, retried_run: str | None, config: RunConfig) -> Resume | None:
        """The checkpoint of the trial run a retried trial retries (``trial_runs.retried_run_id``), when it
        has one of this configuration; None (the trial starts over) otherwise, with a warning saying why."""
        if retried_run is None:
            return None
        try:
            found = load_checkpoint(self.parent.client, retried_run)
        except (UserError, MlflowException) as error:  # unreadable: start over
            log.warning(f"the retried trial's run {retried_run} has an unusable checkpoint ({error}); starting over")
            return None
        if found is None:
            log.warning(f"the retried trial's run {retried_run} left no checkpoint; the trial starts over")
        elif not found.matches(config):
            log.warning(f"the checkpoint of the retried trial's run {retried_run} is of another configuration "
                        "(the study's base changed); the trial starts over")
            return None
        return found

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.current = trial
        retried_run = retried_run_id(trial)  # before the trial's own run replaces it
        stack, logger = self.trial_context(trial)
        with stack:
            try:
                config = self.configure(trial, logger)
                resume = self.retried_checkpoint(retried_run, config)
                if resume is not None:
                    logger.set_tags({RESUMES_TAG: resume.run_id})
                result = train(config, logger, on_epoch=self.reporter(trial, config),
                               splits=self.shared_splits(config), resume=resume)
                values = self.conclude(logger, result, config)
                if resume is not None:
                    discard_local(resume.run_id)
            # A tracking server lost for longer than MLflow's bounded retries also fails the trial
            # with its reason, though it stops this worker (it is not in catch=TRIAL_FAILURES).
            except (*TRIAL_FAILURES, MlflowException) as error:
                note_failure(trial, error)
                raise
            self.log_values(logger, result, values)
        return values[0] if len(values) == 1 else values
