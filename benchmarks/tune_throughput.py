"""Smoke-study throughput: trials per minute with one `tune` worker vs two on one storage, side by side.

Runs the `smoke` space (a tiny MLP, one short epoch on a subset) through the real entry point,
first as one process doing N trials, then as two processes doing N/2 each on the same SQLite
storage and MLflow store, and prints trials per minute for each and their ratio. Two figures per
setup: over the trials' own span (first trial start to last trial end, from Optuna's storage) and
over the whole wall clock (process start-up, data loading and the study summary included).

    python -m benchmarks.tune_throughput --trials 8 --device cpu
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parent.parent


def run_workers(workdir: Path, study: str, workers: int, trials_each: int, common: list[str]) -> float:
    """Start ``workers`` tune processes on one study at once; return the wall-clock seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": "tune-throughput"}
    env.pop("MLFLOW_RUN_ID", None)
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-m", "pipelines.entrypoints.tune", *common, "--study", study,
                                   "--n-trials", str(trials_each), "--sampler-seed", str(worker)],
                                  cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for worker in range(workers)]
    outputs = [p.communicate()[0] for p in processes]
    elapsed = time.perf_counter() - started
    for process, output in zip(processes, outputs):
        if process.returncode != 0:
            sys.exit(f"a worker failed (exit {process.returncode}):\n{output[-3000:]}")
    return elapsed


def trial_span_seconds(storage: str, study: str) -> tuple[int, float]:
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return len(trials), span.total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8, help="trials per setup (split evenly between two workers)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit-train", default="1000")
    parser.add_argument("--epochs", default="1")
    args = parser.parse_args()
    if args.trials < 2 or args.trials % 2:
        parser.error("--trials must be an even number >= 2")

    common = ["--space", "smoke", "--dataset", args.dataset, "--limit-train", args.limit_train,
              "--val-size", "300", "--limit-test", "500", "--epochs", args.epochs, "--device", args.device,
              "--register-as", "none"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="tune-throughput-") as tmp:
        workdir = Path(tmp)
        storage = f"sqlite:///{workdir / 'optuna.db'}"
        common += ["--storage", storage]
        for workers in (1, 2):
            study = f"throughput-{workers}"
            wall = run_workers(workdir, study, workers, args.trials // workers, common)
            done, span = trial_span_seconds(storage, study)
            results[workers] = (done / span * 60, done / wall * 60)
            print(f"{workers} worker(s): {done} trials, {span:.1f} s of trials, {wall:.1f} s wall clock", flush=True)

    print(f"\nsmoke study on {args.device}, {os.cpu_count()} CPU cores:")
    print(f"{'workers':>8} {'trials/min (trials)':>20} {'trials/min (wall)':>18}")
    for workers, (over_span, over_wall) in results.items():
        print(f"{workers:>8} {over_span:>20.1f} {over_wall:>18.1f}")
    print(f"ratio two/one: {results[2][0] / results[1][0]:.2f} over the trials' span, "
          f"{results[2][1] / results[1][1]:.2f} over the wall clock")


if __name__ == "__main__":
    main()
