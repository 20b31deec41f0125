"""The harness's log as a command shows it: messages of the ``pipelines`` loggers on stderr.

Modules log through ``logging.getLogger(__name__)``; as a library, ``pipelines`` only adds a
``NullHandler``, so whoever imports it decides where its messages go (``logging.basicConfig``,
or a handler on the ``pipelines`` logger) or silences them. A command (``run_main``) shows them
on stderr, a line each, warnings prefixed ``warning:``; ``--quiet`` keeps warnings only (also of
Optuna and MLflow), ``--verbose`` adds debug messages. What a command produces (a summary line, a
report, a listing) and its final ``error:`` line are printed, not logged: they are its output.
No password in a URL is shown (``pipelines.tracking.redaction``).
"""
from __future__ import annotations

import logging
import sys

from pipelines.tracking.redaction import hide_passwords

HARNESS_LOGGER = "pipelines"
QUIETED_LIBRARIES = ("optuna", "mlflow")  # their INFO lines (Optuna's "Trial 3 finished ...") go too


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message comes (a test runner swaps it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class _HidePasswords(logging.Filter):
    """A URL's password in a message is shown as ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = hide_passwords(message)
        if hidden != message:
            record.msg, record.args = hidden, None
        return True


class _CommandLineFormatter(logging.Formatter):
    """``message`` for information, ``warning: message`` (``error: ...``) for worse."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging(level: int = logging.INFO) -> None:
    """Show the harness's messages from ``level`` up on stderr (once per process)."""
    logger = logging.getLogger(HARNESS_LOGGER)
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_CommandLineFormatter("%(message)s"))
        handler.addFilter(_HidePasswords())
        logger.addHandler(handler)
        logger.propagate = False  # shown once, whatever the root logger does
    set_level(level)


def set_level(level: int) -> None:
    """``logging.WARNING`` (--quiet), ``logging.INFO`` (default) or ``logging.DEBUG`` (--verbose)."""
    logging.getLogger(HARNESS_LOGGER).setLevel(level)
    if level >= logging.WARNING:
        for name in QUIETED_LIBRARIES:
            logging.getLogger(name).setLevel(level)
