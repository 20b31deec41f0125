"""`evaluate` entry point: the full test-set report of a logged model, in a new MLflow run.

Prints one summary line; metrics are in nats per example (see pipelines.evaluation.evaluate).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Sequence

from pipelines.config import ExecutionConfig
from pipelines.data import check_available
from pipelines.entrypoints.command_line import CommandParser, add_run_arguments, number_option
from pipelines.entrypoints.common import run_main
from pipelines.training.execution import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pipelines.entrypoints.evaluate",
        description="Evaluate a logged CVAE on the test set (nats per example): negative ELBO, IWAE "
                    "NLL, active units, and for conditional models classifier-judged sample quality.")
    parser.add_argument("--model-uri", required=True,
                        help="models:/<model_id>, models:/NAME@alias, models:/NAME/<version>, or a run id")
    parser.add_argument("--k", default="1000",
                        help="importance samples per example for the IWAE bound (default 1000)")
    parser.add_argument("--limit-test", "--limit_test", default="",
                        help="test images to use, 0 = all (default: as the model was trained)")
    parser.add_argument("--data-dir", "--data_dir", default="", help="data root (default: as the model was trained)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", default="0", help="seed of the importance samples and generated images")
    parser.add_argument("--images-per-pass", "--images_per_pass", default="10000",
                        help="decoded images held in memory at once by the IWAE estimate")
    parser.add_argument("--classifier-train-size", "--classifier_train_size", default="0",
                        help="training images for the auxiliary classifier, 0 = the whole training split")
    parser.add_argument("--classifier-epochs", "--classifier_epochs", default="2", help="epochs of the auxiliary classifier")
    add_run_arguments(parser, run_name_help="MLflow run name (default: evaluate · <the model's run name>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(k=number_option("k", args.k, int, 1000, minimum=1),
                   limit_test=number_option("limit_test", args.limit_test, int, None, minimum=0),
                   seed=number_option("seed", args.seed, int, 0, minimum=0),
                   images_per_pass=number_option("images_per_pass", args.images_per_pass, int, 10_000, minimum=1),
                   classifier_train_size=number_option("classifier_train_size", args.classifier_train_size, int, 0, minimum=0),
                   classifier_epochs=number_option("classifier_epochs", args.classifier_epochs, int, 2, minimum=1))
    device = resolve_device(ExecutionConfig(device=args.device))
    from pipelines.models.model_resolution import resolve_model  # heavy imports once the input is known to be good

    resolved = resolve_model(args.model_uri)
    data = resolved.config.data
    check_available(replace(data, data_dir=args.data_dir) if args.data_dir else data)
    from pipelines.evaluation.evaluate import evaluate_model, summary_line
    from pipelines.recording.run_description import run_name
    from pipelines.tracking.runs import entry_point_run

    with entry_point_run(args.experiment, args.run_name or f"evaluate · {run_name(resolved.config)}") as logger:
        metrics = evaluate_model(resolved, device, logger, data_dir=args.data_dir, **options)
    print(summary_line(logger.run_id, resolved.model_uri, metrics), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
