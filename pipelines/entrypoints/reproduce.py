"""`reproduce` entry point: re-run a logged run from its manifest and check that it agrees.

Exit 0 when the re-run agrees with the record within tolerance, 1 when it differs (the new run
still ends FINISHED; its `reproduction_verdict` tag says which), 2 for bad input.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from pipelines.entrypoints.command_line import CommandParser, add_flag, add_run_arguments, number
from pipelines.entrypoints.common import run_main

EXIT_DIFFERS = 1


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pipelines.entrypoints.reproduce",
        description="Re-run a logged training run (or study trial) from its manifest.json, in a new "
                    "MLflow run tagged reproduces=<id>, and compare metrics and weights with the original.")
    parser.add_argument("--run-id", required=True, help="id of the MLflow run to reproduce")
    parser.add_argument("--tolerance", type=number(0), default=None,
                        help="relative tolerance on metrics and absolute tolerance on weights; empty: "
                             "0 (bitwise) for deterministic CPU runs, 1e-3 for deterministic GPU runs, "
                             "1e-2 for non-deterministic ones")
    add_flag(parser, "data_dir", default="",
                        help="where the dataset lies on this machine, if not where the original read it "
                             "(its checksums are still compared)")
    add_run_arguments(parser, experiment_help="MLflow experiment of the re-run (default: "
                      "$MLFLOW_EXPERIMENT_NAME, else the original's)", run_name_help="MLflow run name of the re-run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.reproduce import AGREES, reproduce_run  # heavy imports once the input parses

    report = reproduce_run(args.run_id, args.tolerance, args.experiment, args.run_name, args.data_dir or None)
    weights = report["weights"]
    print(f"reproduction of run {report['original_run_id']} by run {report['rerun_run_id']}: "
          f"{report['verdict'].upper()}")
    print(f"  max |weight difference| {weights['max_abs_diff']}, weights identical: {weights['identical']}; "
          f"tolerance {report['tolerance']['metrics_rel']:g} ({report['tolerance']['reason']})")
    for difference in report["differences"]:
        print(f"  differs: {difference}")
    for warning in report["warnings"]:
        print(f"  warning: {warning}")
    return 0 if report["verdict"] == AGREES else EXIT_DIFFERS


if __name__ == "__main__":
    run_main(main)
