"""`evaluate` entry point: the full test-set report of a logged model, in a new MLflow run.

Prints one summary line; metrics are in nats per example (see pipelines.evaluate).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Sequence

from pipelines.config import ExecutionConfig
from pipelines.data import check_available
from pipelines.entrypoints.common import UserError, run_main
from pipelines.execution import resolve_device


def integer_option(name: str, text: str, minimum: int, default: int | None) -> int | None:
    """An integer option given as text; '' (what MLproject passes when unset) means ``default``."""
    if text is None or str(text).strip() == "":
        return default
    try:
        value = float(text)  # MLflow passes float-typed parameters as "8.0"
    except ValueError:
        value = float("nan")
    if not value.is_integer() or value < minimum:
        raise UserError(f"{name}={text!r} is not valid; expected an integer >= {minimum}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.entrypoints.evaluate",
        description="Evaluate a logged CVAE on the test set (nats per example): negative ELBO, IWAE "
                    "NLL, active units, and for conditional models classifier-judged sample quality.")
    parser.add_argument("--model-uri", required=True,
                        help="models:/<model_id>, models:/NAME@alias, models:/NAME/<version>, or a run id")
    parser.add_argument("--k", default="1000",
                        help="importance samples per example for the IWAE bound (default 1000)")
    parser.add_argument("--limit-test", default="",
                        help="test images to use, 0 = all (default: as the model was trained)")
    parser.add_argument("--data-dir", default="", help="data root (default: as the model was trained)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", default="0", help="seed of the importance samples and generated images")
    parser.add_argument("--images-per-pass", default="10000",
                        help="decoded images held in memory at once by the IWAE estimate")
    parser.add_argument("--classifier-train-size", default="0",
                        help="training images for the auxiliary classifier, 0 = the whole training split")
    parser.add_argument("--classifier-epochs", default="2", help="epochs of the auxiliary classifier")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment name (default: $MLFLOW_EXPERIMENT_NAME, else Default)")
    parser.add_argument("--run-name", default="evaluate", help="MLflow run name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = dict(k=integer_option("k", args.k, 1, 1000),
                   limit_test=integer_option("limit_test", args.limit_test, 0, None),
                   seed=integer_option("seed", args.seed, 0, 0),
                   images_per_pass=integer_option("images_per_pass", args.images_per_pass, 1, 10_000),
                   classifier_train_size=integer_option("classifier_train_size", args.classifier_train_size, 0, 0),
                   classifier_epochs=integer_option("classifier_epochs", args.classifier_epochs, 1, 2))
    device = resolve_device(ExecutionConfig(device=args.device))
    from pipelines.model_resolution import resolve_model  # heavy imports once the input is known to be good

    resolved = resolve_model(args.model_uri)
    data = resolved.config.data
    check_available(replace(data, data_dir=args.data_dir) if args.data_dir else data)
    from pipelines.evaluate import evaluate_model, summary_line
    from pipelines.tracking import entry_point_run

    with entry_point_run(args.experiment, args.run_name) as logger:
        metrics = evaluate_model(resolved, device, logger, data_dir=args.data_dir, **options)
    print(summary_line(logger.run_id, resolved.model_uri, metrics), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
