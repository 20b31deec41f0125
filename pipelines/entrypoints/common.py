"""What every entry point shares: one-line errors with exit code 2, and no run left RUNNING."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import signal
import sys
from argparse import _ActionsContainer
from typing import Callable, Iterator, Sequence

from cvae.config import ConfigError
from pipelines.data import DataUnavailableError
from pipelines.errors import UserError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_SIGNAL_BASE = 128  # the shell's convention: a process ended by signal N exits 128 + N
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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


def _keep_killed_after_mlflow_run() -> None:
    """Under `mlflow run`, which would overwrite our KILLED with FAILED once we exit (see
    ``pipelines.tracking.liveness.keep_status_after``), leave a small detached process that puts KILLED
    back once `mlflow run` has exited."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or os.getppid() != _parent_at_start:  # `mlflow run` is gone: nothing will overwrite
        return
    import subprocess

    import mlflow

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    try:
        subprocess.Popen([sys.executable, "-m", "pipelines.tracking.liveness", run_id, str(os.getppid()), "KILLED"],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError:
        pass


_parent_at_start = os.getppid()


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the run ends KILLED; ``signum`` decides the exit code (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signal.Signals(signum).name}")
        self.signum = signum


_signals_received: list[int] = []


def _stop(signum, frame) -> None:
    """The first SIGINT/SIGTERM stops the work; the second is ignored so that clean-up (ending the
    run KILLED) finishes: `mlflow run` answers Ctrl-C by sending its child a SIGTERM as well, which
    used to cut that clean-up short and leave the run to be marked FAILED. A third one means the
    user really wants out (a clean-up hanging on an unreachable store): the default action, now."""
    _signals_received.append(signum)
    if len(_signals_received) == 1:
        raise Stopped(signum)
    if len(_signals_received) == 2:
        if signum == _signals_received[0]:  # the user again, not `mlflow run` following up
            print("still closing the run; send the signal again to abandon it (it would stay RUNNING "
                  "until `python -m pipelines.entrypoints.stale_runs --close`)", file=sys.stderr, flush=True)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _die_with_parent() -> None:
    """Under `mlflow run`, stop when `mlflow run` goes: SIGTERM to it alone would otherwise leave
    this training running on as an orphan. Linux's PR_SET_PDEATHSIG sends us SIGTERM (handled
    like Ctrl-C: the run ends KILLED) the moment the parent exits."""
    if not os.environ.get("MLFLOW_RUN_ID") or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent went before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _divergence_error():
    """NonFiniteLossError when training was imported (else no error can be one), for one-line reports."""
    train = sys.modules.get("pipelines.training.train")
    return getattr(train, "NonFiniteLossError", None)


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error).strip() else type(error).__name__


def _option_names(parser: argparse.ArgumentParser) -> list[str]:
    return [name for name in parser._option_string_actions if name.startswith("--")]


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


def parser_error_message(parser: argparse.ArgumentParser, message: str, under_mlflow_run: bool = False) -> str:
    """argparse's error as one line; an unknown option is named with the closest known one.

    Under `mlflow run` options are `-P` keys, so they are named as such (``study_name``).
    """
    prefix = "unrecognized arguments: "
    if not message.startswith(prefix):
        return f"{message} (see --help)"
    unknown = [token.split("=", 1)[0] for token in message[len(prefix):].split() if token.startswith("-")]
    if not unknown:
        return f"unexpected value(s) {message[len(prefix):]!r}; every value follows a --name (see --help)"
    show = (lambda option: option.lstrip("-")) if under_mlflow_run else (lambda option: option)
    parts = []
    for name in unknown:
        suggestion = closest_option(name, _option_names(parser))
        parts.append(f"unknown parameter {show(name)}; "
                     + (f"did you mean {show(suggestion)}?" if suggestion else "see --help for the parameters"))
    return "; ".join(parts)


@contextlib.contextmanager
def one_line_parser_errors() -> Iterator[None]:
    """While an entry point parses its arguments, a usage error is one line (a ``UserError``, so
    the run `mlflow run` created ends FAILED with it), not argparse's page of usage text.

    A hook on ``ArgumentParser.error`` rather than a subclass: every entry point's parser gets it,
    including parsers built in other modules, and it is undone when the entry point returns.
    """
    under_mlflow_run = bool(os.environ.get("MLFLOW_RUN_ID"))

    def error(parser: argparse.ArgumentParser, message: str):
        raise UserError(parser_error_message(parser, message, under_mlflow_run))

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def exit_code(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main`` and turn known failures into one clear line on stderr and the exit code:
    2 bad input, 1 divergence, 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM)."""
    try:
        with one_line_parser_errors():
            return main(argv) or 0
    except USER_ERRORS as error:
        message = _first_line(error)
        print(f"error: {message}", file=sys.stderr)
        _fail_pending_mlflow_run(message, "FAILED")
        return EXIT_USAGE
    except KeyboardInterrupt as error:
        signum = error.signum if isinstance(error, Stopped) else signal.SIGINT
        print("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}",
              file=sys.stderr)
        _fail_pending_mlflow_run("interrupted", "KILLED")
        _keep_killed_after_mlflow_run()
        return EXIT_SIGNAL_BASE + signum
    except Exception as error:
        diverged = _divergence_error()
        if diverged is None or not isinstance(error, diverged):
            raise
        # Not a bug: the run is already FAILED with this reason; a traceback would bury it.
        message = _first_line(error)
        print(f"error: {message}", file=sys.stderr)
        _fail_pending_mlflow_run(message, "FAILED")
        return EXIT_FAILURE


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """The process of an entry point: tracking, signals, ``main``, and its exit code."""
    from pipelines.tracking.runs import configure_tracking

    configure_tracking()
    # Schedulers (SLURM, Kubernetes) and `mlflow run`'s cancellation stop processes with SIGTERM:
    # treat it as Ctrl-C so runs end KILLED and trials FAIL instead of staying RUNNING.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _die_with_parent()
    sys.exit(exit_code(main, argv))
