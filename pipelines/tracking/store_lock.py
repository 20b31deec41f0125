"""Turns on local SQLite stores: what several processes must not do at once on one database file.

MLflow 3.17's tracking and registry stores create and migrate a new database's tables without a
lock between processes (only its jobs and workspace stores take one), so two commands started
together on a fresh ``mlflow.db`` fail in the migration ("table already exists", "Online migration
expected to match one row"). Two workers creating an Optuna database's tables, or registering a
model at once, race the same way. A file lock on the database makes the second one wait and then
find the work done. SQLite's own locks are POSIX record locks, which ``flock`` leaves alone. Server
databases (PostgreSQL) and tracking servers need no such lock.
"""
from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Iterator, Sequence


def local_sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:`` URL; None for any other store or an in-memory one."""
    if not url.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


@contextlib.contextmanager
def local_stores_lock(urls: Sequence[str]) -> Iterator[None]:
    """Hold an exclusive lock on each local SQLite database among ``urls`` (in one order, so two
    processes locking the same ones cannot deadlock) for the duration."""
    paths = sorted({p.resolve() for p in map(local_sqlite_file, urls) if p and p.parent.is_dir()})
    with contextlib.ExitStack() as stack:
        for path in paths:
            handle = stack.enter_context(open(path, "a"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def prepare_local_store(uri: str) -> None:
    """Have MLflow create (or migrate) a local SQLite store's tables, tracking and registry, one
    process at a time; nothing for any other store. Once done, the next process finds them there."""
    if local_sqlite_file(uri) is None:
        return
    from mlflow import MlflowClient

    with local_stores_lock([uri]):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # the tracking store, made and its schema checked
        client.search_registered_models(max_results=1)  # the registry's, on the same database
