"""Passwords kept out of everything the harness records or shows: run params, tags, artifacts
(the manifest's command line), log lines and error messages.

A password belongs in the environment or a file (PostgreSQL's ``PGPASSFILE`` or ``~/.pgpass``;
``OPTUNA_STORAGE`` for a whole storage URL), never on a command line, where the process list and
`mlflow run` (its "Running command" line and the run's params) show it. One given in a URL anyway
is shown as ``***``, as SQLAlchemy shows it (``user:***@host``).
"""
from __future__ import annotations

import re

MASK = "***"
# scheme://user:password@ — the password runs to the first "@", as SQLAlchemy's URL parser reads it.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*:)[^@\s'\"]*@")


def hide_passwords(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)


def has_password(url: str) -> bool:
    """Whether ``url`` (or any URL in it) holds a password."""
    return hide_passwords(url) != url
