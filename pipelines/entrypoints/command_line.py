"""The command line every entry point shares: a parser whose usage errors are one line, and flags
spelt both ``--n-trials`` and ``--n_trials`` (`mlflow run` passes a ``-P`` key as ``--key``)."""
from __future__ import annotations

import argparse
import difflib
import math
from typing import Sequence

from pipelines.config_cli import flag_names
from pipelines.entrypoints.under_mlflow_run import option_label
from pipelines.errors import UserError

EXPERIMENT_HELP = "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, else Default)"
UNRECOGNIZED = "unrecognized arguments: "


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
    An unknown option is named with the closest known one."""

    def error(self, message: str):
        raise UserError(self.one_line(message))

    def known_options(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]

    def one_line(self, message: str) -> str:
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
                         + (f"did you mean {option_label(suggestion)}?" if suggestion
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


def number_option(name: str, text: str | None, kind: type = int, default=None, minimum: float | None = None):
    """A numeric command-line option. '' (what MLproject passes for an unset parameter) means
    ``default``; integers are also accepted as "8.0", the form MLflow gives float-typed parameters."""
    text = "" if text is None else str(text).strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and (kind is float or value.is_integer())
            and (minimum is None or value >= minimum)):
        expected = ("an integer" if kind is int else "a number") + ("" if minimum is None else f" >= {minimum}")
        raise UserError(f"{name}={text!r} is not valid; expected {expected}")
    return int(value) if kind is int else value
