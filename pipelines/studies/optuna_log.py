"""Optuna's log while a study runs: a problem the user can fix is reported once, in one line.

Optuna logs every exception that ends a trial, with its traceback, and then re-raises it. A bad
value from a search space (or missing data, or Ctrl-C) stops the whole study, and the entry point
reports it in one line: ``one_line_stops`` drops Optuna's two records of it (the trial is still
recorded FAIL). It filters the logger of Optuna's optimize loop (``optuna.study._optimize``, the
name its records carry) only while a study runs, so importing this harness changes no logging.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from pipelines.errors import TrackingLostError, UserError

OPTIMIZE_LOGGER = "optuna.study._optimize"


class _StopsWithoutTraceback(logging.Filter):
    STOPS = (UserError, KeyboardInterrupt, TrackingLostError)

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


@contextlib.contextmanager
def one_line_stops() -> Iterator[None]:
    """While the block runs, Optuna does not log the trial that a user error or Ctrl-C stopped."""
    logger = logging.getLogger(OPTIMIZE_LOGGER)
    stops = _StopsWithoutTraceback()
    logger.addFilter(stops)
    try:
        yield
    finally:
        logger.removeFilter(stops)
