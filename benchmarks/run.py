"""Where the time goes, measured side by side in one run: `python -m benchmarks.run [--quick]`.

Prints one table of measurements and ratios, each with the target it is held to:

- loop: our training loop against a conventional one written here the way most PyTorch VAE
  examples do it (torchvision dataset + ToTensor, shuffled DataLoader, a host-to-device copy and
  a `loss.item()` per batch), same model, data, batch size and epochs, in training examples/s
  (benchmarks.loops);
- own data: our loop on a synthetic 3x32x32 colour set against Fashion-MNIST, in examples/s and
  pixels/s (benchmarks.loops);
- flops: the FLOP/s our loop achieves (FLOPs counted by torch's FlopCounterMode on one step)
  against a large float32 matrix product timed in the same run;
- recording: a `train` entry-point run (start-up, training, full recording) against the time its
  epochs took;
- study: a `tune` study, share of its wall time inside epochs, and trials/hour with one worker
  against `--workers 2`;
- fused: trials/hour of `tune --fuse K` against `--fuse 1` on the same studies, for two fixed
  structures and the `default` space (benchmarks.fused_section);
- cuda: on `--device` (default cuda; "not measured" without one): the loops, fp32 against bf16
  autocast, torch.compile and CUDA graphs, a 60,000-example epoch, 1/2/4 workers sharing one
  GPU, and fused trials (K = 1, 8, 32, 128, and a hundred trials with `--fuse auto`)
  (benchmarks.cuda_section; benchmarks/gpu/run.sh runs it on the GPU machine).

`--quick` shrinks every size so CI can run it in about a minute; its numbers only show that
the benchmark works. Without `--quick` the sizes are those of the targets in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.cuda_section import FULL_CUDA, QUICK_CUDA, measure_cuda
from benchmarks.entry_points import (
    CommandFailed,
    data_args,
    epoch_seconds,
    find_runs,
    run_command,
    run_study,
    study_args,
    warm_up_store,
)
from benchmarks.fused_section import FULL_FUSED, QUICK_FUSED, measure_fused
from benchmarks.loops import IDX_FILES, measure_loops, measure_own_data, torchvision_root
from benchmarks.table import Table

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
CPU_LOOP_SETUPS = [("mlp", 128), ("conv", 128), ("conv", 512)]


@dataclass(frozen=True)
class Sizes:
    loop_setups: int  # how many of CPU_LOOP_SETUPS
    loop_images: int
    loop_epochs: int
    recording_images: int  # 0: all
    recording_epochs: int
    study_space: str
    study_images: int
    study_epochs: int
    study_trials: int
    own_data_images: int


FULL_SIZES = Sizes(loop_setups=len(CPU_LOOP_SETUPS),
                   loop_images=20_000, loop_epochs=2, recording_images=0, recording_epochs=5, study_space="default",
                   study_images=10_000, study_epochs=2, study_trials=6,
                   own_data_images=50_000)
# The quick run (CI) times one loop setup: the conv ones go through the same code, at 10x the cost.
QUICK_SIZES = Sizes(loop_setups=1, loop_images=1_000, loop_epochs=1, recording_images=500, recording_epochs=1,
                    study_space="smoke", study_images=500, study_epochs=1, study_trials=2,
                    own_data_images=500)


def measure_recording(table: Table, workdir: Path, sizes: Sizes) -> None:
    wall = run_command(workdir, "pipelines.entrypoints.train", *data_args(sizes.recording_images),
                       "--epochs", str(sizes.recording_epochs), "--patience", "0", "--run-name", "recording")
    client, runs = find_runs(workdir, "tags.`mlflow.runName` = 'recording'")
    epochs = epoch_seconds(client, runs[0])
    table.add("recording", f"train run wall time ({sizes.recording_epochs} epochs)", wall, "s")
    table.add("recording", "of which epochs (train + validation)", epochs, "s")
    table.add("recording", "share outside epochs (start-up, recording)", 1 - epochs / wall, "fraction",
              "<= 0.15 (5 epochs, all data)")


def measure_study(table: Table, workdir: Path, sizes: Sizes) -> None:
    args = study_args(workdir, sizes.study_space, sizes.study_images, sizes.study_epochs, sizes.study_trials)
    per_hour = {}
    for workers in (1, 2):
        wall, trials, epochs = run_study(workdir, args, f"bench-{workers}", workers)
        per_hour[workers] = len(trials) / wall * 3600
        if workers == 1:
            table.add("study", f"{sizes.study_trials} trials, 1 worker: wall time", wall, "s")
            table.add("study", "1 worker: share of wall time inside epochs", epochs / wall, "fraction", ">= 0.85")
        table.add("study", f"{workers} worker(s): trials per hour", per_hour[workers], "trials/h")
    table.add("study", "2 workers / 1 worker, trials per hour", per_hour[2] / per_hour[1], "ratio", ">= 1.6")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI: proves the benchmark runs")
    parser.add_argument("--sections", default="loop,recording,study,fused,cuda",
                        help="comma-separated: loop (includes flops), recording, study, fused, cuda")
    parser.add_argument("--device", default="cuda",
                        help="the cuda section's device (default %(default)s; cpu: the same code on the CPU, "
                             "as benchmarks/gpu/run.sh --dry-run does in CI)")
    parser.add_argument("--data-dir", default=os.environ.get("CVAE_FASHION_MNIST_DIR") or str(DEBIAN_FASHION),
                        help="a folder holding Fashion-MNIST's four .gz files (default: $CVAE_FASHION_MNIST_DIR, "
                             "else Debian's %(default)s)")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file, as they are measured")
    parser.add_argument("--markdown", default="", help="also write the table to this file, as it grows")
    args = parser.parse_args(argv)
    from pipelines.entrypoints.logs import configure_logging

    configure_logging(logging.WARNING)  # the harness's warnings; what is measured is printed
    data_dir = Path(args.data_dir).resolve()
    if not (data_dir / f"{IDX_FILES[0]}.gz").is_file():
        sys.exit(f"error: the benchmark reads Fashion-MNIST's .gz files from {data_dir}, which has none "
                 "(apt-get install dataset-fashion-mnist, or --data-dir)")
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    os.environ.setdefault("CVAE_OFFLINE", "1")
    os.environ["CVAE_DATA_DIR"] = str(data_dir)  # the harness reads the files where they lie
    table = Table(args.json or None, args.markdown or None)
    print(f"benchmark ({'quick' if args.quick else 'full'} sizes) on {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix="cvae-benchmark-") as tmp:
            workdir = Path(tmp)
            root = torchvision_root(workdir / "torchvision", data_dir) if sections & {"loop", "cuda"} else None
            if "loop" in sections:
                measure_loops(table, CPU_LOOP_SETUPS[:sizes.loop_setups], sizes.loop_images, sizes.loop_epochs, root, "cpu")
                measure_own_data(table, workdir, sizes.own_data_images, 1, "cpu")
            if sections & {"recording", "study", "fused"} and not args.quick:  # quick: numbers mean nothing
                measured_sizes = {"recording": sizes.recording_images, "study": sizes.study_images,
                                  "fused": (QUICK_FUSED if args.quick else FULL_FUSED).images}
                warm_up_store(table, workdir, {measured_sizes[s] for s in sections & set(measured_sizes)})
            if "recording" in sections:
                measure_recording(table, workdir, sizes)
            if "study" in sections:
                measure_study(table, workdir, sizes)
            if "fused" in sections:
                measure_fused(table, workdir, QUICK_FUSED if args.quick else FULL_FUSED)
            if "cuda" in sections:
                measure_cuda(table, QUICK_CUDA if args.quick else FULL_CUDA, workdir, root, args.device)
    except CommandFailed as error:
        sys.exit(f"error: {error}")
    print("\n" + table.render())
    if table.failures:
        print(f"\n{len(table.failures)} measurement(s) failed: their rows say why", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
