"""Does `torch.compile` of the training and evaluation steps pay for a run? Eager against compiled,
side by side, compile time included: `python -m benchmarks.compile_cost [--device cpu]`.

For each model (the default MLP, and 784-400-20 at batch 128 as in `benchmarks.run`) it trains
the same configuration on the same data through `pipelines.training.train.train`, alternately
eager and compiled (`execution.compile`), and reads each epoch's time (training and validation)
from the run's history. A compiled run's first epoch carries the compilation: the first one with
an empty inductor cache (cold: a new model shape on a new machine), the later ones with the cache
it filled (warm: the same shapes again). Of each kind of epoch the fastest counts, the one least
disturbed by other load on a shared machine. Then for a run of `--run-epochs` epochs (20, the
default `optim.epochs`):

    time = first epoch + (epochs - 1) x steady epoch (an epoch after the first)

and the break-even, the number of epochs from which compiling is faster:
1 + (compiled first epoch - eager first epoch) / (eager steady - compiled steady).
`execution.compile=auto` follows these numbers (pipelines/training/steps.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile

MODELS = {
    "default MLP 512-256-16 b128": {},
    "784-400-20 MLP b128": {"model.hidden": "400", "model.latent_dim": 20, "model.conditioning": "none"},
}


def epoch_times(config, splits) -> list[float]:
    """Seconds of each epoch (training + validation); the first carries any compilation."""
    from pipelines.training.train import train

    result = train(config, splits=splits)
    if config.execution.compile == "true" and not result.compiled:
        raise SystemExit(f"the compiled run fell back to eager ({result.compile_fallback}): nothing to compare")
    return [row["epoch_time_s"] for row in result.history]


def run_seconds(first: float, steady: float, epochs: int) -> float:
    return first + (epochs - 1) * steady


def break_even(eager_first: float, eager_steady: float, compiled_first: float, compiled_steady: float) -> float | None:
    """Epochs from which the compiled run is faster; None when its steady epoch is not faster."""
    saved = eager_steady - compiled_steady
    return 1 + (compiled_first - eager_first) / saved if saved > 0 else None


def measure(name: str, overrides: dict, args) -> list[list[str]]:
    from pipelines.config import RunConfig, with_overrides
    from pipelines.data import load_splits
    from pipelines.training.devices import resolve_device

    base = with_overrides(RunConfig(), {"data.dataset": args.dataset, "data.limit_train": args.limit_train,
                                        "execution.device": args.device, "optim.epochs": args.epochs,
                                        "optim.patience": 0, **overrides})
    splits = load_splits(base.data, resolve_device(base.execution))
    eager_config = with_overrides(base, {"execution.compile": "false"})
    compiled_config = with_overrides(base, {"execution.compile": "true"})
    epoch_times(with_overrides(eager_config, {"optim.epochs": 1}), splits)  # allocator and library warm-up
    # Interleaved, eager then compiled, so that a change in the machine's load falls on both. The
    # first compiled run compiles with an empty cache (cold), the later ones with its cache (warm).
    eager, compiled = [], []
    for _ in range(args.repeats):
        eager.append(epoch_times(eager_config, splits))
        compiled.append(epoch_times(compiled_config, splits))
    # The fastest of each kind of epoch: the one least disturbed by other load on a shared machine.
    eager_first, eager_steady = min(run[0] for run in eager), min(t for run in eager for t in run[1:])
    steady = min(t for run in compiled for t in run[1:])
    rows = []
    for label, first in (("cold", compiled[0][0]), ("warm", min(run[0] for run in compiled[1:]))):
        eager_run = run_seconds(eager_first, eager_steady, args.run_epochs)
        compiled_run = run_seconds(first, steady, args.run_epochs)
        even = break_even(eager_first, eager_steady, first, steady)
        rows.append([name, f"compiled, {label} cache", f"{first - steady:.1f}", f"{eager_steady:.2f}",
                     f"{steady:.2f}", f"{eager_run:.1f}", f"{compiled_run:.1f}", f"{compiled_run / eager_run:.2f}",
                     "never" if even is None else f"{even:.1f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit-train", type=int, default=0, help="training images; 0: all 55,000")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measured run (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind, interleaved (>= 2: cold, then warm)")
    parser.add_argument("--run-epochs", type=int, default=20, help="the run length the verdict is for")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.repeats < 2:
        parser.error("--epochs and --repeats must be >= 2: a steady epoch is one after the first, a warm run one "
                     "after the first")
    # An empty inductor cache of our own: the first compiled run pays a cold compile, as on a new machine.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cache-")

    import torch

    from pipelines.entrypoints.logs import configure_logging

    configure_logging(logging.WARNING)  # the harness's warnings; what is measured is printed
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"{args.epochs} epochs per run, verdict for {args.run_epochs}-epoch runs")
    header = ["model", "mode", "compile s", "eager epoch s", "compiled epoch s", f"eager {args.run_epochs} ep s",
              f"compiled {args.run_epochs} ep s", "compiled / eager", "break-even epochs"]
    rows = [row for name in args.models.split(",") for row in measure(name, MODELS[name], args)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
