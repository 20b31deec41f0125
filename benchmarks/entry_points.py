"""The harness's commands as a user runs them, timed from outside: a process each, on a store of the benchmark's own."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.table import Table

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "benchmark"
PARENT_TAG = "mlflow.parentRunId"


class CommandFailed(RuntimeError):
    """A command of the harness exited non-zero; the message holds the end of its output."""


def command_env(workdir: Path) -> dict:
    """This process's environment (CVAE_DATA_DIR, CVAE_OFFLINE included), the store in ``workdir``,
    the repository first on PYTHONPATH (then what was there: the GPU machine's installed wheels)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
           "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": EXPERIMENT}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def run_command(workdir: Path, module: str, *args: str) -> float:
    """Run ``python -m module args`` in ``workdir``; its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=workdir, env=command_env(workdir),
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise CommandFailed(f"{module} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def find_runs(workdir: Path, filter_string: str = ""):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client, client.search_runs([experiment.experiment_id], filter_string=filter_string, max_results=1000)


def epoch_seconds(client, run) -> float:
    return sum(m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s"))


def data_args(images: int, device: str = "cpu") -> list[str]:
    return ["--dataset", "fashion-mnist", "--limit-train", str(images), "--device", device]


def warm_up_store(table: Table, workdir: Path, training_sizes: set[int], section: str = "recording") -> None:
    """A user's first run in a fresh store also creates MLflow's tables, and the first run on a
    given number of training images trains (and caches) the classifier that judges its samples;
    every later run finds both. Paid here once per size, and shown, so the sections that follow
    measure the steady state."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.config import DataConfig
    from pipelines.evaluation.classifier import get_classifier

    wall = run_command(workdir, "pipelines.entrypoints.train", *data_args(500), "--epochs", "1", "--run-name", "warm-up")
    table.add(section, "first run in a fresh store (tables; 1 epoch, 500 images)", wall, "s")
    uri = command_env(workdir)["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)  # the classifier's model is logged through MLflow's fluent API
    client = MlflowClient(uri)
    for images in sorted(training_sizes):
        started = time.perf_counter()
        get_classifier(DataConfig(dataset="fashion-mnist", limit_train=images), torch.device("cpu"), images,
                       client=client)
        table.add(section, f"judge classifier for runs on {images or 'all'} training images, once",
                  time.perf_counter() - started, "s")


def study_args(workdir: Path, space: str, images: int, epochs: int, trials: int, device: str = "cpu") -> list[str]:
    """A `tune` study's arguments; its storage is the benchmark's, its name is added per study."""
    return ["--space", space, *data_args(images, device), "--epochs", str(epochs), "--n-trials", str(trials),
            "--sampler-seed", "0", "--register-as", "none",
            # No pruning: which trials a median pruner stops depends on the order they finish in,
            # so different numbers of workers would not train the same trials.
            "--pruner", "none", "--storage", f"sqlite:///{workdir / 'optuna.db'}"]


def run_study(workdir: Path, args: list[str], study: str, workers: int) -> tuple[float, list, float]:
    """(wall time in seconds, the trials' runs, seconds inside their epochs) of one `tune` invocation."""
    wall = run_command(workdir, "pipelines.entrypoints.tune", *args, "--study", study, "--workers", str(workers))
    client, runs = find_runs(workdir, f"tags.study = '{study}'")
    children = [r for r in runs if PARENT_TAG in r.data.tags]
    return wall, children, sum(epoch_seconds(client, r) for r in children)
