"""`evaluate` entry point: the full test-set report of a logged model, in a new MLflow run.

Prints one summary line; metrics are in nats per example (see pipelines.evaluation.evaluate).
"""
from __future__ import annotations

import argparse
import inspect
import math
from dataclasses import replace
from typing import Sequence

from pipelines.config import ExecutionConfig
from pipelines.data import check_available
from pipelines.entrypoints.command_line import CommandParser, add_flag, add_run_arguments, integer
from pipelines.entrypoints.common import run_main
from pipelines.evaluation.evaluate import evaluate_model, iwae_memory_bytes, summary_line
from pipelines.training.execution import resolve_device
from pipelines.training.preflight import check_fits

# The options' defaults are evaluate_model's own.
DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(evaluate_model).parameters.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="python -m pipelines.entrypoints.evaluate",
        description="Evaluate a logged CVAE on the test set (nats per example): negative ELBO, IWAE "
                    "bound, active units, and for conditional models classifier-judged sample quality.")
    parser.add_argument("--model-uri", required=True,
                        help="models:/<model_id>, models:/NAME@alias, models:/NAME/<version>, or a run id")
    parser.add_argument("--k", type=integer(1), default=DEFAULTS["k"],
                        help="importance samples per example for the IWAE bound (default %(default)s)")
    add_flag(parser, "limit_test", type=integer(0), default=DEFAULTS["limit_test"],
             help="test images to use, 0 = all (default: as the model was trained)")
    add_flag(parser, "data_dir", default=DEFAULTS["data_dir"], help="data root (default: as the model was trained)")
    parser.add_argument("--device", default=ExecutionConfig.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument("--seed", type=integer(0), default=DEFAULTS["seed"],
                        help="seed of the importance samples and generated images (default %(default)s)")
    add_flag(parser, "images_per_pass", type=integer(1), default=DEFAULTS["images_per_pass"],
             help="decoded images held in memory at once by the IWAE estimate (default %(default)s)")
    add_flag(parser, "classifier_train_size", type=integer(0), default=DEFAULTS["classifier_train_size"],
             help="training images for the auxiliary classifier, 0 = the whole training split (default %(default)s)")
    add_flag(parser, "classifier_epochs", type=integer(1), default=DEFAULTS["classifier_epochs"],
             help="epochs of the auxiliary classifier (default %(default)s)")
    add_run_arguments(parser, run_name_help="MLflow run name (default: evaluate · <the model's run name>)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(ExecutionConfig(device=args.device))
    from pipelines.models.model_resolution import load_cvae, resolve_model

    resolved = resolve_model(args.model_uri)
    data = resolved.config.data
    check_available(replace(data, data_dir=args.data_dir) if args.data_dir else data)
    model = load_cvae(resolved, device)  # a model whose files are gone stops here, before a run exists
    check_fits("k", args.k, iwae_memory_bytes(args.k, args.images_per_pass, math.prod(model.image_shape)),
               f"{args.k:,} importance samples per image", device, "choose a smaller --k")
    from pipelines.recording.run_description import run_name
    from pipelines.tracking.runs import entry_point_run

    resolve_device(ExecutionConfig(device=args.device), announce=True)  # past every check: say which
    with entry_point_run(args.experiment, args.run_name or f"evaluate · {run_name(resolved.config)}") as logger:
        metrics = evaluate_model(resolved, device, logger, k=args.k, limit_test=args.limit_test,
                                 data_dir=args.data_dir, images_per_pass=args.images_per_pass, seed=args.seed,
                                 classifier_train_size=args.classifier_train_size,
                                 classifier_epochs=args.classifier_epochs, model=model)
    print(summary_line(logger.run_id, resolved.model_uri, metrics))
    return 0


if __name__ == "__main__":
    run_main(main)
