"""Optuna studies: every trial trains through ``train`` with the study's base config plus a space's overrides.

Storage is any Optuna storage URL (SQLite ``optuna.db`` by default, ``journal:PATH`` for Optuna's
journal file, PostgreSQL for many workers); a study with the same name and storage resumes, and
several processes on one storage share the work. Tracking of trials lives in ``tune_tracking``.
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import mlflow
import optuna
import torch
from mlflow import MlflowClient
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from cvae.config import ConfigError, require, require_choice
from pipelines.config import RunConfig, flatten, with_overrides
from pipelines.data import DataUnavailableError, DatasetSplits, load_splits
from pipelines.execution import resolve_device
from pipelines.tracking import RunLogger, resolve_experiment_id
from pipelines.train import NonFiniteLossError, TrainResult, train
from pipelines.tune_tracking import (close_abandoned_trial, close_stale_trial, local_stores_lock, summarise_study,
                                     trial_run)
from search_spaces import SearchSpace

DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_PREFIX = "journal:"
SQLITE_TIMEOUT_S = 60  # how long a writer waits for SQLite's lock before "database is locked"
HEARTBEAT_GRACE_S = 120  # a running trial silent this long belongs to a dead worker
SAMPLERS = ("auto", "tpe", "random", "cmaes", "nsga2", "bruteforce")
PRUNERS = ("median", "hyperband", "none")
# Objective name -> the per-epoch validation metric it is read from (None: not a per-epoch quantity).
OBJECTIVES = {
    "nll": "val/neg_elbo",  # recon + KL at beta = 1: an upper bound on the NLL, comparable across beta
    "loss": "val/loss",  # the training objective recon + beta * KL, at the trial's own beta
    "recon": "val/recon",
    "kl": "val/kl",
    "params": None,  # number of model parameters
}
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Failures that end one trial (FAIL) while the study goes on; anything else is a bug and stops it.
TRIAL_FAILURES = (NonFiniteLossError, OUT_OF_MEMORY)
OBJECTIVES_ATTR = "objectives"
DEFAULT_TRIALS = 20


@dataclass(frozen=True)
class StudySettings:
    name: str = "cvae"
    storage: str = DEFAULT_STORAGE
    space: str = "default"
    objectives: tuple[str, ...] = ("nll",)
    sampler: str = "auto"  # tpe for one objective, nsga2 for several
    sampler_seed: int = 0
    pruner: str = "median"
    pruner_startup_trials: int = 5
    pruner_warmup_epochs: int = 0
    n_trials: int | None = None  # per process; None with no timeout means DEFAULT_TRIALS
    timeout: float | None = None  # seconds
    register_as: str = ""  # registered model name; "" registers nothing
    heartbeat_grace_s: int = HEARTBEAT_GRACE_S

    def __post_init__(self):
        require(bool(self.name.strip()), "study", self.name, "a non-empty study name")
        require(len(self.objectives) >= 1 and len(set(self.objectives)) == len(self.objectives),
                "objectives", ",".join(self.objectives), "distinct names, e.g. nll or recon,kl")
        for name in self.objectives:
            require_choice("objectives", name, tuple(OBJECTIVES))
        require(self.multi_objective or self.objectives != ("params",), "objectives", "params",
                "params only beside another objective, e.g. nll,params")
        require_choice("sampler", self.sampler, SAMPLERS)
        require(not (self.multi_objective and self.sampler == "cmaes"), "sampler", self.sampler,
                "a multi-objective sampler (auto, nsga2, tpe, random): CMA-ES optimises one objective")
        require_choice("pruner", self.pruner, PRUNERS)
        require(self.pruner_startup_trials >= 0, "pruner_startup_trials", self.pruner_startup_trials,
                "an integer >= 0")
        require(self.pruner_warmup_epochs >= 0, "pruner_warmup_epochs", self.pruner_warmup_epochs,
                "an integer >= 0")
        require(self.n_trials is None or self.n_trials >= 1, "n_trials", self.n_trials, "an integer >= 1")
        require(self.timeout is None or self.timeout > 0, "timeout", self.timeout, "a number of seconds > 0")
        require(self.heartbeat_grace_s >= 2, "heartbeat_grace", self.heartbeat_grace_s, "an integer >= 2 (seconds)")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def prunes(self) -> bool:
        return self.pruner != "none" and not self.multi_objective


def display_url(url: str) -> str:
    """The storage URL without its password, fit for logs and run params."""
    if url.startswith(JOURNAL_PREFIX):
        return url
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: Optuna will say so when it opens it
        return url


def open_storage(url: str, heartbeat_grace_s: int = HEARTBEAT_GRACE_S) -> BaseStorage:
    """An Optuna storage; database ones get heartbeats, so a worker killed mid-trial (kill -9, a lost
    machine) does not leave its trial RUNNING: the next worker fails it and closes its MLflow runs."""
    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX):]
        require(bool(path), "storage", url, "journal:PATH, e.g. journal:optuna.log")
        return JournalStorage(JournalFileBackend(path))
    import contextlib
    import functools
    import importlib.util
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    startup_lock_key = 0x63766165  # any fixed 64-bit key, the same in every worker ("cvae")

    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite:") else {}
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None \
            and importlib.util.find_spec("psycopg") is not None:
        # SQLAlchemy reads plain postgresql:// as psycopg2; the [postgres] extra installs psycopg 3.
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    with warnings.catch_warnings(), contextlib.ExitStack() as startup:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are stable in use
        if url.startswith("postgres"):
            # Workers starting together on a fresh database race to create Optuna's tables
            # ("duplicate key value violates unique constraint pg_type_typname_nsp_index"): one
            # creates them under a PostgreSQL advisory lock while the others wait, on any machine.
            import sqlalchemy
            engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            startup.callback(engine.dispose)
            lock = startup.enter_context(engine.connect())  # closing it releases the lock
            lock.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": startup_lock_key})
        # A dead worker's trial: close its MLflow runs, then queue it once more (same params) for
        # the next free worker. Once: a trial that kills its worker twice is not tried a third time.
        on_stale = functools.partial(close_stale_trial, retry=RetryHeartbeatStaleTrialCallback(max_retry=1))
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=max(1, heartbeat_grace_s // 4),
                          grace_period=heartbeat_grace_s, heartbeat_stale_trial_callback=on_stale)


def _sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "tpe":
        # group=True: the spaces are conditional (conv and mlp have different parameters).
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if kind == "bruteforce":
        # Every combination once, then the study stops: right for small categorical spaces
        # such as `architectures`, where a random draw would repeat presets.
        return optuna.samplers.BruteForceSampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def build_sampler(settings: StudySettings, seed: int) -> optuna.samplers.BaseSampler:
    kind = settings.sampler
    if kind == "auto":
        kind = "nsga2" if settings.multi_objective else "tpe"
    # Optuna still labels TPE's `group` and the brute-force sampler experimental; the warning
    # would only alarm users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _sampler(kind, seed)


def build_pruner(settings: StudySettings, base: RunConfig) -> optuna.pruners.BasePruner:
    if not settings.prunes:
        return optuna.pruners.NopPruner()
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=base.optim.epochs)
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                       n_warmup_steps=settings.pruner_warmup_epochs)


def prepare_study(settings: StudySettings, base: RunConfig, experiment: str | None) -> tuple[optuna.Study, int]:
    """Create or load the study, and make sure the MLflow experiment exists, before any run opens.

    Returns the study, with its sampler and pruner, and the sampler's seed. An unreachable storage
    fails here with a ``ConfigError``, so bad input leaves nothing behind.
    """
    with local_stores_lock([settings.storage, mlflow.get_tracking_uri()]):
        try:
            storage = open_storage(settings.storage, settings.heartbeat_grace_s)
            study = optuna.create_study(storage=storage, study_name=settings.name, load_if_exists=True,
                                        directions=["minimize"] * len(settings.objectives))
        except ConfigError:
            raise
        except Exception as error:  # SQLAlchemy, driver or file errors: all mean "cannot use this storage"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if isinstance(error, ImportError) and settings.storage.startswith("postgres"):
                missing = error.__cause__ or error  # Optuna re-raises SQLAlchemy's ImportError with its own text
                reason = f"no PostgreSQL driver ({missing}): pip install 'cvae-harness[postgres]' (psycopg 3)"
            raise ConfigError(f"storage={display_url(settings.storage)!r} is not valid; cannot open it: "
                              f"{reason}") from None
        resolve_experiment_id(MlflowClient(), experiment)  # the client creates MLflow's tables
    recorded = study.user_attrs.get(OBJECTIVES_ATTR)
    if recorded is None:
        study.set_user_attr(OBJECTIVES_ATTR, list(settings.objectives))
    elif tuple(recorded) != settings.objectives:
        raise ConfigError(f"objectives={','.join(settings.objectives)!r} is not valid for study "
                          f"{settings.name!r}, which optimises {','.join(recorded)}; use those or a new study name")
    # Seeded by the study's size too, so a resumed study does not replay its first random trials.
    sampler_seed = settings.sampler_seed + len(study.trials)
    study.sampler = build_sampler(settings, sampler_seed)
    study.pruner = build_pruner(settings, base)
    return study, sampler_seed


def parameter_count(result: TrainResult) -> int:
    return sum(p.numel() for p in result.model.parameters())


def objective_values(objectives: Sequence[str], result: TrainResult) -> list[float]:
    best_epoch = result.history[result.best_epoch - 1]
    values = [float(parameter_count(result)) if OBJECTIVES[name] is None else float(best_epoch[OBJECTIVES[name]])
              for name in objectives]
    if not all(math.isfinite(v) for v in values):
        raise NonFiniteLossError(f"objective values are not finite: {dict(zip(objectives, values))}")
    return values


class _StopsWithoutTraceback(logging.Filter):
    """Optuna logs every exception that ends a trial, with its traceback, and then re-raises it. A
    bad value from a search space (or missing data, or Ctrl-C) stops the whole study, and the entry
    point reports it in one line: drop Optuna's two records of it (the trial is still recorded FAIL)."""

    STOPS = (ConfigError, DataUnavailableError, KeyboardInterrupt)

    def __init__(self):
        super().__init__()
        self._dropped_trial: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and isinstance(record.exc_info[1], self.STOPS):
            self._dropped_trial = message.split(" failed", 1)[0]  # "Trial 3"
            return False
        if self._dropped_trial and message.startswith(f"{self._dropped_trial} failed with value"):
            self._dropped_trial = None
            return False
        return True


logging.getLogger("optuna.study._optimize").addFilter(_StopsWithoutTraceback())


class TrialObjective:
    """The function Optuna calls: space -> config -> ``train`` in a child run -> objective values."""

    def __init__(self, settings: StudySettings, space: SearchSpace, base: RunConfig,
                 parent: RunLogger, splits: DatasetSplits):
        self.settings = settings
        self.space = space
        self.base = base
        self.parent = parent
        self.splits = splits
        self.current: optuna.Trial | None = None

    def _report(self, trial: optuna.Trial, epochs: int):
        metric = OBJECTIVES[self.settings.objectives[0]]

        def on_epoch(epoch: int, metrics: dict) -> None:
            trial.report(metrics[metric], step=epoch)
            # Pruning after the last epoch would save nothing and throw a finished result away.
            if epoch < epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric} {metrics[metric]:.4f}")

        return on_epoch if self.settings.prunes else None

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.current = trial
        with trial_run(self.parent.client, self.parent.run_id, self.settings.name, trial) as logger:
            try:
                config = with_overrides(self.base, self.space(trial, self.base))
                logger.log_params({f"trial.{k}": v for k, v in trial.params.items()})
                same_data = config.data == self.base.data and config.execution.device == self.base.execution.device
                result = train(config, logger, on_epoch=self._report(trial, config.optim.epochs),
                               splits=self.splits if same_data else None)
                values = objective_values(self.settings.objectives, result)
            except TRIAL_FAILURES as error:
                trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
                if isinstance(error, OUT_OF_MEMORY) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise
            logger.log_metrics({f"objective/{name}": v for name, v in zip(self.settings.objectives, values)},
                               step=result.best_epoch)
        return values[0] if len(values) == 1 else values


def study_params(settings: StudySettings, sampler_seed: int) -> dict[str, object]:
    return {"study.name": settings.name, "study.storage": display_url(settings.storage),
            "study.space": settings.space, "study.objectives": ",".join(settings.objectives),
            "study.sampler": settings.sampler, "study.sampler_seed": sampler_seed,
            "study.pruner": settings.pruner if settings.prunes else "none",
            "study.n_trials": settings.n_trials or "", "study.timeout": settings.timeout or ""}


def run_study(study: optuna.Study, settings: StudySettings, space: SearchSpace, base: RunConfig,
              parent: RunLogger, sampler_seed: int) -> None:
    """Run this process's trials, then summarise the study in the parent run (also after Ctrl-C)."""
    if settings.multi_objective and settings.pruner != "none":
        print(f"note: pruner {settings.pruner!r} is off: a multi-objective study cannot prune "
              "(Optuna reports intermediate values for one objective only)", flush=True)
    parent.log_params({**study_params(settings, sampler_seed),
                       **{f"base.{k}": v for k, v in flatten(base).items()}})
    splits = load_splits(base.data, resolve_device(base.execution))
    objective = TrialObjective(settings, space, base, parent, splits)
    n_trials = settings.n_trials or (None if settings.timeout else DEFAULT_TRIALS)
    try:
        study.optimize(objective, n_trials=n_trials, timeout=settings.timeout, catch=TRIAL_FAILURES,
                       gc_after_trial=True)
    except KeyboardInterrupt:
        print("interrupted: the running trial is marked failed; summarising the study so far", flush=True)
        if objective.current is not None:
            close_abandoned_trial(study, parent.client, objective.current)
        summarise_study(study, parent, settings.objectives, settings.register_as or None)
        raise
    summarise_study(study, parent, settings.objectives, settings.register_as or None)
