"""Fused trials, side by side: the same `tune` study with `--fuse K` and with `--fuse 1` (each trial
alone), every trial fully recorded, each study in its own process on the benchmark's store.

- `fused` (CPU): the `optimiser` space (learning rate, β, warm-up, free bits over one structure, so
  every trial fuses) for the default MLP and a small one, trials/hour of `--fuse K` over `--fuse 1`;
  then the `default` space (its trials mostly differ in structure), with the group sizes it reached.
- `cuda fused` (benchmarks.cuda_section): K = 1, 8, 32, 128 on one GPU, and a hundred trials of ten
  epochs on all of Fashion-MNIST with `--fuse auto` against the issue's five minutes.
Trials/hour counts complete trials over the command's wall time (start-up, recording and the chosen
trial's full record included), so it is what a user waits for, not a kernel's speed.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

from benchmarks.entry_points import find_runs, run_study, study_args
from benchmarks.table import Table

SMALL_MLP = ["--hidden", "128,64", "--latent-dim", "8"]
# (name, structure arguments, target of fuse=K / fuse=1 on the CPU)
CPU_MODELS = [("default MLP 512-256 z=16", [], ">= 1.2"), ("small MLP 128-64 z=8", SMALL_MLP, ">= 1.5")]


@dataclass(frozen=True)
class FusedSizes:
    trials: int
    images: int
    epochs: int
    fuse: int
    models: int  # how many of CPU_MODELS
    default_images: int  # the `default` space's comparison; 0: not run
    default_epochs: int


FULL_FUSED = FusedSizes(trials=16, images=10_000, epochs=2, fuse=8, models=2, default_images=2_000, default_epochs=1)
# The quick run (CI) proves the code works at the least cost: one comparison, the small MLP, on the
# study section's 500 images (whose judge classifier the store already holds).
QUICK_FUSED = FusedSizes(trials=2, images=500, epochs=1, fuse=2, models=1, default_images=0, default_epochs=1)


def group_sizes(workdir: Path, study: str) -> list[int]:
    """The sizes of the groups the study's trials trained in (1: alone), largest first, from their tags."""
    from pipelines.studies.fused_trials import FUSED_POPULATION_TAG

    _, runs = find_runs(workdir, f"tags.study = '{study}'")
    members = collections.Counter(int(r.data.tags.get(FUSED_POPULATION_TAG, 1)) for r in runs
                                  if "mlflow.parentRunId" in r.data.tags)
    return sorted((size for size, count in members.items() for _ in range(count // size)), reverse=True)


def trials_per_hour(workdir: Path, args: list[str], study: str, fuse: int | str) -> tuple[float, list[int]]:
    wall, trials, _ = run_study(workdir, [*args, "--fuse", str(fuse)], study, workers=1)
    return len(trials) / wall * 3600, group_sizes(workdir, study)


def compare(table: Table, section: str, workdir: Path, name: str, args: list[str], fuse: int, target: str) -> None:
    alone, _ = trials_per_hour(workdir, args, f"{section} {name} fuse=1", 1)
    fused, sizes = trials_per_hour(workdir, args, f"{section} {name} fuse={fuse}", fuse)
    table.add(section, f"{name}: fuse=1, trials per hour", alone, "trials/h")
    table.add(section, f"{name}: fuse={fuse}, trials per hour (groups {','.join(map(str, sizes))})", fused, "trials/h")
    table.add(section, f"{name}: fuse={fuse} / fuse=1, trials per hour", fused / alone, "ratio", target)


def measure_fused(table: Table, workdir: Path, sizes: FusedSizes, device: str = "cpu") -> None:
    """The CPU comparison: two fixed structures, then the `default` space."""
    for name, structure, target in CPU_MODELS[-sizes.models:]:
        args = [*study_args(workdir, "optimiser", sizes.images, sizes.epochs, sizes.trials, device), *structure]
        compare(table, "fused", workdir, f"{name}, {sizes.trials} trials x {sizes.epochs} epochs x {sizes.images}",
                args, sizes.fuse, target)
    if not sizes.default_images:
        return
    args = study_args(workdir, "default", sizes.default_images, sizes.default_epochs, sizes.trials, device)
    compare(table, "fused", workdir, f"default space, {sizes.trials} trials x {sizes.default_epochs} epoch x "
            f"{sizes.default_images}", args, sizes.fuse, "")


def measure_cuda_fused(table: Table, workdir: Path, device: str, counts: tuple[int, ...], images: int, epochs: int,
                       hundred: bool) -> None:
    """K trials at a time for each K of ``counts`` on one GPU (the optimiser space over the default MLP,
    a study of max(K, 16) trials each; the dry run: one study of two), then the issue's hundred trials."""
    per_hour = {}
    for fuse in counts:
        trials = max(fuse, 16 if hundred else 2)
        args = study_args(workdir, "optimiser", images, epochs, trials, device)
        try:
            per_hour[fuse], sizes = trials_per_hour(workdir, args, f"cuda fuse={fuse}", fuse)
        except Exception as error:  # the other sizes still run
            table.failed("cuda fused", f"fuse={fuse}", error)
            continue
        table.add("cuda fused", f"fuse={fuse}: {trials} trials x {epochs} epochs x {images} images, trials per "
                  f"hour (groups {','.join(map(str, sizes))})", per_hour[fuse], "trials/h")
    if 1 in per_hour and len(per_hour) > 1:
        best = max(per_hour, key=per_hour.get)
        table.add("cuda fused", f"best (fuse={best}) / fuse=1, trials per hour", per_hour[best] / per_hour[1], "ratio",
                  ">= 10")
    if not hundred:
        return
    args = study_args(workdir, "optimiser", 0, 10, 100, device)
    try:
        wall, runs, _ = run_study(workdir, [*args, "--fuse", "auto"], "cuda hundred", workers=1)
    except Exception as error:
        table.failed("cuda fused", "a hundred trials with --fuse auto", error)
        return
    table.add("cuda fused", f"{len(runs)} trials x 10 epochs on all images, --fuse auto (groups "
              f"{','.join(map(str, group_sizes(workdir, 'cuda hundred')))}): wall time", wall, "s", "<= 300")
