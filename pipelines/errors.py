"""The errors the entry points report in one line, whichever layer raises them.

``UserError`` (from ``cvae.errors``, so that the model's ``ConfigError`` is one too): a problem the
user can fix; exit code 2. ``RunFailedError``: a run failed for a reason it has already recorded
(training diverged); exit code 1. Neither is shown with a traceback.
"""
from __future__ import annotations

from cvae.errors import UserError

__all__ = ["RunFailedError", "UserError"]


class RunFailedError(RuntimeError):
    """The run failed for a reason it recorded (its status FAILED, its ``error`` tag); shown as one line."""
