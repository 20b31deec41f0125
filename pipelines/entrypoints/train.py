"""`train` entry point: one MLflow-tracked training run from a configuration."""
from __future__ import annotations

import argparse
import json
from typing import Sequence

from pipelines.config import to_dict
from pipelines.config_cli import add_config_arguments, config_from_args
from pipelines.entrypoints.command_line import CommandParser, add_run_arguments
from pipelines.entrypoints.common import run_main
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
    parser.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_presets:
        print("\n".join(preset_names()))
        return 0
    config = config_from_args(args)  # validates: bad values fail here, before any run exists
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return 0
    preflight(config)  # device, data sizes, the model on the meta device: all before a run exists
    # Heavy imports only once the input is known to be good.
    from pipelines.recording.record import FULL, record_run
    from pipelines.training.train import train

    with (entry_point_run(args.experiment, args.run_name or run_name(config)) as logger,
          run_system_metrics(logger, config.execution)):
        result = train(config, logger)
        recorded = record_run(logger, result, config, FULL)
    print(f"run {logger.run_id}: best epoch {result.best_epoch}, weights of epoch {result.kept_epoch}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in recorded.metrics.items() if "/kl_dim_" not in k)
          + f"; model {recorded.model_uri}")
    return 0


if __name__ == "__main__":
    run_main(main)
