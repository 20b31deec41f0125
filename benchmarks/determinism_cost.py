"""What deterministic mode costs: epoch time with `deterministic=true` vs `false`, side by side.

Runs the same configuration (the default model unless overridden) alternately in both modes, in
one process on one device, and prints the median training time of an epoch in each and their
ratio. On a GPU this is the figure to quote for the speed cost of deterministic mode:

    python -m benchmarks.determinism_cost --device cuda --dataset fashion-mnist
"""
from __future__ import annotations

import argparse
import logging
import statistics

from pipelines.config import RunConfig, with_overrides
from pipelines.data import load_splits
from pipelines.entrypoints.logs import configure_logging
from pipelines.training.devices import resolve_device
from pipelines.training.train import train


def epoch_seconds(config: RunConfig, splits) -> list[float]:
    """Training seconds of each epoch (validation and logging excluded)."""
    result = train(config, splits=splits)
    return [len(splits.train) / row["examples_per_s"] for row in result.history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit-train", type=int, default=0, help="0: the whole training split")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per mode, interleaved")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other configuration override, e.g. --set model.arch=conv")
    args = parser.parse_args()
    configure_logging(logging.WARNING)  # the harness's warnings; what is measured is printed

    overrides = {"data.dataset": args.dataset, "execution.device": args.device,
                 "data.limit_train": args.limit_train, "optim.epochs": args.epochs, "optim.patience": 0,
                 **dict(item.split("=", 1) for item in args.set)}
    base = with_overrides(RunConfig(), overrides)
    device = resolve_device(base.execution)
    splits = load_splits(base.data, device)
    times: dict[str, list[float]] = {"true": [], "false": []}
    # One untimed epoch first, so that allocator and library warm-up count against neither mode.
    epoch_seconds(with_overrides(base, {"optim.epochs": 1}), splits)
    for _ in range(args.repeats):
        for mode in times:
            times[mode] += epoch_seconds(with_overrides(base, {"execution.deterministic": mode}), splits)

    widths = base.model.hidden if base.model.arch == "mlp" else base.model.channels
    print(f"device {device}, model {base.model.arch} {widths}, {len(splits.train)} training images, "
          f"batch {base.optim.batch_size}, {len(times['true'])} epochs per mode")
    # The minimum is the least disturbed by other load on the machine; the median shows the spread.
    for name, summary in (("median", statistics.median), ("fastest", min)):
        deterministic, free = summary(times["true"]), summary(times["false"])
        print(f"{name} epoch: deterministic {deterministic:.3f} s, non-deterministic {free:.3f} s, "
              f"ratio {deterministic / free:.3f}")


if __name__ == "__main__":
    main()
