"""Opening a study's Optuna storage: any Optuna URL (SQLite by default, ``journal:PATH``, PostgreSQL).

Database storages carry heartbeats, so a worker killed mid-trial does not leave its trial RUNNING;
workers starting together on one fresh database take turns creating its tables; a URL is shown
without its password (``pipelines.tracking.redaction``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import warnings
from typing import Callable

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial

from cvae.config import ConfigError, require
from pipelines.tracking.redaction import hide_passwords
from pipelines.tracking.store_lock import local_stores_lock

__all__ = ["local_stores_lock"]  # kept here, where the study's steps import it from

JOURNAL_PREFIX = "journal:"
SQLITE_TIMEOUT_S = 60  # how long a writer waits for SQLite's lock before "database is locked"
POSTGRES_STARTUP_LOCK = 0x63766165  # any fixed 64-bit advisory lock key, the same in every worker ("cvae")
StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy reads plain postgresql:// as psycopg2; the [postgres] extra installs psycopg 3."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None \
            and importlib.util.find_spec("psycopg") is not None:
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def open_storage(url: str, heartbeat_grace_s: int, on_stale_trial: StaleTrialCallback) -> BaseStorage:
    """An Optuna storage. Database ones get heartbeats: a trial whose worker stopped beating for
    ``heartbeat_grace_s`` seconds (kill -9, a lost machine) is failed by the next worker, which
    calls ``on_stale_trial`` and then queues the trial once more (same params) for a free worker.
    Once: a trial that kills its worker twice is not tried a third time."""
    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX):]
        require(bool(path), "storage", url, "journal:PATH, e.g. journal:optuna.log")
        return JournalStorage(JournalFileBackend(path))
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite:") else {}
    url = _with_installed_driver(url)
    with warnings.catch_warnings(), contextlib.ExitStack() as startup:
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are stable in use
        retry = RetryHeartbeatStaleTrialCallback(max_retry=1)

        def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
            retry(study, trial)  # queued first: the study stays right even if the runs cannot be closed
            on_stale_trial(study, trial)

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


def load_or_create_study(url: str, name: str, directions: int, heartbeat_grace_s: int,
                         on_stale_trial: StaleTrialCallback) -> optuna.Study:
    """The study ``name`` in the storage at ``url``, created (minimising ``directions`` values) if new.

    Any failure to open the storage is a one-line ``ConfigError`` naming the URL without its password.
    """
    try:
        storage = open_storage(url, heartbeat_grace_s, on_stale_trial)
        return optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                   directions=["minimize"] * directions)
    except ConfigError:
        raise
    except Exception as error:  # SQLAlchemy, driver or file errors: all mean "cannot use this storage"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, ImportError) and url.startswith("postgres"):
            missing = error.__cause__ or error  # Optuna re-raises SQLAlchemy's ImportError with its own text
            reason = f"no PostgreSQL driver ({missing}): pip install 'cvae-harness[postgres]' (psycopg 3)"
        raise ConfigError(hide_passwords(f"storage={url!r} is not valid; cannot open it: {reason}")) from None
