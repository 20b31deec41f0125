"""Fused trials (`tune --fuse K`): the study asks Optuna for up to K trials at a time and trains those
of one structure as one stacked model (``training.fused``).

Optuna's ask-and-tell: the K trials are asked together (TPE's constant liar counts the ones still
running), each gets its child run and configuration from the space, exactly as ``TrialObjective``
gives a trial alone, and they are grouped by ``structure_key`` (what decides tensor shapes). A group
of several trains fused; a group of one, or one that cannot fuse (``fusion_refusal_for``, logged in
one line), trains alone. Every member stays a full trial: its own run, per-epoch metrics, pruning
(a pruned member leaves its group), early stopping, best checkpoint, objective values, model and
manifest, recorded by ``TrialObjective``'s own steps; its run is tagged ``fused_with`` (the other
members' trial numbers) and ``fused_population``, and its manifest's ``fusion`` says the same.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from typing import Sequence

import optuna
import torch
from mlflow.exceptions import MlflowException
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.trial import TrialState

from pipelines.config import RunConfig
from pipelines.studies.objective import TRIAL_FAILURES, TrialObjective, note_failure
from pipelines.studies.settings import FUSE_AUTO
from pipelines.studies.trial_runs import close_abandoned_trial
from pipelines.tracking.runs import RunLogger
from pipelines.training.devices import free_memory_bytes
from pipelines.training.fused import Member, fusion_refusal_for, member_bytes, structure_key, train_fused
from pipelines.training.train import TrainResult, train

log = logging.getLogger(__name__)

FUSED_WITH_TAG = "fused_with"
FUSED_POPULATION_TAG = "fused_population"


class _Asked:
    """One asked trial: its open run (``stack``), logger and configuration."""

    def __init__(self, trial: optuna.Trial, stack: contextlib.ExitStack, logger: RunLogger):
        self.trial, self.stack, self.logger = trial, stack, logger
        self.config: RunConfig | None = None


# fuse="auto". On CUDA: as many trials at a time as a quarter of the free memory holds (workers may
# share the device), at most AUTO_FUSE_MOST, and at most a quarter of the trials, so that the sampler
# learns from at least four populations (it sees nothing of a population's results until it ends).
# On the CPU: CPU_AUTO_FUSE, from benchmarks/RESULTS.md (fused trials on 2 cores).
AUTO_FUSE_MOST, AUTO_FUSE_MEMORY_SHARE, AUTO_FUSE_ROUNDS = 64, 0.25, 4
CPU_AUTO_FUSE = 1


def choose_fuse(fuse: int | str, base: RunConfig, device: torch.device, image_shape, num_classes: int,
                n_trials: int | None) -> int:
    """The number of trials to ask at a time: ``fuse`` itself, or for "auto" what the device gains from
    (said in one line)."""
    if fuse != FUSE_AUTO:
        return int(fuse)
    if device.type != "cuda":
        log.info(f"fuse=auto: {CPU_AUTO_FUSE} trial(s) at a time on {device} (fused trials gain little on a "
                 "CPU: benchmarks/RESULTS.md)")
        return CPU_AUTO_FUSE
    per_member = member_bytes(base, image_shape, num_classes)
    free = free_memory_bytes(device) or 0
    by_memory = max(1, int(free * AUTO_FUSE_MEMORY_SHARE // per_member))
    by_trials = AUTO_FUSE_MOST if n_trials is None else max(1, math.ceil(n_trials / AUTO_FUSE_ROUNDS))
    chosen = min(AUTO_FUSE_MOST, by_memory, by_trials)
    log.info(f"fuse=auto: up to {chosen} trials at a time on {device} (a member needs about "
             f"{per_member / 2**20:,.0f} MiB, {free / 2**30:,.1f} GiB free; at most {AUTO_FUSE_MOST}, and a "
             f"quarter of the {n_trials if n_trials is not None else 'unlimited'} trials)")
    return chosen


def population_size(fuse: int, n_trials: int | None, done: int, study: optuna.Study,
                    stop_at_trials: int | None) -> int:
    """How many trials to ask for now: ``fuse``, or fewer where ``n_trials`` or ``stop_at_trials`` end sooner."""
    size = fuse if n_trials is None else min(fuse, n_trials - done)
    if stop_at_trials is not None:
        size = min(size, stop_at_trials - len(study.get_trials(deepcopy=False)))
    return max(size, 0)


def run_fused_trials(study: optuna.Study, objective: TrialObjective, fuse: int, n_trials: int | None,
                     timeout: float | None, stop_at_trials: int | None) -> None:
    """Ask, train and tell populations of up to ``fuse`` trials until ``n_trials`` are done, the study
    holds ``stop_at_trials`` trials, or ``timeout`` seconds have passed (no population starts after it)."""
    started, done = time.monotonic(), 0
    with warnings.catch_warnings():
        # Heartbeats with ask-and-tell: this loop keeps them itself (a heartbeat thread per asked trial,
        # stale trials failed before each population), so Optuna's warning that they are meant for
        # study.optimize, and fail_stale_trials' "experimental" (in use since Optuna 2.9), say nothing.
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize",
                                UserWarning)
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        while True:
            size = population_size(fuse, n_trials, done, study, stop_at_trials)
            if size <= 0 or (timeout is not None and time.monotonic() - started >= timeout):
                return
            if is_heartbeat_enabled(study._storage):
                optuna.storages.fail_stale_trials(study)  # as study.optimize does before each trial
            run_population(study, objective, [study.ask() for _ in range(size)])
            done += size


def run_population(study: optuna.Study, objective: TrialObjective, trials: Sequence[optuna.Trial]) -> None:
    """Configure ``trials``, train them in groups, tell Optuna each outcome. Should anything stop the
    population (Ctrl-C, a lost tracking server), every run still open closes with it (KILLED after
    Ctrl-C) and every trial not yet told is failed."""
    try:
        with contextlib.ExitStack() as population:
            asked: list[_Asked] = []
            for trial in trials:
                population.enter_context(get_heartbeat_thread(trial._trial_id, study._storage))
                stack, logger = objective.trial_context(trial)
                member = _Asked(trial, population.enter_context(stack), logger)
                asked.append(member)
                with _outcome(study, member):
                    member.config = objective.configure(trial, logger)
            for group in _groups([m for m in asked if m.config is not None]):
                _train_group(study, objective, group)
    except BaseException:
        for trial in trials:
            close_abandoned_trial(study, objective.parent.client, trial)
        raise


def _groups(asked: Sequence[_Asked]) -> list[list[_Asked]]:
    """Trials of one structure together, in the order asked; those that cannot fuse one by one."""
    groups: dict[tuple, list[_Asked]] = {}
    singles: list[list[_Asked]] = []
    for member in asked:
        refusal = fusion_refusal_for(member.config)
        if refusal:
            log.info(f"trial {member.trial.number} trains alone: {refusal}")
            singles.append([member])
        else:
            groups.setdefault(structure_key(member.config), []).append(member)
    return [*groups.values(), *singles]


@contextlib.contextmanager
def _outcome(study: optuna.Study, member: _Asked, close: bool = False):
    """What happens inside decides the member's trial: an exception closes its run with it (as
    ``trial_run`` closes any trial's) and tells Optuna: pruned PRUNED, a trial failure (divergence, out
    of memory) FAIL while the study goes on; anything else FAIL, and it propagates (a lost tracking
    server stops the study, as it stops ``study.optimize``). ``close``: close the run when all went well."""
    trial = member.trial
    try:
        try:
            yield
        except BaseException as error:
            if isinstance(error, (*TRIAL_FAILURES, MlflowException)):
                note_failure(trial, error)
            with member.stack:
                raise
        if close:
            member.stack.close()
    except optuna.TrialPruned as pruned:
        log.info(f"trial {trial.number} pruned: {pruned}")
        study.tell(trial, state=TrialState.PRUNED)
        member.config = None
    except TRIAL_FAILURES as error:
        log.warning(f"trial {trial.number} failed: {type(error).__name__}: {error}")
        study.tell(trial, state=TrialState.FAIL)
        member.config = None
    except Exception:
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


def _tell(study: optuna.Study, member: _Asked, objective: TrialObjective, result: TrainResult) -> None:
    """Record a trained member in its run, close the run, tell Optuna its values."""
    with _outcome(study, member, close=True):
        values = objective.conclude(member.logger, result, member.config)
        objective.log_values(member.logger, result, values)
    if member.config is not None:  # recorded (a failure while recording was told above)
        study.tell(member.trial, values)


def _train_group(study: optuna.Study, objective: TrialObjective, group: Sequence[_Asked]) -> None:
    first = group[0]
    splits = objective.shared_splits(first.config)
    if len(group) == 1:
        with _outcome(study, first):
            result = train(first.config, first.logger, on_epoch=objective.reporter(first.trial, first.config),
                           splits=splits)
        if first.config is not None:
            _tell(study, first, objective, result)
        return
    numbers = [m.trial.number for m in group]
    log.info(f"trials {', '.join(map(str, numbers))} train fused, as one model")
    for member in group:
        with _outcome(study, member):
            member.logger.set_tags({FUSED_WITH_TAG: ",".join(str(n) for n in numbers if n != member.trial.number),
                                    FUSED_POPULATION_TAG: str(len(group))})
    live = [m for m in group if m.config is not None]
    members = [Member(m.config, m.logger, objective.reporter(m.trial, m.config), f"trial {m.trial.number}")
               for m in live]
    try:
        outcomes = train_fused(members, splits)
    except Exception as error:  # the group failed as a whole (out of memory): so does each member
        outcomes = [error] * len(live)
    for member, outcome in zip(live, outcomes):
        if isinstance(outcome, BaseException):
            with _outcome(study, member):
                raise outcome
        else:
            _tell(study, member, objective, outcome)
