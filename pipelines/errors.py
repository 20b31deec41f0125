"""The errors the entry points report in one line, whichever layer raises them.

``UserError`` (from ``cvae.errors``, so that the model's ``ConfigError`` is one too): a problem the
user can fix; exit code 2. ``RunFailedError``: a run failed for a reason it has already recorded
(training diverged); exit code 1. ``TrackingLostError``: the tracking server stopped answering and
the rest of the run was kept in a local spool (``pipelines.tracking.spool``); exit code 3. None is
shown with a traceback.
"""
from __future__ import annotations

from cvae.errors import UserError

__all__ = ["RunFailedError", "TrackingLostError", "UserError"]


class RunFailedError(RuntimeError):
    """The run failed for a reason it recorded (its status FAILED, its ``error`` tag); shown as one line."""


class TrackingLostError(RuntimeError):
    """The tracking server stopped answering; the run went on into a spool that this says how to push."""
