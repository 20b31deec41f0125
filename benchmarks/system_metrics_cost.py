"""What recording system metrics costs a run: `python -m benchmarks.system_metrics_cost`.

Trains the same short run (logged into a throw-away MLflow store, as the `train` entry point logs
it) alternately without and with MLflow's system-metrics monitor (`execution.system_metrics`), at
each interval asked for, and prints:

- the run's wall time each way (median of the repeats) and the difference, as a share of the run:
  the end-to-end cost, but within the machine's noise when the cost is small;
- the monitor thread's own CPU time (read from the OS per thread), per run, per sample, and as a
  share of one core over the run: the cost itself, free of that noise;
- what starting and stopping a monitor costs (the last sample included), per run, without training.

The default `execution.system_metrics_interval_s` is chosen from these numbers
(docs/configuration.md, System metrics).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import threading
import time


def monitor_cpu_seconds() -> float:
    """CPU seconds (user + system) of MLflow's monitor thread so far; 0 when none runs."""
    import psutil

    from pipelines.tracking.system_metrics import MONITOR_THREAD

    ids = {t.native_id for t in threading.enumerate() if t.name == MONITOR_THREAD}
    return sum(t.user_time + t.system_time for t in psutil.Process().threads() if t.id in ids)


def timed_run(client, experiment: str, config, splits, interval_s: float | None) -> tuple[float, float, int]:
    """(wall seconds, monitor CPU seconds, samples logged) of one training run; no monitor when
    ``interval_s`` is None."""
    from pipelines.tracking.runs import RunLogger, end_run_for, start_run
    from pipelines.tracking.system_metrics import system_metrics
    from pipelines.training.train import train

    run_id = start_run(client, experiment)
    logger = RunLogger(run_id, client)
    cpu = 0.0
    started = time.perf_counter()
    with system_metrics(client, run_id, enabled=interval_s is not None, interval_s=interval_s or 1.0):
        train(config, logger, splits=splits)
        cpu = monitor_cpu_seconds()
    wall = time.perf_counter() - started
    end_run_for(logger, None)
    samples = len(client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    return wall, cpu, samples


def start_stop_seconds(client, experiment: str, repeats: int) -> float:
    """Median seconds to start a monitor and stop it at once, its last sample included."""
    from pipelines.tracking.runs import RunLogger, end_run_for, start_run
    from pipelines.tracking.system_metrics import system_metrics

    times = []
    for _ in range(repeats):
        run_id = start_run(client, experiment)
        started = time.perf_counter()
        with system_metrics(client, run_id, interval_s=60.0):
            pass
        times.append(time.perf_counter() - started)
        end_run_for(RunLogger(run_id, client), None)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit-train", type=int, default=0, help="training images; 0: all 55,000")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run")
    parser.add_argument("--repeats", type=int, default=4, help="runs per setting, interleaved")
    parser.add_argument("--intervals", default="1,5", help="comma-separated sampling intervals, seconds")
    args = parser.parse_args(argv)
    intervals = [float(text) for text in args.intervals.split(",")]

    workdir = tempfile.mkdtemp(prefix="system-metrics-cost-")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
    from mlflow import MlflowClient

    from pipelines.config import RunConfig, with_overrides
    from pipelines.data import load_splits
    from pipelines.entrypoints.logs import configure_logging
    from pipelines.tracking.runs import configure_tracking
    from pipelines.training.devices import resolve_device

    configure_logging(logging.WARNING)  # the harness's warnings; what is measured is printed
    configure_tracking()
    client = MlflowClient()
    experiment = "system-metrics-cost"
    client.create_experiment(experiment, artifact_location=f"file://{workdir}/artifacts")
    config = with_overrides(RunConfig(), {"data.dataset": args.dataset, "data.limit_train": args.limit_train,
                                          "optim.epochs": args.epochs, "optim.patience": 0,
                                          "execution.device": "cpu"})
    splits = load_splits(config.data, resolve_device(config.execution))
    timed_run(client, experiment, with_overrides(config, {"optim.epochs": 1}), splits, None)  # warm-up

    settings: list[float | None] = [None, *intervals]
    results: dict[float | None, list[tuple[float, float, int]]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for setting in settings:
            results[setting].append(timed_run(client, experiment, config, splits, setting))
    start_stop = start_stop_seconds(client, experiment, repeats=10)

    off = statistics.median(wall for wall, _, _ in results[None])
    spread = (max(w for w, _, _ in results[None]) - min(w for w, _, _ in results[None])) / off
    print(f"{len(splits.train)} training images, {args.epochs} epochs per run, {args.repeats} runs per setting "
          f"(interleaved), {os.cpu_count()} cores; runs without a monitor: median {off:.2f} s, "
          f"spread {spread:.1%} of it")
    header = ["interval s", "run s (median)", "run s without", "wall-time overhead", "monitor CPU s per run",
              "samples per run", "CPU ms per sample", "monitor CPU, share of one core"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for interval in intervals:
        walls = [w for w, _, _ in results[interval]]
        cpu = statistics.median(c for _, c, _ in results[interval])
        samples = statistics.median(s for _, _, s in results[interval])
        on = statistics.median(walls)
        print(f"| {interval:g} | {on:.2f} | {off:.2f} | {(on - off) / off:+.2%} | {cpu:.3f} | {samples:g} | "
              f"{1000 * cpu / max(samples, 1):.1f} | {cpu / on:.2%} |")
    print(f"starting and stopping a monitor (last sample included): {1000 * start_stop:.1f} ms per run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
