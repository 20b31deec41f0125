"""The error a user can fix, raised at any layer and shown by the entry points as one line."""
from __future__ import annotations


class UserError(RuntimeError):
    """A problem the user can fix (bad argument, missing run or artifact); shown as one line."""
