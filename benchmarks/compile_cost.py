"""Does `torch.compile` of the training and evaluation steps pay for a run? Eager against compiled,
side by side, compile time included: `python -m benchmarks.compile_cost [--device cpu]`.

For each model (the default MLP, and 784-400-20 at batch 128 as in `benchmarks.run`) it trains
the same configuration on the same data through `pipelines.training.train.train`, alternately
eager and compiled (`execution.compile`), and reads each epoch's time (training and validation)
from the run's history. A compiled run's first epoch carries the compilation: once with an
empty inductor cache (cold: a new model shape on a new machine) and once more with the cache
that run filled (warm: the same shapes again). Then for a run of `--run-epochs` epochs (20, the
default `optim.epochs`):

    time = first epoch + (epochs - 1) x steady epoch (the median of the later epochs)

and the break-even, the number of epochs from which compiling is faster:
1 + (compiled first epoch - eager first epoch) / (eager steady - compiled steady).
`execution.compile=auto` follows these numbers (pipelines/training/steps.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
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


def run_seconds(times: list[float], epochs: int) -> float:
    return times[0] + (epochs - 1) * statistics.median(times[1:])


def break_even(eager: list[float], compiled: list[float]) -> float | None:
    """Epochs from which the compiled run is faster; None when its steady epoch is not faster."""
    saved = statistics.median(eager[1:]) - statistics.median(compiled[1:])
    return 1 + (compiled[0] - eager[0]) / saved if saved > 0 else None


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
    # Interleaved: eager, compiled (cold cache), eager, compiled (warm cache), so that a change in the
    # machine's load falls on both.
    eager = epoch_times(eager_config, splits)
    cold = epoch_times(compiled_config, splits)
    eager += epoch_times(eager_config, splits)[1:]
    warm = epoch_times(compiled_config, splits)
    eager_steady, steady = statistics.median(eager[1:]), statistics.median(cold[1:] + warm[1:])
    rows = []
    for label, compiled in (("cold", cold), ("warm", warm)):
        times = [compiled[0], steady]
        eager_run, compiled_run = run_seconds(eager, args.run_epochs), run_seconds(times, args.run_epochs)
        even = break_even(eager, times)
        rows.append([name, f"compiled, {label} cache", f"{compiled[0] - steady:.1f}", f"{eager_steady:.2f}",
                     f"{steady:.2f}", f"{eager_run:.1f}", f"{compiled_run:.1f}", f"{compiled_run / eager_run:.2f}",
                     "never" if even is None else f"{even:.1f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--limit-train", type=int, default=0, help="training images; 0: all 55,000")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measured run (>= 2)")
    parser.add_argument("--run-epochs", type=int, default=20, help="the run length the verdict is for")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: a steady epoch is one after the first")
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
