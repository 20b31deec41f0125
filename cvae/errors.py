"""The base of every error a user can fix, here in the model core so that its ``ConfigError`` is one."""
from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (a bad value, missing data, an unknown run or model): its message
    is one line that names it. The entry points report it as ``error: <message>``, exit code 2."""
