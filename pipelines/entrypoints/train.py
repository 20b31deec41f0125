"""`train` entry point: one MLflow-tracked training run from a configuration."""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from pipelines.config import to_dict, with_overrides
from pipelines.config_cli import add_config_arguments, config_from_args
from pipelines.entrypoints.command_line import CommandParser, add_run_arguments
from pipelines.entrypoints.common import run_main
from pipelines.errors import UserError
from pipelines.presets import preset_names
from pipelines.recording.run_description import run_name
from pipelines.tracking.runs import entry_point_run
from pipelines.tracking.system_metrics import run_system_metrics
from pipelines.training.preflight import preflight


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pipelines.entrypoints.train",
        description="Train a conditional VAE and record it in MLflow. Losses are nats per example.")
    add_config_arguments(parser)
    add_run_arguments(parser)
    parser.add_argument("--resume", default=None, metavar="RUN_ID",
                        help="continue a killed or failed run from its last checkpoint, with its own configuration "
                             "(only --data-dir may be given beside it); under `mlflow run`, in the run it created")
    parser.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return parser


def resumed_config(args: argparse.Namespace):
    """The configuration and checkpoint of the run ``--resume`` names (``training.resume``), refused in
    one line when other configuration, an experiment or a run name is given beside it."""
    from mlflow import MlflowClient

    from pipelines.training.resume import resumable_run

    given = [name for name, value in vars(args).items()
             if name.startswith("cfg__") and name != "cfg__data_dir" and value != ""]
    if given or args.cfg_set or getattr(args, "preset", None) or args.experiment or args.run_name:
        raise UserError(f"resume={args.resume!r} continues the run with its own configuration, experiment and "
                        "name; only --data-dir may be given beside it")
    config, resume = resumable_run(MlflowClient(), args.resume)
    if getattr(args, "cfg__data_dir", ""):
        config = with_overrides(config, {"data.data_dir": args.cfg__data_dir})
    return config, resume


def taken_over(resume) -> dict[str, str] | None:
    """Under `mlflow run`, which made a run of its own: the tag naming the run it continues, and that run
    ended (KILLED, saying where it goes on) if it was left RUNNING by its dead process."""
    import os

    from mlflow import MlflowClient

    from pipelines.training.resume import RESUMES_TAG

    new_run = os.environ.get("MLFLOW_RUN_ID")
    if not new_run:
        return None
    client = MlflowClient()
    if client.get_run(resume.run_id).info.status == "RUNNING":
        client.set_tag(resume.run_id, "error", f"its process died; resumed in run {new_run}")
        client.set_terminated(resume.run_id, "KILLED")
    return {RESUMES_TAG: resume.run_id}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    resume = None
    if args.resume is not None:
        config, resume = resumed_config(args)
    else:
        config = config_from_args(args)  # validates: bad values fail here, before any run exists
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    preflight(config)  # device, data sizes, the model on the meta device: all before a run exists
    # Heavy imports only once the input is known to be good.
    from pipelines.recording.record import FULL, record_run
    from pipelines.training.train import train

    if resume is None:
        opened = entry_point_run(args.experiment, args.run_name or run_name(config))
    else:  # the same run; under `mlflow run`, the one it made, which takes the checkpoint over
        opened = entry_point_run(reopen=resume.run_id, tags=taken_over(resume))
    with opened as logger, run_system_metrics(logger, config.execution):
        result = train(config, logger, resume=resume)
        recorded = record_run(logger, result, config, FULL)
    if resume is not None and resume.run_id != logger.run_id:
        from pipelines.tracking.checkpoints import discard_local
        discard_local(resume.run_id)  # taken over and finished in another run: not to be resumed again
    print(f"run {logger.run_id}: best epoch {result.best_epoch}, weights of epoch {result.kept_epoch}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in recorded.metrics.items() if "/kl_dim_" not in k)
          + f"; model {recorded.model_uri}")
    return 0


if __name__ == "__main__":
    run_main(main)
