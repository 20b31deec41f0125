"""What an entry point does differently when `mlflow run` started it, each against one MLflow behaviour.

`mlflow run` (MLflow 3.17, ``mlflow.projects``) creates the run before our process starts and
hands it over as ``$MLFLOW_RUN_ID``; it starts us as the leader of our own process group and
waits (``_wait_for``). Out of that come four behaviours this module answers:

1. The run is RUNNING before we parse anything: input refused before ``entry_point_run`` opens it
   would leave it RUNNING until `mlflow run` notices the exit, and without the reason
   (``fail_pending_run``).
2. After a non-zero exit, `mlflow run` calls ``_maybe_set_run_terminated(run, "FAILED")``, whose
   "already terminated?" check compares the status string with integer codes and so never holds:
   a run we ended KILLED would end FAILED (``keep_killed_after_exit``: a detached helper puts
   KILLED back once `mlflow run` has exited).
3. SIGTERM to `mlflow run` alone ends it without passing the signal on, and our training would go
   on as an orphan (``die_with_parent``: Linux's ``PR_SET_PDEATHSIG``).
4. ``-P name=value`` reaches us as ``--name value``: a usage error names the ``-P`` key the user
   typed, not our flag (``option_label``).

On Ctrl-C `mlflow run` also sends our process group a SIGTERM right after the SIGINT; the signal
handler in ``pipelines.entrypoints.common`` takes that second signal as the follow-up it is.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

RUN_ID_ENV = "MLFLOW_RUN_ID"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
KEEP_STATUS_WAIT_S = 300.0  # the helper gives up on a `mlflow run` that has not exited by then
_parent_at_start = os.getppid()


def started_by_mlflow_run() -> bool:
    return bool(os.environ.get(RUN_ID_ENV))


def option_label(option: str, suggested: bool = False) -> str:
    """How to name ``--option`` to the user: as the ``-P`` key under `mlflow run` (4.). An option
    ``suggested`` to the user is spelt as MLproject names its key (``latent_dim``, not ``latent-dim``)."""
    if not started_by_mlflow_run():
        return option
    key = option.lstrip("-")
    return key.replace("-", "_") if suggested else key


def fail_pending_run(message: str, status: str) -> None:
    """End the run `mlflow run` made with ``status`` and the reason, if it is still RUNNING (1.)."""
    run_id = os.environ.get(RUN_ID_ENV)
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


def keep_killed_after_exit() -> None:
    """Leave a small detached process that gives the run its KILLED back once `mlflow run` has
    overwritten it with FAILED and exited (2.)."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id or os.getppid() != _parent_at_start:  # `mlflow run` is gone: nothing will overwrite
        return
    import mlflow

    env = {k: v for k, v in os.environ.items() if k != RUN_ID_ENV}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    try:
        subprocess.Popen([sys.executable, "-m", __name__, run_id, str(os.getppid()), "KILLED"],
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError:
        pass


def keep_status_after(run_id: str, parent_pid: int, status: str, wait_s: float = KEEP_STATUS_WAIT_S) -> None:
    """Wait for ``parent_pid`` (`mlflow run`) to exit, then give ``run_id`` back ``status`` (2.)."""
    from mlflow import MlflowClient

    from pipelines.tracking.liveness import process_started

    deadline = time.monotonic() + wait_s
    while process_started(parent_pid) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    client = MlflowClient()
    run = client.get_run(run_id)
    if run.info.status != status:
        client.set_terminated(run_id, status, end_time=run.info.end_time)


def die_with_parent() -> None:
    """Ask Linux to send us SIGTERM (handled like Ctrl-C: the run ends KILLED) the moment
    `mlflow run` exits (3.)."""
    if not started_by_mlflow_run() or not sys.platform.startswith("linux"):
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


if __name__ == "__main__":  # the detached helper of keep_killed_after_exit
    keep_status_after(sys.argv[1], int(sys.argv[2]), sys.argv[3])
