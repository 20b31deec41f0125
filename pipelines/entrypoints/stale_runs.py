"""`stale_runs` entry point: find RUNNING runs whose process is gone, and close them KILLED.

    python -m pipelines.entrypoints.stale_runs [--grace 120] [--experiment NAME] [--close]
    mlflow run . -e stale_runs --env-manager local [-P grace=120] [-P experiment=NAME] [-P close=true]

Every run of this harness beats (tag ``heartbeat``, epoch seconds, every 30 s) while its process
lives. A RUNNING run silent for longer than ``--grace`` seconds (or, without any heartbeat, started
longer ago than that) was killed (SIGKILL, out of memory, a lost machine). Without ``--close`` the
command only lists them; with it, each ends KILLED at its last sign of life, with an ``error`` tag
saying why.
"""
from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from typing import Sequence

from mlflow.store.tracking import SEARCH_MAX_RESULTS_DEFAULT
from mlflow.utils import get_results_from_paginated_fn

from pipelines.entrypoints.command_line import CommandParser, boolean, number
from pipelines.entrypoints.common import run_main
from pipelines.errors import UserError
from pipelines.tracking.liveness import DEFAULT_GRACE_S, close_stale_run, stale_runs

# Experiments asked for per call of search_experiments (MLflow's default page); every page is read.
EXPERIMENTS_PER_PAGE = SEARCH_MAX_RESULTS_DEFAULT


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pipelines.entrypoints.stale_runs",
        description="List RUNNING runs whose process is gone (no heartbeat for --grace seconds) in the "
                    "tracking store ($MLFLOW_TRACKING_URI, else sqlite:///mlflow.db); --close ends them KILLED.")
    parser.add_argument("--grace", type=number(0), default=DEFAULT_GRACE_S,
                        help="seconds without a heartbeat after which a RUNNING run is stale (default "
                             "%(default).0f; keep it well above the heartbeat interval, 30 s)")
    parser.add_argument("--experiment", default="", help="only this experiment (default: every active experiment)")
    parser.add_argument("--close", nargs="?", type=boolean, const="true", default=False, metavar="true|false",
                        help="end the stale runs KILLED (default: only list them); `--close` alone means true")
    return parser


def active_experiments(client) -> dict[str, str]:
    """Every active experiment, id -> name, over as many pages as the store returns."""
    def page(count: int, token: str | None):
        return client.search_experiments(max_results=count, page_token=token)

    return {e.experiment_id: e.name for e in get_results_from_paginated_fn(page, EXPERIMENTS_PER_PAGE)}


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def stale_command(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    grace = args.grace
    client = MlflowClient()
    if args.experiment:
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None:
            raise UserError(f"experiment={args.experiment!r} is not valid; no such experiment in the tracking store")
        experiments = {experiment.experiment_id: experiment.name}
    else:
        experiments = active_experiments(client)
    now = time.time()
    found = stale_runs(client, experiments, grace, now)
    if not found:
        print(f"no stale RUNNING runs (grace {grace:.0f} s) in {len(experiments)} experiment(s)")
        return 0
    closed = 0
    for stale in found:
        info = stale.run.info
        reason = stale.reason(now, grace)
        action = ""
        if args.close:
            done = close_stale_run(client, stale, f"closed as KILLED by `stale_runs --close`: {reason}")
            closed += done
            action = " -> KILLED" if done else " -> left alone (it ended or beat meanwhile)"
        print(f"{info.run_id}  {experiments.get(info.experiment_id, info.experiment_id)}/{info.run_name or ''}  "
              f"last seen {_when(stale.last_seen_s)}: {reason}{action}")
    if args.close:
        print(f"{closed} of {len(found)} stale run(s) closed as KILLED")
    else:
        print(f"{len(found)} stale run(s); nothing changed (dry run): add --close to end them KILLED")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return stale_command(args)


if __name__ == "__main__":
    run_main(main)
