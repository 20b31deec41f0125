"""A tracking server that stops answering mid-run: a bounded wait, then the rest of the run spooled.

MLflow's client retries each call briefly itself (``HTTP_RETRY_DEFAULTS``: a dropped connection,
a 503 while the server restarts). When a call of a ``RunLogger`` still fails and the server's
``/health`` does not answer, the command logs one line, ``waiting up to N s for the tracking server
at URL (why)``, and asks ``/health`` every few seconds for at most $CVAE_TRACKING_WAIT_S seconds
(default 300). MLflow's own knobs count retries, not seconds, and cannot say when waiting starts:
hence this wait. If the server answers, the call is made again and nothing is lost. If not, the
process spools (``tracking.spool``): from then on every run of this process logs into one local
spool directory, training goes on to its end, and the command exits with ``TrackingLostError``
(exit code 3) naming the spool and the command that pushes it.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import mlflow

from pipelines.errors import TrackingLostError
from pipelines.tracking.spool import PUSH_COMMAND, Spool, spools

log = logging.getLogger(__name__)

WAIT_ENV = "CVAE_TRACKING_WAIT_S"
DEFAULT_WAIT_S = 300.0  # a server restart or a network blip; longer outages are spooled
POLL_S = 2.0  # between two questions to /health while waiting
# Each call of MLflow's client: 2 retries, 0 then 2 s apart, each attempt given 20 s to answer:
# a refused connection is known in seconds (then the wait above, with its line, takes over), a
# server that accepts and hangs in under a minute. MLflow's defaults (7 retries, 120 s timeouts)
# kept a command silent for minutes per call. Values the user set win.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}

_lock = threading.Lock()
_spool: Spool | None = None
_troubled = threading.Event()  # set once a wait started: MLflow's monitor's complaints are expected


def is_server_uri(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in ("http", "https")


def bound_http_retries(uri: str) -> None:
    """For a tracking server, MLflow's HTTP retries get the bounds above, where the user set none."""
    if is_server_uri(uri):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)


def wait_s() -> float:
    """Seconds to wait for a server that stopped answering: $CVAE_TRACKING_WAIT_S when it is a number >= 0."""
    try:
        value = float(os.environ.get(WAIT_ENV, ""))
    except ValueError:
        return DEFAULT_WAIT_S
    return value if 0 <= value < float("inf") else DEFAULT_WAIT_S


def health_problem(uri: str, retries: int = 0, timeout_s: float = 10.0) -> str | None:
    """None when the server at ``uri`` answers ``/health``, else what went wrong, in a few words."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util import Retry

    health = uri.rstrip("/") + "/health"
    # The TLS settings MLflow's own client honours (/health needs no credentials).
    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or \
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() not in ("true", "1")
    with requests.Session() as session:
        retry = Retry(total=retries, backoff_factor=1, status_forcelist=(502, 503, 504), raise_on_status=False)
        session.mount(health, HTTPAdapter(max_retries=retry))
        try:
            response = session.get(health, timeout=timeout_s, verify=verify)
            return None if response.ok else f"{health} answered HTTP {response.status_code}"
        except requests.RequestException as error:
            return f"no answer from {health} ({type(error).__name__})"


def active_spool() -> Spool | None:
    """The spool this process logs into since its tracking server was lost; None while all is well."""
    return _spool


def tracking_in_trouble() -> bool:
    """Whether this process has waited for its tracking server (or spools)."""
    return _troubled.is_set()


def server_back_after_wait(uri: str, problem: str) -> bool:
    """Wait up to ``wait_s()`` for the server at ``uri`` to answer again, saying so in one line."""
    wait = wait_s()
    _troubled.set()
    log.warning(f"waiting up to {wait:.0f} s for the tracking server at {uri} ({problem}; {WAIT_ENV} sets the wait)")
    start = time.monotonic()
    deadline = start + wait
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(POLL_S, left))
        if health_problem(uri, timeout_s=max(1.0, min(10.0, deadline - time.monotonic()))) is None:
            log.info(f"the tracking server at {uri} answers again, after {time.monotonic() - start:.0f} s")
            return True
    return False


def start_spooling(uri: str, problem: str) -> Spool:
    """The process's spool, made on the first call (then every run of the process logs there)."""
    global _spool
    with _lock:
        if _spool is None:
            _spool = Spool.create(uri, problem)
            # MLflow's log_model uses the process's tracking URI (it takes a run id, not a client).
            mlflow.set_tracking_uri(_spool.uri)
            log.debug(f"spooling into {_spool.dir}")
        return _spool


def lost_error(spool: Spool) -> TrackingLostError:
    """The one line a command ends with when it spooled."""
    record = spool.record
    runs = ", ".join(record["runs"]) or "none"
    return TrackingLostError(
        f"the tracking server at {record['server']} stopped answering ({record['cause']}) and did not answer "
        f"again within {wait_s():.0f} s; what run(s) {runs} logged from then on, model and end status "
        f"included, is kept in {spool.dir}: push it with `{PUSH_COMMAND} {spool.dir}` once the server answers")


def mention_unpushed_spools(uri: str) -> None:
    """One line when spools of the server at ``uri`` wait to be pushed (a server that answers again)."""
    waiting = spools(server_uri=uri)
    if waiting:
        log.warning(f"{len(waiting)} spool(s) of runs logged while the tracking server at {uri} did not answer "
                    f"wait in {waiting[0].dir.parent}: push them with `{PUSH_COMMAND}`")
