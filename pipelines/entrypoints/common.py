"""The process of every entry point: its log, one-line errors with their exit codes, signals, no run
left RUNNING. The final ``error:`` line is printed, not logged: it shows even under ``--quiet``, and
the signal handler prints because logging is not safe inside one."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Sequence

from pipelines.entrypoints import under_mlflow_run
from pipelines.entrypoints.logs import configure_logging
from pipelines.errors import RunFailedError, TrackingLostError, UserError
from pipelines.tracking.redaction import hide_passwords

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TRACKING_LOST = 3  # the run went on into a local spool: push it (docs/scaling.md)
EXIT_SIGNAL_BASE = 128  # the shell's convention: a process ended by signal N exits 128 + N


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


def _first_line(error: BaseException) -> str:
    return hide_passwords(str(error).splitlines()[0]) if str(error).strip() else type(error).__name__


def exit_code(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main`` and turn known failures into one clear line on stderr and the exit code:
    2 bad input (``UserError``), 1 a run that failed and says why (``RunFailedError``, e.g.
    divergence), 3 the tracking server stopped answering and the run's rest is in a local spool
    (``TrackingLostError``), 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM)."""
    try:
        return main(argv) or 0
    except UserError as error:
        message = _first_line(error)
        print(f"error: {message}", file=sys.stderr)
        under_mlflow_run.fail_pending_run(message, "FAILED")
        return EXIT_USAGE
    except RunFailedError as error:
        # Not a bug: the run is already FAILED with this reason; a traceback would bury it.
        message = _first_line(error)
        print(f"error: {message}", file=sys.stderr)
        under_mlflow_run.fail_pending_run(message, "FAILED")
        return EXIT_FAILURE
    except TrackingLostError as error:
        # The run is complete in its spool; its server run is ended by the push.
        print(f"error: {_first_line(error)}", file=sys.stderr)
        return EXIT_TRACKING_LOST
    except KeyboardInterrupt as error:
        signum = error.signum if isinstance(error, Stopped) else signal.SIGINT
        print("interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}",
              file=sys.stderr)
        under_mlflow_run.fail_pending_run("interrupted", "KILLED")
        under_mlflow_run.keep_killed_after_exit()
        return EXIT_SIGNAL_BASE + signum


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> None:
    """The process of an entry point: tracking, signals, ``main``, and its exit code."""
    from pipelines.tracking.runs import configure_tracking

    configure_logging()
    configure_tracking()
    # Schedulers (SLURM, Kubernetes) and `mlflow run`'s cancellation stop processes with SIGTERM:
    # treat it as Ctrl-C so runs end KILLED and trials FAIL instead of staying RUNNING.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    under_mlflow_run.die_with_parent()
    sys.exit(exit_code(main, argv))
