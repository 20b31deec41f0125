"""Several worker processes on one study, started by one `tune` invocation.

Optuna's ``n_jobs`` runs trials in threads under one interpreter lock; here every worker is its
own process running the same `tune` command on the same study and storage, so seeds, threads and
devices are per process. Each CPU worker gets its share of the cores (cores ÷ workers, unless
``threads`` is given), GPUs are spread over the visible devices (several workers per GPU when
there are more workers than GPUs). The workers draw trials from the study as they go, so a worker
that gets short trials runs more of them: each stops when the study holds as many trials as it had
when the command started plus ``n_trials`` (Optuna's ``MaxTrialsCallback``). The coordinating
process opens the parent run, waits, and concludes the study once.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import optuna
import torch

from pipelines.config import RunConfig
from pipelines.studies.settings import StudySettings, trials_to_run
from pipelines.studies.tune import run_and_conclude, run_trials
from pipelines.tracking.runs import RunLogger

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # search spaces build on this layer; only their type is named here
    from search_spaces import SearchSpace

WORKER_OF_FLAG = "--worker-of"
WORKER_INDEX_FLAG = "--worker-index"
STOP_AT_TRIALS_FLAG = "--stop-at-trials"
STOP_GRACE_S = 120  # how long stopped workers get to close their trials before they are killed


@dataclass(frozen=True)
class WorkerPlan:
    index: int
    device: str | None  # None: the study's own device setting
    threads: int | None  # None: the study's own threads setting


def plan_workers(base: RunConfig, workers: int, n_trials: int | None,
                 cpu_count: int | None = None, gpu_count: int | None = None) -> list[WorkerPlan]:
    """Which device and how many threads each worker gets; never more workers than trials."""
    cpu_count = cpu_count or os.cpu_count() or 1
    gpu_count = torch.cuda.device_count() if gpu_count is None else gpu_count
    on_gpus = base.execution.device in ("auto", "cuda") and gpu_count > 0
    count = workers if n_trials is None else min(workers, n_trials)
    threads = None if base.execution.threads else max(1, cpu_count // count)
    return [WorkerPlan(index, f"cuda:{index % gpu_count}" if on_gpus else None, threads) for index in range(count)]


def worker_command(argv: Sequence[str], plan: WorkerPlan, parent_run_id: str,
                   stop_at_trials: int | None) -> list[str]:
    """The `tune` command line of one worker: the user's own, with later flags that win."""
    command = [sys.executable, "-m", "pipelines.entrypoints.tune", *argv, "--workers", "1",
               WORKER_OF_FLAG, parent_run_id, WORKER_INDEX_FLAG, str(plan.index)]
    if stop_at_trials is not None:
        command += [STOP_AT_TRIALS_FLAG, str(stop_at_trials)]
    if plan.device:
        command += ["--device", plan.device]
    if plan.threads:
        command += ["--threads", str(plan.threads)]
    return command


def run_workers(argv: Sequence[str], plans: Sequence[WorkerPlan], parent_run_id: str,
                stop_at_trials: int | None) -> list[int]:
    """Start every worker and wait for all of them; return their exit codes. Each stops when the
    study holds ``stop_at_trials`` trials (None: at the study's timeout).

    Ctrl-C in a terminal reaches the workers directly (one process group). A SIGTERM or Ctrl-C
    that only this process received is passed on, so no worker outlives the invocation; after
    STOP_GRACE_S the stragglers are killed. The interruption then propagates.
    """
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # that run is the parent's
    processes = []
    for plan in plans:
        log.info(f"worker {plan.index}: on {plan.device or 'the study device'}"
                 + (f", {plan.threads} CPU threads" if plan.threads else ""))
        processes.append(subprocess.Popen(worker_command(argv, plan, parent_run_id, stop_at_trials), env=env))
    try:
        return [process.wait() for process in processes]
    except KeyboardInterrupt:
        for process in processes:
            if process.poll() is None:
                # SIGTERM: a worker that already got the Ctrl-C takes it as the follow-up, not a second Ctrl-C.
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        raise


def coordinate_workers(study: optuna.Study, settings: StudySettings, base: RunConfig, parent: RunLogger,
                       argv: Sequence[str]) -> list[int]:
    """Start the workers on ``study``, wait for them, conclude the study in ``parent`` (after Ctrl-C
    too); return the indices of the workers that failed.

    The workers share this invocation's ``n_trials``: each draws trials until the study holds
    as many as it had now plus ``n_trials``, so none idles while another has a queue."""
    n_trials = trials_to_run(settings)
    stop_at_trials = None if n_trials is None else len(study.get_trials(deepcopy=False)) + n_trials
    plans = plan_workers(base, settings.workers, n_trials)
    codes: list[int] = []

    def run() -> None:
        codes.extend(run_workers(argv, plans, parent.run_id, stop_at_trials))

    run_and_conclude(study, settings, base, parent, run)
    return [plan.index for plan, code in zip(plans, codes) if code != 0]


def run_as_worker(study: optuna.Study, settings: StudySettings, space: SearchSpace, base: RunConfig,
                  parent_run_id: str, index: int, stop_at_trials: int | None) -> None:
    """One of the processes `--workers N` started: run trials under the shared parent run until the
    study holds ``stop_at_trials`` trials; the coordinating process concludes the study."""
    log.info(f"worker {index}: study {settings.name!r}, trials until the study holds "
             f"{stop_at_trials or 'the timeout'}")
    run_trials(study, settings, space, base, RunLogger(parent_run_id), settings.n_trials,
               stop_at_trials=stop_at_trials)
