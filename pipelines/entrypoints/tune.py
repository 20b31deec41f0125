"""`tune` entry point: an Optuna study whose trials are nested MLflow runs under one parent run.

Configuration flags (``--epochs``, ``--limit-train``, ``--device``...) fix the study's base
configuration for every trial; the search space overrides the rest.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from pipelines.config_cli import add_config_arguments, config_from_args
from pipelines.entrypoints.command_line import CommandParser, add_flag, add_run_arguments, integer, number
from pipelines.entrypoints.common import run_main
from pipelines.entrypoints.under_mlflow_run import option_label, started_by_mlflow_run
from pipelines.metrics import OBJECTIVES
from pipelines.studies.settings import (
    DEFAULT_TRIALS,
    FUSE_AUTO,
    MAX_FUSE,
    PRUNERS,
    SAMPLERS,
    TRIAL_ARTIFACTS,
    StudySettings,
    check_model_name,
)
from pipelines.studies.tune import prepare_study, run_study
from pipelines.studies.workers import (
    STOP_AT_TRIALS_FLAG,
    WORKER_INDEX_FLAG,
    WORKER_OF_FLAG,
    coordinate_workers,
    run_as_worker,
)
from pipelines.tracking.liveness import PROCESS_TAG, ProcessId
from pipelines.tracking.redaction import has_password
from pipelines.tracking.runs import entry_point_run
from pipelines.training.preflight import preflight
from search_spaces import resolve_space, space_names

log = logging.getLogger("pipelines.entrypoints.tune")  # not __name__: that is "__main__" under python -m

NO_REGISTRATION = "none"
STORAGE_ENV = "OPTUNA_STORAGE"  # the storage URL when --storage is not given: a password in it stays off the command line
DEFAULTS = StudySettings()  # the only place the study's defaults are written


def names(text: str) -> tuple[str, ...] | None:
    """Comma-separated names; '' is not given."""
    return tuple(part.strip() for part in text.split(",") if part.strip()) or None


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pipelines.entrypoints.tune",
        description="Tune a conditional VAE with Optuna; every trial is a nested MLflow run. "
                    "An empty value means 'not given'.")
    study = parser.add_argument_group("study")
    add_flag(study, "study", default=DEFAULTS.name, help="study name; the same name and storage resume the study "
             "(default %(default)s)")
    add_flag(study, "storage", default=None,
             help=f"Optuna storage URL (default: ${STORAGE_ENV}, else {DEFAULTS.storage}; journal:PATH for a "
                  "journal file; postgresql://... for many workers, its password in PGPASSFILE or ~/.pgpass, "
                  f"or the whole URL in ${STORAGE_ENV}: a password on the command line is visible to others)")
    add_flag(study, "space", default=DEFAULTS.space,
             help=f"search space: {', '.join(space_names())}, or path/to/file.py:function (default %(default)s)")
    add_flag(study, "objectives", type=names, default=DEFAULTS.objectives,
             help=f"comma-separated, all minimised: {', '.join(OBJECTIVES)} (e.g. recon,kl or neg_elbo,params "
                  f"for a multi-objective study; default {','.join(DEFAULTS.objectives)}; nll is neg_elbo's old name)")
    add_flag(study, "sampler", default=DEFAULTS.sampler,
             help=f"{', '.join(SAMPLERS)} (default %(default)s: tpe, or nsga2 for several objectives)")
    add_flag(study, "sampler_seed", type=integer(), default=None,
             help="sampler seed (default: --seed); give parallel workers different ones")
    add_flag(study, "pruner", default=DEFAULTS.pruner,
             help=f"{', '.join(PRUNERS)} (default %(default)s; off in multi-objective studies)")
    add_flag(study, "pruner_startup_trials", type=integer(), default=DEFAULTS.pruner_startup_trials,
             help="median pruner: trials before any pruning (default %(default)s)")
    add_flag(study, "pruner_warmup_epochs", type=integer(), default=DEFAULTS.pruner_warmup_epochs,
             help="median pruner: epochs before a trial may be pruned (default %(default)s)")
    add_flag(study, "n_trials", type=integer(), default=DEFAULTS.n_trials,
             help=f"trials this command runs, its workers together (default {DEFAULT_TRIALS}, or unlimited when "
                  "--timeout is given)")
    add_flag(study, "timeout", type=number(), default=DEFAULTS.timeout,
             help="stop starting trials after this many seconds")
    add_flag(study, "register_as", default=None,
             help=f"registered model name for the best trial's model, alias @best (default: the study name; "
                  f"'{NO_REGISTRATION}' registers nothing)")
    add_flag(study, "workers", type=integer(), default=DEFAULTS.workers,
             help="worker processes this command starts on the study (default %(default)s; each CPU worker gets "
                  "cores / workers threads unless --threads is given; GPUs are shared out among them)")
    add_flag(study, "fuse", type=fuse_value, default=DEFAULTS.fuse,
             help="trials asked from Optuna at a time; those of one structure (architecture, widths, latent size, "
                  "batch size...) train at once as one fused model, each still a full trial "
                  f"(1..{MAX_FUSE}, 1: each alone; default %(default)s: sized from the device's free memory on "
                  "CUDA, 1 on the CPU)")
    add_flag(study, "trial_artifacts", default=DEFAULTS.trial_artifacts,
             help=f"{', '.join(TRIAL_ARTIFACTS)} (default %(default)s): every trial keeps its metrics, model and "
                  "manifest; 'best' gives test metrics, figures, evaluation and the generator to the chosen "
                  "trial(s) only, 'all' to every trial")
    add_flag(study, "heartbeat_grace", type=integer(), default=DEFAULTS.heartbeat_grace_s,
             help="seconds without a heartbeat after which another worker fails a running trial "
                  "(default %(default)s; database storages only)")
    add_run_arguments(study, run_name_help="name of the parent MLflow run (default: the study name)")
    add_flag(study, "list_spaces", action="store_true", help="print the search space names and exit")
    # Set by `--workers N` on the worker processes it starts: the parent run they report to.
    study.add_argument(WORKER_OF_FLAG, dest="worker_of", default="", help=argparse.SUPPRESS)
    study.add_argument(WORKER_INDEX_FLAG, dest="worker_index", type=integer(0), default=0, help=argparse.SUPPRESS)
    study.add_argument(STOP_AT_TRIALS_FLAG, dest="stop_at_trials", type=integer(1), default=None, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    return parser


def fuse_value(text: str) -> int | str | None:
    """``--fuse``: "auto" or an integer (its range is StudySettings' to check, in one line)."""
    return FUSE_AUTO if text.strip().lower() == FUSE_AUTO else integer()(text)


def settings_from_args(args: argparse.Namespace, seed: int) -> StudySettings:
    register_as = (args.register_as or "").strip() or args.study
    if not (args.register_as or "").strip():  # said as what the user gave: the study name
        check_model_name(register_as, "the study name, which names the registered model when --register-as is "
                         "not given", f"; give --register-as NAME, or --register-as {NO_REGISTRATION} to register "
                         "nothing")
    storage = args.storage or os.environ.get(STORAGE_ENV) or DEFAULTS.storage
    return StudySettings(
        name=args.study, storage=storage, space=args.space, objectives=args.objectives, sampler=args.sampler,
        sampler_seed=seed if args.sampler_seed is None else args.sampler_seed, pruner=args.pruner,
        pruner_startup_trials=args.pruner_startup_trials, pruner_warmup_epochs=args.pruner_warmup_epochs,
        n_trials=args.n_trials, timeout=args.timeout,
        register_as="" if register_as == NO_REGISTRATION else register_as,
        heartbeat_grace_s=args.heartbeat_grace, trial_artifacts=args.trial_artifacts, workers=args.workers,
        fuse=args.fuse)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.list_spaces:
        print("\n".join(space_names()))
        return 0
    if args.storage and has_password(args.storage) and not args.worker_of:  # its workers would say it again
        where = ", in `mlflow run`'s \"Running command\" line and in the run's storage param" \
            if started_by_mlflow_run() else ""
        log.warning(f"{option_label('--storage')} holds a password: it is visible in the process list{where}; "
                    f"give it in PGPASSFILE (or ~/.pgpass), or the whole URL in ${STORAGE_ENV}, instead")
    base = config_from_args(args)
    settings = settings_from_args(args, base.execution.seed)
    space = resolve_space(settings.space)
    preflight(base)  # device, data sizes, the base model on the meta device, before any run
    study = prepare_study(settings, base, args.experiment)
    if args.worker_of:
        run_as_worker(study, settings, space, base, args.worker_of, args.worker_index, args.stop_at_trials)
        return 0
    # PROCESS_TAG: a worker whose trial's process is gone can see whether this parent run's is too.
    tags = {"study": settings.name, PROCESS_TAG: ProcessId.current().to_json()}
    with entry_point_run(args.experiment, args.run_name or settings.name, tags=tags) as parent:
        log.info(f"study {settings.name!r}: {len(study.trials)} trials so far; parent run {parent.run_id}")
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
