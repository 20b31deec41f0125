"""`tune` entry point: an Optuna study whose trials are nested MLflow runs under one parent run.

Configuration flags (``--epochs``, ``--limit-train``, ``--device``...) fix the study's base
configuration for every trial; the search space overrides the rest.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from pipelines.config_cli import add_config_arguments, config_from_args
from pipelines.entrypoints.command_line import CommandParser, add_flag, add_run_arguments, number_option
from pipelines.entrypoints.common import run_main
from pipelines.metrics import DEFAULT_OBJECTIVE, OBJECTIVES
from pipelines.training.preflight import preflight
from pipelines.tracking.runs import entry_point_run
from pipelines.studies.settings import (DEFAULT_STORAGE, DEFAULT_TRIALS, HEARTBEAT_GRACE_S, PRUNERS, SAMPLERS,
                                       TRIAL_ARTIFACTS, StudySettings)
from pipelines.studies.tune import prepare_study, run_study
from pipelines.studies.workers import (STOP_AT_TRIALS_FLAG, WORKER_INDEX_FLAG, WORKER_OF_FLAG, coordinate_workers,
                                      run_as_worker)
from search_spaces import resolve_space, space_names

NO_REGISTRATION = "none"


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pipelines.entrypoints.tune",
        description="Tune a conditional VAE with Optuna; every trial is a nested MLflow run. "
                    "An empty value means 'not given'.")
    study = parser.add_argument_group("study")
    add_flag(study, "study", default="cvae", help="study name; the same name and storage resume the study")
    add_flag(study, "storage", default=DEFAULT_STORAGE,
          help=f"Optuna storage URL (default {DEFAULT_STORAGE}; journal:PATH for a journal file; "
               "postgresql://... for many workers)")
    add_flag(study, "space", default="default",
          help=f"search space: {', '.join(space_names())}, or path/to/file.py:function")
    add_flag(study, "objectives", default=DEFAULT_OBJECTIVE,
          help=f"comma-separated, all minimised: {', '.join(OBJECTIVES)} (e.g. recon,kl or neg_elbo,params "
               f"for a multi-objective study; default {DEFAULT_OBJECTIVE}; nll is its old name)")
    add_flag(study, "sampler", default="auto", help=f"{', '.join(SAMPLERS)} (auto: tpe, or nsga2 for several objectives)")
    add_flag(study, "sampler_seed", default="", help="sampler seed (default: --seed); give parallel workers different ones")
    add_flag(study, "pruner", default="median", help=f"{', '.join(PRUNERS)} (off in multi-objective studies)")
    add_flag(study, "pruner_startup_trials", default="5", help="median pruner: trials before any pruning")
    add_flag(study, "pruner_warmup_epochs", default="0", help="median pruner: epochs before a trial may be pruned")
    add_flag(study, "n_trials", default="",
          help=f"trials this process runs (default {DEFAULT_TRIALS}, or unlimited when --timeout is given)")
    add_flag(study, "timeout", default="", help="stop starting trials after this many seconds")
    add_flag(study, "register_as", default="",
          help=f"registered model name for the best trial's model, alias @best (default: the study name; "
               f"'{NO_REGISTRATION}' registers nothing)")
    add_flag(study, "workers", default="1",
          help="worker processes this command starts on the study (each CPU worker gets cores / workers "
               "threads unless --threads is given; GPUs are shared out among them); --n-trials is their total")
    add_flag(study, "trial_artifacts", default="best",
          help=f"{', '.join(TRIAL_ARTIFACTS)}: every trial keeps its metrics, model and manifest; 'best' gives "
               "test metrics, figures, evaluation and the generator to the chosen trial(s) only, 'all' to every trial")
    add_flag(study, "heartbeat_grace", default="",
          help=f"seconds without a heartbeat after which another worker fails a running trial "
               f"(default {HEARTBEAT_GRACE_S}; database storages only)")
    add_run_arguments(study, run_name_help="name of the parent MLflow run (default: the study name)")
    add_flag(study, "list_spaces", action="store_true", help="print the search space names and exit")
    # Set by `--workers N` on the worker processes it starts: the parent run they report to.
    study.add_argument(WORKER_OF_FLAG, dest="worker_of", default="", help=argparse.SUPPRESS)
    study.add_argument(WORKER_INDEX_FLAG, dest="worker_index", default="0", help=argparse.SUPPRESS)
    study.add_argument(STOP_AT_TRIALS_FLAG, dest="stop_at_trials", default="", help=argparse.SUPPRESS)
    add_config_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace, seed: int) -> StudySettings:
    register_as = (args.register_as or "").strip() or args.study
    return StudySettings(
        name=args.study, storage=args.storage, space=args.space,
        objectives=tuple(p.strip() for p in args.objectives.split(",") if p.strip()),
        sampler=args.sampler, sampler_seed=number_option("sampler_seed", args.sampler_seed, int, seed),
        pruner=args.pruner,
        pruner_startup_trials=number_option("pruner_startup_trials", args.pruner_startup_trials, int, 5),
        pruner_warmup_epochs=number_option("pruner_warmup_epochs", args.pruner_warmup_epochs, int, 0),
        n_trials=number_option("n_trials", args.n_trials, int), timeout=number_option("timeout", args.timeout, float),
        register_as="" if register_as == NO_REGISTRATION else register_as,
        heartbeat_grace_s=number_option("heartbeat_grace", args.heartbeat_grace, int, HEARTBEAT_GRACE_S),
        trial_artifacts=(args.trial_artifacts or "best").strip(),
        workers=number_option("workers", args.workers, int, 1))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.list_spaces:
        print("\n".join(space_names()))
        return 0
    base = config_from_args(args)
    settings = settings_from_args(args, base.execution.seed)
    space = resolve_space(settings.space)
    preflight(base)  # device, data sizes, the base model on the meta device, before any run
    study = prepare_study(settings, base, args.experiment)
    if args.worker_of:
        run_as_worker(study, settings, space, base, args.worker_of, number_option("worker_index", args.worker_index, int),
                      number_option("stop_at_trials", args.stop_at_trials, int, minimum=1))
        return 0
    with entry_point_run(args.experiment, args.run_name or settings.name, tags={"study": settings.name}) as parent:
        print(f"study {settings.name!r}: {len(study.trials)} trials so far; parent run {parent.run_id}", flush=True)
        if settings.workers == 1:
            run_study(study, settings, space, base, parent)
            return 0
        failed = coordinate_workers(study, settings, base, parent, argv)
    if failed:
        print(f"error: workers {', '.join(map(str, failed))} of {settings.workers} exited with an error; "
              "see their output above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
