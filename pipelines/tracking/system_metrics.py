"""MLflow system metrics for one run: CPU, memory, disk, network and, where NVML answers, each GPU's
utilisation and memory, logged as ``system/...`` metrics (the run page's System metrics tab).

MLflow's ``SystemMetricsMonitor`` does the sampling; here it is attached to a run by id (the harness
never uses MLflow's active run) and tied to a ``with`` block, so that its thread stops when the block
ends, however it ends (an error, Ctrl-C): no monitor outlives its run. MLflow's monitor logs a sample
only when its interval has passed, so a run shorter than the interval would get none; the block
logs one last sample of the time since the previous one when it ends.

Needs ``psutil`` (and ``nvidia-ml-py`` for GPUs, as MLflow's monitor does); without psutil the run
goes on unmonitored after one warning.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import ExecutionConfig
from pipelines.tracking.runs import RunLogger
from pipelines.tracking.server_loss import active_spool, tracking_in_trouble

log = logging.getLogger(__name__)

MONITOR_THREAD = "SystemMetricsMonitor"  # the name MLflow gives its sampling thread
PREFIX = "system/"


def _monitor(run_id: str, interval_s: float, tracking_uri: str):
    """MLflow's monitor for ``run_id``, or None (with a warning) where it cannot sample."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as error:  # psutil missing
        log.warning(f"system metrics are not recorded: {error.msg} (pip install psutil, or --system-metrics false)")
        return None
    # MLflow logs "started/stopped monitoring" at INFO for every run, and on a machine without a GPU
    # that it skips GPU metrics: once per trial, noise in a study's log. Its warnings still show.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor_log = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    if _quiet_while_server_lost not in monitor_log.filters:
        monitor_log.addFilter(_quiet_while_server_lost)
    return SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri,
                                # a resumed run (`train --resume`) goes on from its last sample's step
                                resume_logging=True)


def _quiet_while_server_lost(record: logging.LogRecord) -> bool:
    """The monitor stops with a warning when the tracking server does not answer it; the command
    has said so in its own line already (``server_loss``): its samples stop there."""
    return not tracking_in_trouble()


def _last_sample(monitor) -> None:
    """Log a sample of the time since the monitor's previous one (CPU use is averaged over it)."""
    for each in monitor.monitors:
        each.clear_metrics()  # samples already logged, or the start-up one (CPU use since the last call)
    monitor.collect_metrics()
    monitor.publish_metrics(monitor.aggregate_metrics())
    monitor.mlflow_logger.flush()


@contextlib.contextmanager
def system_metrics(client: MlflowClient, run_id: str, enabled: bool = True, interval_s: float = 5.0) -> Iterator[None]:
    """Record the machine's use as ``system/...`` metrics of ``run_id`` while the block runs.

    ``enabled=False`` records nothing. The monitor's thread is stopped and joined when the block
    ends, also on an exception or KeyboardInterrupt, which then propagates unchanged; a failure of
    the monitor itself is a warning, never the run's failure.
    """
    monitor = _monitor(run_id, interval_s, client.tracking_uri) if enabled else None
    if monitor is None:
        yield
        return
    monitor.start()
    try:
        yield
    except BaseException as error:
        monitor.finish()  # sets its stop event and joins the thread
        # A failed run's last sample can tell why (memory); not after Ctrl-C (the user is waiting)
        # or a tracking-store failure (each call would wait out MLflow's retries).
        if isinstance(error, Exception) and not isinstance(error, MlflowException):
            _try_last_sample(monitor)
        raise
    monitor.finish()
    _try_last_sample(monitor)


def _try_last_sample(monitor) -> None:
    if active_spool() is not None:  # its tracking server is lost: the monitor's samples stopped there
        return
    try:
        _last_sample(monitor)
    except Exception as error:  # the tracking store went away: the run's own outcome stands
        log.warning(f"the last system-metrics sample was not logged: {error}")


def run_system_metrics(logger: RunLogger, execution: ExecutionConfig):
    """``system_metrics`` for a training run or trial, as its configuration asks."""
    return system_metrics(logger.client, logger.run_id, execution.system_metrics, execution.system_metrics_interval_s)
