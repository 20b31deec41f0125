"""Fused trials, side by side in one invocation: `python -m benchmarks.fused_trials [--quick] [--device cpu]`.

For each model, the same study (16 trials over learning rate, β and KL warm-up, 2 epochs on 10,000
Fashion-MNIST images, no pruning, same sampler seed) runs through the `tune` entry point with
`--fuse 1` (every trial alone) and `--fuse 8` (trials asked eight at a time and trained as one fused
model), each in its own process and store, with every trial fully recorded (child run, per-epoch
metrics, model, manifest; the chosen trial's full record). Printed: wall time and trials/hour of each,
and their ratio against the issue's target. Then the `default` space with `--fuse 8`: the group sizes
it reaches (its trials mostly differ in structure), and its trials/hour against `--fuse 1`.

`--quick` shrinks every size so that it runs in a minute or two; its numbers only show that it works.
`--trials`, `--images` and `--epochs` set the two MLP studies' sizes (the `default` space's studies use
at most 2,000 images and 1 epoch).
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT = "benchmark-fused"
MODELS = {
    "default MLP 512-256 z=16": ([], ">= 1.2"),
    "small MLP 128-64 z=8": (["--hidden", "128,64", "--latent-dim", "8"], ">= 1.5"),
}


def lr_beta_warmup(trial, base) -> dict[str, Any]:
    """The benchmark's space: learning rate, β and warm-up over the study's fixed structure."""
    return {"optim.lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
            "objective.kl_weight": trial.suggest_float("kl_weight", 0.1, 4.0, log=True),
            "objective.warmup_epochs": trial.suggest_float("warmup_epochs", 0.0, 1.0)}


def _env(workdir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": EXPERIMENT, "CVAE_OFFLINE": "1", "CVAE_DATA_DIR": str(workdir / "data")}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def tune_seconds(workdir: Path, *args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipelines.entrypoints.tune", *args, "--quiet",
                           "--storage", f"sqlite:///{workdir / 'optuna.db'}"],
                          cwd=workdir, env=_env(workdir), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"tune failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def group_sizes(workdir: Path, study: str) -> list[int]:
    """The sizes of the groups a study's trials trained in (1: alone), largest first, from their tags."""
    from mlflow import MlflowClient

    from pipelines.studies.fused_trials import FUSED_POPULATION_TAG

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.study = '{study}'", max_results=1000)
    members = collections.Counter(int(r.data.tags.get(FUSED_POPULATION_TAG, 1)) for r in runs
                                  if "mlflow.parentRunId" in r.data.tags)
    return sorted((size for size, count in members.items() for _ in range(count // size)), reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: shows that it works, measures nothing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--fuse", type=int, default=8)
    parser.add_argument("--trials", type=int, help="trials per study (default 16; 4 with --quick)")
    parser.add_argument("--images", type=int, help="training images (default 10,000; 1,000 with --quick)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default 2; 1 with --quick)")
    args = parser.parse_args(argv)
    trials, images, epochs = (4, 1000, 1) if args.quick else (16, 10_000, 2)
    trials, images, epochs = args.trials or trials, args.images or images, args.epochs or epochs
    default_images, default_epochs = (1000, 1) if args.quick else (min(images, 2000), 1)
    fuse = min(args.fuse, trials)

    import torch

    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads; "
          f"{trials} trials x {epochs} epochs x {images} images per study, fuse={fuse} against fuse=1")
    header = ["study", "fuse=1 s", f"fuse={fuse} s", "fuse=1 trials/h", f"fuse={fuse} trials/h",
              f"fuse={fuse} / fuse=1", "target", "group sizes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cvae-fused-benchmark-") as tmp:
        workdir = Path(tmp)
        data = ["--dataset", "fashion-mnist", "--device", args.device, "--sampler-seed", "0", "--pruner", "none"]
        space = f"{Path(__file__).resolve()}:lr_beta_warmup"
        # A fresh store creates MLflow's and Optuna's tables on first use: paid here, not by either side.
        tune_seconds(workdir, *data, "--space", space, "--study", "warm-up", "--n-trials", "1", "--epochs", "1",
                     "--limit-train", "500", "--register-as", "none")
        for name, (model, target) in MODELS.items():
            common = [*data, *model, "--space", space, "--limit-train", str(images), "--epochs", str(epochs),
                      "--n-trials", str(trials), "--register-as", "none"]
            alone = tune_seconds(workdir, *common, "--study", f"{name} fuse=1", "--fuse", "1")
            fused = tune_seconds(workdir, *common, "--study", f"{name} fuse={fuse}", "--fuse", str(fuse))
            sizes = group_sizes(workdir, f"{name} fuse={fuse}")
            rows.append([name, f"{alone:.0f}", f"{fused:.0f}", f"{trials / alone * 3600:.0f}",
                         f"{trials / fused * 3600:.0f}", f"{alone / fused:.2f}", target,
                         ",".join(map(str, sizes))])
            print("| " + " | ".join(rows[-1]) + " |", flush=True)
        common = [*data, "--space", "default", "--limit-train", str(default_images), "--epochs", str(default_epochs),
                  "--n-trials", str(trials), "--register-as", "none"]
        alone = tune_seconds(workdir, *common, "--study", "default fuse=1", "--fuse", "1")
        fused = tune_seconds(workdir, *common, "--study", f"default fuse={fuse}", "--fuse", str(fuse))
        sizes = group_sizes(workdir, f"default fuse={fuse}")
        rows.append([f"default space ({default_epochs} epoch x {default_images} images)", f"{alone:.0f}",
                     f"{fused:.0f}", f"{trials / alone * 3600:.0f}", f"{trials / fused * 3600:.0f}",
                     f"{alone / fused:.2f}", "", ",".join(map(str, sizes))])
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
