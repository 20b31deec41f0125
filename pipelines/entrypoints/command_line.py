"""The command line every entry point shares: a parser whose usage errors are one line, and flags
spelt both ``--n-trials`` and ``--n_trials`` (`mlflow run` passes a ``-P`` key as ``--key``)."""
from __future__ import annotations

import argparse
import difflib
import logging
import math
import re
from typing import Callable, Sequence

from pipelines.config_cli import flag_names
from pipelines.entrypoints.logs import set_level
from pipelines.entrypoints.under_mlflow_run import option_label
from pipelines.errors import UserError

EXPERIMENT_HELP = "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, else Default)"
UNRECOGNIZED = "unrecognized arguments: "
_ABOUT_OPTION = re.compile(r"^argument (-\S+): (.*)$")


def closest_option(name: str, known: Sequence[str]) -> str | None:
    """The known option most like ``name`` (``--study_name`` -> ``--study``), or None.

    Dashes and underscores count as the same (``--latent_dimm`` finds ``--latent-dim``); the
    suggestion is spelt the way the user spelt options.
    """
    def plain(option: str) -> str:
        return option.lstrip("-").replace("_", "-").lower()

    spelt = {plain(option): option for option in sorted(known, key=lambda o: ("_" in o) == ("_" in name))}
    match = difflib.get_close_matches(plain(name), list(spelt), n=1, cutoff=0.6)
    return spelt[match[0]] if match else None


class CommandParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are a ``UserError`` of one line (so the entry point
    reports it as such, and a run `mlflow run` made ends FAILED with it), not a page of usage text.
    An unknown option is named with the closest known one; an option given as '' takes its default.
    Every command gets ``--quiet`` and ``--verbose``, applied to the log as soon as they are parsed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, says in (("quiet", "show only warnings and errors, also Optuna's and MLflow's"),
                           ("verbose", "also show debug messages")):
            self.add_argument(f"-{name[0]}", f"--{name}", nargs="?", type=boolean, const="true", default=False,
                              metavar="true|false", help=says)

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            if action.default not in (None, argparse.SUPPRESS) and getattr(namespace, action.dest, "") in (None, ""):
                setattr(namespace, action.dest, action.default)
        if namespace.quiet and namespace.verbose:
            self.error("--quiet and --verbose together: give one")
        if namespace.quiet or namespace.verbose:
            set_level(logging.WARNING if namespace.quiet else logging.DEBUG)
        return namespace, rest

    def error(self, message: str):
        raise UserError(self.one_line(message))

    def known_options(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]

    def one_line(self, message: str) -> str:
        about_option = _ABOUT_OPTION.match(message)
        if about_option:  # "argument --n-trials/--n_trials: 'x' is not valid; ..." from an option type
            key = about_option.group(1).split("/")[-1].lstrip("-")
            problem = about_option.group(2)
            return f"{key}={problem}" if problem.startswith(("'", '"')) else f"{key}: {problem} (see --help)"
        if not message.startswith(UNRECOGNIZED):
            return f"{message} (see --help)"
        given = message[len(UNRECOGNIZED):]
        unknown = [token.split("=", 1)[0] for token in given.split() if token.startswith("-")]
        if not unknown:
            return f"unexpected value(s) {given!r}; every value follows a --name (see --help)"
        parts = []
        for name in unknown:
            suggestion = closest_option(name, self.known_options())
            parts.append(f"unknown parameter {option_label(name)}; "
                         + (f"did you mean {option_label(suggestion, suggested=True)}?" if suggestion
                            else "see --help for the parameters"))
        return "; ".join(parts)


def add_flag(parser: argparse._ActionsContainer, name: str, **kwargs) -> None:
    """``--n-trials`` and ``--n_trials`` alike, stored as ``name``."""
    parser.add_argument(*flag_names(name), dest=name, **kwargs)


def add_run_arguments(parser: argparse._ActionsContainer, run_name: str | None = None,
                      experiment_help: str = EXPERIMENT_HELP, run_name_help: str = "MLflow run name") -> None:
    """``--experiment`` and ``--run-name``."""
    parser.add_argument("--experiment", default=None, help=experiment_help)
    add_flag(parser, "run_name", default=run_name, help=run_name_help)


# --- option types: argparse `type=` converters ------------------------------------------------------
# Each turns the text of one option into its value, or raises ArgumentTypeError with one line that
# the parser prefixes with the option's name. '' (what MLproject passes for an unset parameter)
# converts to None, and the parser then gives the option its default: defaults are written once,
# as the option's `default=` (taken from the settings or function that uses it).

def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def integer(minimum: int | None = None) -> Callable[[str], int | None]:
    """An integer (also written "8.0", the form MLflow gives float-typed parameters), >= ``minimum``."""
    expected = "an integer" + ("" if minimum is None else f" >= {minimum}")

    def convert(text: str) -> int | None:
        if not text.strip():
            return None
        value = _finite(text)
        if value is None or not value.is_integer() or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected {expected}")
        return int(value)

    return convert


def number(minimum: float | None = None) -> Callable[[str], float | None]:
    """A finite number >= ``minimum``."""
    expected = "a number" + ("" if minimum is None else f" >= {minimum:g}")

    def convert(text: str) -> float | None:
        if not text.strip():
            return None
        value = _finite(text)
        if value is None or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected {expected}")
        return value

    return convert


def boolean(text: str) -> bool | None:
    """true or false (any case)."""
    if not text.strip():
        return None
    if text.strip().lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected true or false")
    return text.strip().lower() == "true"
