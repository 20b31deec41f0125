"""Liveness of MLflow runs: a heartbeat tag while a run is open, and finding runs whose process died.

A process killed with SIGKILL (or a lost machine, an out-of-memory kill) cannot end its run, so
MLflow shows it RUNNING forever. While a run is open, a daemon thread sets the run's tag
``heartbeat`` to the current time (epoch seconds) every ``CVAE_HEARTBEAT_INTERVAL_S`` seconds
(default 30). A RUNNING run whose last heartbeat (or, without one, whose start) is older than a
grace period belongs to a dead process; ``stale_runs`` lists them and ``close_stale_run`` ends
them KILLED, with an ``error`` tag saying why (``python -m pipelines.entrypoints.stale_runs``).
The first beat also tags the run with the host and process id running it (``heartbeat_host``,
``heartbeat_pid``): on that host, a run whose process is gone is known dead at once (``alive_reason``).
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

from mlflow import MlflowClient
from mlflow.entities import Run, RunTag, ViewType

HEARTBEAT_TAG = "heartbeat"
HOST_TAG, PID_TAG = "heartbeat_host", "heartbeat_pid"
INTERVAL_ENV = "CVAE_HEARTBEAT_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0
# A live run beats every 30 s; four missed beats (a store busy for a while) are not yet death.
DEFAULT_GRACE_S = 120.0


def heartbeat_interval() -> float:
    """Seconds between heartbeats: $CVAE_HEARTBEAT_INTERVAL_S when it is a positive number."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, ""))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if 0 < value < float("inf") else DEFAULT_INTERVAL_S


@contextlib.contextmanager
def heartbeat(client: MlflowClient, run_id: str, interval_s: float | None = None) -> Iterator[None]:
    """While the block runs, tag ``run_id`` with ``heartbeat=<epoch seconds>`` every ``interval_s``.

    The first beat is written before the block starts. A beat that fails (a store briefly
    unreachable or locked) is skipped, not raised: the grace period absorbs a few missed beats,
    and the training must not fail for its liveness signal.
    """
    interval = interval_s or heartbeat_interval()
    stop = threading.Event()

    def beat_once() -> None:
        try:
            client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
        except Exception:
            pass

    def beat() -> None:
        while not stop.wait(interval):
            beat_once()

    try:  # the first beat, with who beats
        client.log_batch(run_id, tags=[RunTag(HEARTBEAT_TAG, str(int(time.time()))),
                                       RunTag(HOST_TAG, socket.gethostname()), RunTag(PID_TAG, str(os.getpid()))])
    except Exception:
        pass
    thread = threading.Thread(target=beat, name=f"heartbeat-{run_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)  # a beat in flight finishes before the run's final status is set


@dataclass(frozen=True)
class StaleRun:
    run: Run
    last_seen_s: float  # epoch seconds of the last heartbeat, else of the start
    has_heartbeat: bool

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    def silent_for(self, now: float) -> float:
        return now - self.last_seen_s

    def reason(self, now: float, grace_s: float) -> str:
        silence = (f"last heartbeat {self.silent_for(now):.0f} s ago" if self.has_heartbeat
                   else f"no heartbeat since it started {self.silent_for(now):.0f} s ago")
        return f"{silence}, more than the grace of {grace_s:.0f} s: the process running it was killed or lost"


def last_seen(run: Run) -> tuple[float, bool]:
    """(epoch seconds of the last sign of life, whether the run has a heartbeat at all)."""
    started = (run.info.start_time or 0) / 1000.0
    try:
        return max(float(run.data.tags[HEARTBEAT_TAG]), started), True
    except (KeyError, ValueError):
        return started, False


def _running_runs(client: MlflowClient, experiment_ids: Iterable[str]) -> Iterator[Run]:
    ids = list(experiment_ids)
    if not ids:
        return
    token = None
    while True:
        page = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def stale_runs(client: MlflowClient, experiment_ids: Iterable[str], grace_s: float,
               now: float | None = None) -> list[StaleRun]:
    """RUNNING runs silent for more than ``grace_s`` seconds, the longest silent first."""
    now = time.time() if now is None else now
    found = []
    for run in _running_runs(client, experiment_ids):
        seen, has_heartbeat = last_seen(run)
        if now - seen > grace_s:
            found.append(StaleRun(run, seen, has_heartbeat))
    return sorted(found, key=lambda stale: stale.last_seen_s)


def close_stale_run(client: MlflowClient, stale: StaleRun, reason: str) -> bool:
    """End the run KILLED at its last sign of life, unless it ended (or beat) meanwhile."""
    current = client.get_run(stale.run_id)
    if current.info.status != "RUNNING" or last_seen(current)[0] > stale.last_seen_s:
        return False
    client.set_tag(stale.run_id, "error", reason[:5000])
    client.set_terminated(stale.run_id, "KILLED", end_time=int(stale.last_seen_s * 1000))
    return True


def pid_running(pid: int) -> bool:
    """Whether ``pid`` still runs on this host (a zombie, ended but not yet reaped, does not: /proc says so)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not os.path.isdir("/proc/self")  # without /proc, kill(pid, 0) is all we know


def alive_reason(run: Run, grace_s: float = DEFAULT_GRACE_S, now: float | None = None) -> str | None:
    """Why a RUNNING ``run`` may still have a live process (None: it is dead). Its process on this host
    having ended is proof of death; anywhere else, a heartbeat older than ``grace_s`` is."""
    now = time.time() if now is None else now
    seen, _ = last_seen(run)
    if now - seen > grace_s:
        return None
    tags = run.data.tags
    if tags.get(HOST_TAG) == socket.gethostname() and tags.get(PID_TAG, "").isdigit():
        pid = int(tags[PID_TAG])
        return f"its process {pid} on this host is still running" if pid_running(pid) else None
    return (f"its last heartbeat was {now - seen:.0f} s ago, within the grace of {grace_s:.0f} s "
            f"(host {tags.get(HOST_TAG, 'unknown')})")
