"""What every entry point shares: one-line errors with exit code 2, and no run left RUNNING."""
from __future__ import annotations

import math
import os
import signal
import sys
from argparse import _ActionsContainer
from typing import Callable, Sequence

from cvae.config import ConfigError
from pipelines.data import DataUnavailableError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UserError(RuntimeError):
    """A problem the user can fix (bad argument, missing run or artifact); shown as one line."""


USER_ERRORS = (ConfigError, DataUnavailableError, UserError)


EXPERIMENT_HELP = "MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, else Default)"


def add_run_arguments(parser: _ActionsContainer, run_name: str | None = None, experiment_help: str = EXPERIMENT_HELP,
                      run_name_help: str = "MLflow run name") -> None:
    """``--experiment`` and ``--run-name`` (also ``--run_name``, as `mlflow run` passes extra params)."""
    parser.add_argument("--experiment", default=None, help=experiment_help)
    parser.add_argument("--run-name", "--run_name", dest="run_name", default=run_name, help=run_name_help)


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


def _fail_pending_mlflow_run(message: str, status: str) -> None:
    """Under `mlflow run` the run exists before we start: never leave it RUNNING."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    try:
        from mlflow import MlflowClient
        client = MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "error", message[:5000])
            client.set_terminated(run_id, status)
    except Exception:  # the store may be the very thing that is unreachable
        pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """Run ``main`` and turn known failures into one clear line on stderr and a non-zero exit."""
    from pipelines.tracking import configure_tracking

    configure_tracking()
    # Schedulers (SLURM, Kubernetes) and `mlflow run`'s cancellation stop processes with SIGTERM:
    # treat it as Ctrl-C so runs end KILLED and trials FAIL instead of staying RUNNING.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = main(argv)
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        _fail_pending_mlflow_run(message, "FAILED")
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        _fail_pending_mlflow_run("interrupted", "KILLED")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code or 0)
