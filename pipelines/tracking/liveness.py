"""Liveness of MLflow runs: a heartbeat tag while a run is open, and finding runs whose process died.

A process killed with SIGKILL (or a lost machine, an out-of-memory kill) cannot end its run, so
MLflow shows it RUNNING forever. While a run is open, a daemon thread sets the run's tag
``heartbeat`` to the current time (epoch seconds) every ``CVAE_HEARTBEAT_INTERVAL_S`` seconds
(default 30). A RUNNING run whose last heartbeat (or, without one, whose start) is older than a
grace period belongs to a dead process; ``stale_runs`` lists them and ``close_stale_run`` ends
them KILLED, with an ``error`` tag saying why (``python -m pipelines.entrypoints.stale_runs``).

Where the process is known, there is no need to wait: ``ProcessId`` records which process holds
something open (host, PID, start time, and which PIDs it shares: the boot and PID namespace), and
another process that sees the same PIDs tells at once whether it still runs (a PID the system gave
to another process since does not count); elsewhere it knows nothing, and the grace period decides.
The first heartbeat tags the run with its ``ProcessId`` (``PROCESS_TAG``), so a process that sees the
same PIDs knows at once whether the run's holder still runs (``alive_reason``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import psutil
from mlflow import MlflowClient
from mlflow.entities import Run, RunTag, ViewType

from pipelines.tracking.server_loss import active_spool

HEARTBEAT_TAG = "heartbeat"
INTERVAL_ENV = "CVAE_HEARTBEAT_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0
# A live run beats every 30 s; four missed beats (a store busy for a while) are not yet death.
DEFAULT_GRACE_S = 120.0
PROCESS_TAG = "process"  # on a run another process may find orphaned: the ProcessId (JSON) holding it open
START_TIME_TOLERANCE_S = 0.05  # psutil's create_time of one process, read twice, agrees far closer


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
    and the training must not fail for its liveness signal. Once the process spools (its tracking
    server lost), no more beats are sent: the push ends the run, `stale_runs` may mark it meanwhile.
    """
    interval = interval_s or heartbeat_interval()
    stop = threading.Event()

    def beat_once() -> None:
        if active_spool() is not None:
            return
        try:
            client.set_tag(run_id, HEARTBEAT_TAG, str(int(time.time())))
        except Exception:
            pass

    def beat() -> None:
        while not stop.wait(interval):
            beat_once()

    try:  # the first beat, with who beats
        client.log_batch(run_id, tags=[RunTag(HEARTBEAT_TAG, str(int(time.time()))),
                                       RunTag(PROCESS_TAG, ProcessId.current().to_json())])
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


def process_started(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds, psutil's ``create_time``), or None when there is
    no such process, or it ended and only its zombie is left."""
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


def same_process(pid: int, started: float) -> bool:
    """Whether the process that started at ``started`` (``process_started``) still runs as ``pid``."""
    now = process_started(pid)
    return now is not None and abs(now - started) < START_TIME_TOLERANCE_S


@functools.cache
def _pid_namespace() -> str:
    """Which PIDs this process sees: the kernel's boot id and its PID namespace ('' without /proc)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


@dataclass(frozen=True)
class ProcessId:
    """A process, as another one can find it again: by PID and start time, where it sees the same PIDs."""
    host: str  # for people; the PID namespace decides
    pid: int
    started: float  # process_started
    pid_namespace: str

    @classmethod
    def current(cls) -> ProcessId:
        return cls(socket.gethostname(), os.getpid(), process_started(os.getpid()) or 0.0, _pid_namespace())

    @classmethod
    def parse(cls, value: object) -> ProcessId | None:
        """From ``as_dict`` or its JSON text; None for anything else (not recorded, or by other code)."""
        try:
            fields = json.loads(value) if isinstance(value, str) else value
            return cls(str(fields["host"]), int(fields["pid"]), float(fields["started"]), str(fields["pid_namespace"]))
        except (TypeError, ValueError, KeyError):
            return None

    def as_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    def _visible_here(self) -> bool:
        here = _pid_namespace()
        return self.pid_namespace == here and (bool(here) or self.host == socket.gethostname())

    def is_gone(self) -> bool:
        """Known to have ended: it shared this process's PIDs, and its PID is free or another process's."""
        return self._visible_here() and not same_process(self.pid, self.started)

    def is_running(self) -> bool:
        """Known to run still (on another machine or PID namespace, neither is known)."""
        return self._visible_here() and same_process(self.pid, self.started)

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def close_runs_of_gone_processes(client: MlflowClient, experiment_ids: Iterable[str]) -> list[str]:
    """End KILLED the RUNNING runs whose holder (``PROCESS_TAG``) is known gone, without waiting for a
    grace period; return their ids. Runs of processes this one cannot see are left to ``stale_runs``."""
    closed = []
    for run in _running_runs(client, experiment_ids):
        owner = ProcessId.parse(run.data.tags.get(PROCESS_TAG))
        if owner is None or not owner.is_gone():
            continue
        if client.get_run(run.info.run_id).info.status == "RUNNING":
            client.set_tag(run.info.run_id, "error", f"the process holding this run open ({owner}) is gone (killed)")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def alive_reason(run: Run, grace_s: float = DEFAULT_GRACE_S, now: float | None = None) -> str | None:
    """Why a RUNNING ``run`` may still have a live process (None: it is dead). Its holder
    (``PROCESS_TAG``) seen gone from this machine is proof of death; anywhere else, a heartbeat older
    than ``grace_s`` is."""
    now = time.time() if now is None else now
    seen, _ = last_seen(run)
    if now - seen > grace_s:
        return None
    owner = ProcessId.parse(run.data.tags.get(PROCESS_TAG))
    if owner is not None and owner.is_gone():
        return None
    if owner is not None and owner.is_running():
        return f"its process ({owner}) is still running"
    return (f"its last heartbeat was {now - seen:.0f} s ago, within the grace of {grace_s:.0f} s "
            f"({owner or 'process unknown'})")
