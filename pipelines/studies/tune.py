"""Optuna studies: every trial trains through ``train`` with the study's base config plus a space's overrides.

Storage is any Optuna storage URL (SQLite ``optuna.db`` by default, ``journal:PATH`` for Optuna's
journal file, PostgreSQL for many workers); a study with the same name and storage resumes, and
several processes on one storage share the work. Tracking of trials lives in ``tune_tracking``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Sequence

import mlflow
import optuna
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from cvae.config import ConfigError, require, require_choice
from pipelines.config import RunConfig, flatten, with_overrides
from pipelines.data import DataUnavailableError, DatasetSplits, load_splits
from pipelines.metrics import DEFAULT_OBJECTIVE, LIKELIHOOD_KIND_TAG, OBJECTIVES, objective_name, run_likelihood_kind
from pipelines.training.execution import resolve_device
from pipelines.tracking.runs import RunLogger, require_tracking_server, resolve_experiment_id
from pipelines.studies.chosen_trials import chosen_trials, record_chosen_trials
from pipelines.recording.record import FULL, TRIAL, record_run
from pipelines.tracking.run_description import name_trial
from pipelines.training.train import NonFiniteLossError, TrainResult, train
from pipelines.studies.tune_tracking import (close_abandoned_trial, close_stale_trial, local_stores_lock, summarise_study,
                                     trial_run)

if TYPE_CHECKING:  # search spaces build on this layer; only their type is named here
    from search_spaces import SearchSpace

DEFAULT_STORAGE = "sqlite:///optuna.db"
JOURNAL_PREFIX = "journal:"
SQLITE_TIMEOUT_S = 60  # how long a writer waits for SQLite's lock before "database is locked"
HEARTBEAT_GRACE_S = 120  # a running trial silent this long belongs to a dead worker
SAMPLERS = ("auto", "tpe", "random", "cmaes", "nsga2", "bruteforce")
PRUNERS = ("median", "hyperband", "none")
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
# Failures that end one trial (FAIL) while the study goes on; anything else is a bug and stops it.
TRIAL_FAILURES = (NonFiniteLossError, OUT_OF_MEMORY)
OBJECTIVES_ATTR = "objectives"
SAMPLER_SEED_ATTR = "sampler_seed"
DEFAULT_TRIALS = 20
# What every trial records: "best" keeps params, per-epoch metrics, objective values, the model and the
# manifest, and gives figures, test metrics, evaluation and the generator to the chosen trials only;
# "all" records everything for every trial.
TRIAL_ARTIFACTS = ("best", "all")


@dataclass(frozen=True)
class StudySettings:
    name: str = "cvae"
    storage: str = DEFAULT_STORAGE
    space: str = "default"
    objectives: tuple[str, ...] = (DEFAULT_OBJECTIVE,)  # names of pipelines.metrics.OBJECTIVES
    sampler: str = "auto"  # tpe for one objective, nsga2 for several
    sampler_seed: int = 0
    pruner: str = "median"
    pruner_startup_trials: int = 5
    pruner_warmup_epochs: int = 0
    n_trials: int | None = None  # per process; None with no timeout means DEFAULT_TRIALS
    timeout: float | None = None  # seconds
    register_as: str = ""  # registered model name; "" registers nothing
    heartbeat_grace_s: int = HEARTBEAT_GRACE_S
    trial_artifacts: str = "best"
    workers: int = 1  # worker processes this invocation starts on the study

    def __post_init__(self):
        object.__setattr__(self, "objectives", tuple(objective_name(name) for name in self.objectives))
        require(bool(self.name.strip()), "study", self.name, "a non-empty study name")
        require(len(self.objectives) >= 1 and len(set(self.objectives)) == len(self.objectives),
                "objectives", ",".join(self.objectives), "distinct names, e.g. neg_elbo or recon,kl")
        for name in self.objectives:
            require_choice("objectives", name, tuple(OBJECTIVES))
        require(self.multi_objective or self.objectives != ("params",), "objectives", "params",
                "params only beside another objective, e.g. neg_elbo,params")
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
        require_choice("trial_artifacts", self.trial_artifacts, TRIAL_ARTIFACTS)
        require(self.workers >= 1, "workers", self.workers, "an integer >= 1")

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


def trial_seed(sampler_seed: int, trial_number: int) -> int:
    """The seed of one trial's sampling: a hash of the study's sampler seed and the trial number.

    Trial numbers are handed out by the storage, once each, so concurrent workers never draw
    with the same seed (a seed per worker plus a count of trials seen collides as soon as two
    workers start at different times), and a resumed study never replays its first draws.
    """
    digest = hashlib.sha256(f"{sampler_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class PerTrialSeededSampler(optuna.samplers.BaseSampler):
    """Delegates to a fresh sampler for every trial, seeded by ``trial_seed``.

    Optuna's samplers keep what they learn in the storage (TPE and random keep nothing else,
    CMA-ES and NSGA-II their state in system attributes), so a new instance per trial loses
    nothing but the shared random stream that made workers repeat each other.
    """

    def __init__(self, factory: Callable[[int], optuna.samplers.BaseSampler], sampler_seed: int):
        self._factory = factory
        self.sampler_seed = sampler_seed
        self._inner = factory(sampler_seed)

    def __str__(self) -> str:
        return f"{type(self._inner).__name__} (seeded per trial from {self.sampler_seed})"

    def before_trial(self, study, trial) -> None:
        self._inner = self._factory(trial_seed(self.sampler_seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def build_sampler(settings: StudySettings, seed: int) -> optuna.samplers.BaseSampler:
    kind = settings.sampler
    if kind == "auto":
        kind = "nsga2" if settings.multi_objective else "tpe"

    def make(trial_seed_value: int) -> optuna.samplers.BaseSampler:
        # Optuna still labels TPE's `group` and the brute-force sampler experimental; the warning
        # would only alarm users.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _sampler(kind, trial_seed_value)

    return PerTrialSeededSampler(make, seed)


def build_pruner(settings: StudySettings, base: RunConfig) -> optuna.pruners.BasePruner:
    if not settings.prunes:
        return optuna.pruners.NopPruner()
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=base.optim.epochs)
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                       n_warmup_steps=settings.pruner_warmup_epochs)


def prepare_study(settings: StudySettings, base: RunConfig, experiment: str | None) -> optuna.Study:
    """Create or load the study, and make sure the MLflow experiment exists, before any run opens.

    Returns the study with its sampler and pruner. An unreachable storage fails here with a
    ``ConfigError``, so bad input leaves nothing behind.
    """
    require_tracking_server(mlflow.get_tracking_uri())  # not even an empty study without a server
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
        with warnings.catch_warnings():  # still "experimental" in Optuna 5.0, in use since 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(settings.objectives))  # optuna-dashboard shows "neg_elbo", not "Objective 0"
    elif tuple(objective_name(name) for name in recorded) != settings.objectives:
        raise ConfigError(f"objectives={','.join(settings.objectives)!r} is not valid for study "
                          f"{settings.name!r}, which optimises {','.join(recorded)}; use those or a new study name")
    study.sampler = build_sampler(settings, settings.sampler_seed)
    study.pruner = build_pruner(settings, base)
    return study


def parameter_count(result: TrainResult) -> int:
    return sum(p.numel() for p in result.model.parameters())


def objective_values(objectives: Sequence[str], result: TrainResult) -> list[float]:
    best_epoch = result.history[result.best_epoch - 1]
    values = [float(parameter_count(result)) if OBJECTIVES[name].metric is None
              else float(best_epoch[OBJECTIVES[name].metric]) for name in objectives]
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
        metric = OBJECTIVES[self.settings.objectives[0]].metric

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
                name_trial(logger, trial.number, config)
                logger.log_params({f"trial.{k}": v for k, v in trial.params.items()})
                same_data = config.data == self.base.data and config.execution.device == self.base.execution.device
                trial.set_user_attr(SAMPLER_SEED_ATTR, trial_seed(self.settings.sampler_seed, trial.number))
                result = train(config, logger, on_epoch=self._report(trial, config.optim.epochs),
                               splits=self.splits if same_data else None)
                values = objective_values(self.settings.objectives, result)
                record_run(logger, result, config, FULL if self.settings.trial_artifacts == "all" else TRIAL)
            # A tracking server lost for longer than MLflow's bounded retries also fails the trial
            # with its reason, though it stops this worker (it is not in catch=TRIAL_FAILURES).
            except (*TRIAL_FAILURES, MlflowException) as error:
                trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
                if isinstance(error, OUT_OF_MEMORY) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise
            logger.log_metrics({f"objective/{name}": v for name, v in zip(self.settings.objectives, values)},
                               step=result.best_epoch)
        return values[0] if len(values) == 1 else values


def study_params(settings: StudySettings) -> dict[str, object]:
    return {"study.name": settings.name, "study.storage": display_url(settings.storage),
            "study.space": settings.space, "study.objectives": ",".join(settings.objectives),
            "study.sampler": settings.sampler, "study.sampler_seed": settings.sampler_seed,
            "study.pruner": settings.pruner if settings.prunes else "none",
            "study.n_trials": settings.n_trials or "", "study.timeout": settings.timeout or "",
            "study.workers": settings.workers, "study.trial_artifacts": settings.trial_artifacts}


def note_pruning(settings: StudySettings) -> None:
    if settings.multi_objective and settings.pruner != "none":
        print(f"note: pruner {settings.pruner!r} is off: a multi-objective study cannot prune "
              "(Optuna reports intermediate values for one objective only)", flush=True)


def log_study_params(parent: RunLogger, settings: StudySettings, base: RunConfig) -> None:
    parent.log_params({**study_params(settings), **{f"base.{k}": v for k, v in flatten(base).items()}})
    # Every trial keeps the study's likelihood (the spaces leave it alone): what its values are.
    parent.set_tags({LIKELIHOOD_KIND_TAG: run_likelihood_kind(base)})


def run_trials(study: optuna.Study, settings: StudySettings, space: SearchSpace, base: RunConfig,
               parent: RunLogger, n_trials: int | None, splits: DatasetSplits | None = None,
               stop_at_trials: int | None = None) -> DatasetSplits:
    """Run this process's trials as children of ``parent`` (at most ``n_trials``, and none once the
    study holds ``stop_at_trials`` trials of any state); return the data they shared.

    Ctrl-C (or SIGTERM) fails the running trial, closes its run KILLED and propagates.
    """
    splits = splits or load_splits(base.data, resolve_device(base.execution))
    objective = TrialObjective(settings, space, base, parent, splits)
    callbacks = [] if stop_at_trials is None else [optuna.study.MaxTrialsCallback(stop_at_trials, states=None)]
    try:
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


def trials_to_run(settings: StudySettings) -> int | None:
    """How many trials an invocation adds: ``n_trials``, else none counted when a timeout stops it,
    else DEFAULT_TRIALS."""
    return settings.n_trials or (None if settings.timeout else DEFAULT_TRIALS)


def run_study(study: optuna.Study, settings: StudySettings, space: SearchSpace, base: RunConfig,
              parent: RunLogger) -> None:
    """Run this process's trials, then conclude the study in the parent run (also after Ctrl-C)."""
    note_pruning(settings)
    log_study_params(parent, settings, base)
    n_trials = trials_to_run(settings)
    splits = None
    try:
        splits = run_trials(study, settings, space, base, parent, n_trials)
    except KeyboardInterrupt:
        print("interrupted: the running trial is marked failed; summarising the study so far", flush=True)
        conclude_study(study, settings, base, parent, splits)
        raise
    conclude_study(study, settings, base, parent, splits)
