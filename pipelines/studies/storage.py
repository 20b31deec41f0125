"""Opening a study's Optuna storage: any Optuna URL (SQLite by default, ``journal:PATH``, PostgreSQL).

Database storages carry heartbeats, so a worker killed mid-trial does not leave its trial RUNNING
(and a worker starting on the same machine fails such a trial at once, without waiting for them);
workers starting together on one fresh database take turns creating its tables; a URL is shown
without its password (``pipelines.tracking.redaction``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import warnings
from typing import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cvae.config import ConfigError, require
from pipelines.tracking.liveness import ProcessId
from pipelines.tracking.redaction import hide_passwords
from pipelines.tracking.store_lock import local_stores_lock

__all__ = ["local_stores_lock"]  # kept here, where the study's steps import it from

JOURNAL_PREFIX = "journal:"
SQLITE_TIMEOUT_S = 60  # how long a writer waits for SQLite's lock before "database is locked"
POSTGRES_STARTUP_LOCK = 0x63766165  # any fixed 64-bit advisory lock key, the same in every worker ("cvae")
StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]
WORKER_ATTR = "worker"  # the process running a trial (ProcessId.as_dict), so a later one can see it is gone


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy reads plain postgresql:// as psycopg2; the [postgres] extra installs psycopg 3."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None \
            and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def retried(on_stale_trial: StaleTrialCallback) -> StaleTrialCallback:
    """What happens to a trial whose worker is gone, once it is failed: it is queued once more (same
    params) for a free worker, then ``on_stale_trial`` runs. Once: a trial that kills its worker
    twice is not tried a third time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable in use since 2.9
        retry = RetryHeartbeatStaleTrialCallback(max_retry=1)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry(study, trial)  # queued first: the study stays right even if the runs cannot be closed
        on_stale_trial(study, trial)

    return on_stale


def open_storage(url: str, heartbeat_grace_s: int, on_stale: StaleTrialCallback) -> BaseStorage:
    """An Optuna storage. Database ones get heartbeats: a trial whose worker stopped beating for
    ``heartbeat_grace_s`` seconds (kill -9, a lost machine) is failed by the next worker, which
    calls ``on_stale`` (``retried``)."""
    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX):]
        require(bool(path), "storage", url, "journal:PATH, e.g. journal:optuna.log")
        return JournalStorage(JournalFileBackend(path))
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite:") else {}
    url = _with_installed_driver(url)
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
            lock.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": POSTGRES_STARTUP_LOCK})
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=max(1, heartbeat_grace_s // 4),
                          grace_period=heartbeat_grace_s, heartbeat_stale_trial_callback=on_stale)


def worker_of(trial: FrozenTrial) -> ProcessId | None:
    """The process that ran ``trial`` (``WORKER_ATTR``), if it recorded itself."""
    return ProcessId.parse(trial.user_attrs.get(WORKER_ATTR))


def fail_trials_of_gone_workers(study: optuna.Study, on_stale: StaleTrialCallback) -> None:
    """Fail the RUNNING trials whose worker shared this process's PIDs and is gone (killed), at once
    rather than after the heartbeat grace, as Optuna's ``fail_stale_trials`` fails stale ones: then
    ``on_stale`` (``retried``). A trial another process finishes or fails meanwhile is left to it."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = worker_of(trial)
        if worker is None or not worker.is_gone():
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, UpdateFinishedTrialError):  # no longer RUNNING: another worker got to it first
            continue
        on_stale(study, trial)


def load_or_create_study(url: str, name: str, directions: int, heartbeat_grace_s: int,
                         on_stale_trial: StaleTrialCallback) -> optuna.Study:
    """The study ``name`` in the storage at ``url``, created (minimising ``directions`` values) if new,
    with the trials of workers known to be gone failed (``fail_trials_of_gone_workers``).

    Any failure to open the storage is a one-line ``ConfigError`` naming the URL without its password.
    """
    on_stale = retried(on_stale_trial)
    try:
        storage = open_storage(url, heartbeat_grace_s, on_stale)
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                    directions=["minimize"] * directions)
    except ConfigError:
        raise
    except Exception as error:  # SQLAlchemy, driver or file errors: all mean "cannot use this storage"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, ImportError) and url.startswith("postgres"):
            missing = error.__cause__ or error  # Optuna re-raises SQLAlchemy's ImportError with its own text
            reason = f"no PostgreSQL driver ({missing}): pip install 'cvae-harness[postgres]' (psycopg 3)"
        raise ConfigError(hide_passwords(f"storage={url!r} is not valid; cannot open it: {reason}")) from None
    fail_trials_of_gone_workers(study, on_stale)
    return study
