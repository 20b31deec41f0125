"""Where the time goes, measured side by side in one run: `python -m benchmarks.run [--quick]`.

Prints one table of measurements and ratios, each with the target it is held to:

- loop: our training loop against a conventional one written here the way most PyTorch VAE
  examples do it (torchvision dataset + ToTensor, shuffled DataLoader, a host-to-device copy and
  a `loss.item()` per batch), same model, data, batch size and epochs, in training examples/s;
- flops: the FLOP/s our loop achieves (FLOPs counted by torch's FlopCounterMode on one step)
  against a large float32 matrix product timed in the same run;
- recording: a `train` entry-point run (start-up, training, full recording) against the time its
  epochs took;
- study: a `tune` study, share of its wall time inside epochs, and trials/hour with one worker
  against `--workers 2`;
- cuda: fp32 against bf16 autocast, and 1/2/4 workers sharing one GPU (only where CUDA is present).

`--quick` shrinks every size so CI can run it in about a minute; its numbers only show that
the benchmark works. Without `--quick` the sizes are those of the targets in benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
COLUMNS = ("section", "measure", "value", "unit", "target")


@dataclass(frozen=True)
class Sizes:
    loop_images: int
    loop_epochs: int
    recording_images: int  # 0: all
    recording_epochs: int
    study_space: str
    study_images: int
    study_epochs: int
    study_trials: int


FULL_SIZES = Sizes(loop_images=20_000, loop_epochs=2, recording_images=0, recording_epochs=5, study_space="default",
                   study_images=10_000, study_epochs=2, study_trials=6)
QUICK_SIZES = Sizes(loop_images=2_000, loop_epochs=1, recording_images=1_000, recording_epochs=1,
                    study_space="smoke", study_images=1_000, study_epochs=1, study_trials=2)


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, section: str, measure: str, value: float | str, unit: str, target: str = "") -> None:
        shown = value if isinstance(value, str) else f"{value:.4g}"
        self.rows.append((section, measure, shown, unit, target))
        print(f"  {section}: {measure} = {shown} {unit}", flush=True)

    def render(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(COLUMNS)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                          *map(line, self.rows)])


# --- the training loops --------------------------------------------------------------------------

def loop_config(arch: str, batch_size: int, images: int, epochs: int, device: str):
    from pipelines.config import RunConfig, with_overrides

    model = ({"model.arch": "mlp", "model.hidden": "400", "model.latent_dim": 20} if arch == "mlp"
             else {"model.arch": "conv", "model.latent_dim": 16})
    return with_overrides(RunConfig(), {
        "data.dataset": "fashion-mnist", "data.limit_train": images, "data.val_size": 1000,
        "model.conditioning": "none", **model, "optim.batch_size": batch_size, "optim.epochs": epochs,
        "optim.patience": 0, "execution.device": device})


def our_examples_per_s(config) -> float:
    """Training examples/s of `pipelines.training.train.train` (its best epoch; validation not counted)."""
    from pipelines.training.train import train

    result = train(config)
    return max(row["examples_per_s"] for row in result.history)


def torchvision_root(tmp: Path) -> Path:
    """A torchvision FashionMNIST root made from Debian's archives (torchvision reads raw IDX files)."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX_FILES:
        if not (raw / name).is_file():
            with gzip.open(DEBIAN_FASHION / f"{name}.gz", "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return tmp


def conventional_examples_per_s(config, root: Path) -> float:
    """The loop of a typical PyTorch VAE example, on the same model architecture and data."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    import cvae

    device = torch.device(config.execution.device)
    dataset = datasets.FashionMNIST(str(root), train=True, download=False, transform=transforms.ToTensor())
    if config.data.limit_train:
        dataset = Subset(dataset, range(config.data.limit_train))
    loader = DataLoader(dataset, batch_size=config.optim.batch_size, shuffle=True)
    torch.manual_seed(0)
    model = cvae.build(config.model, (1, 28, 28), 10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    best = 0.0
    for _ in range(config.optim.epochs):
        model.train()
        started, seen, total = time.perf_counter(), 0, 0.0
        for x, _labels in loader:
            x = x.to(device)
            out = model(x, None)
            recon = F.binary_cross_entropy_with_logits(out.decoded, x, reduction="sum")
            kl = -0.5 * torch.sum(1 + out.logvar - out.mu.pow(2) - out.logvar.exp())
            loss = (recon + kl) / len(x)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            seen += len(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, seen / (time.perf_counter() - started))
    return best


def training_flops_per_example(config) -> float:
    """FLOPs of one forward + backward step, per example, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    import cvae
    from cvae import negative_elbo

    model = cvae.build(config.model, (1, 28, 28), 10)
    x = torch.rand(config.optim.batch_size, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        out = model(x, None)
        terms = negative_elbo(model.reconstruction_nll(out.decoded, x), out.mu, out.logvar, out.z, 1.0)
        terms.loss.backward()
    return counter.get_total_flops() / config.optim.batch_size


def matmul_flops_per_s(device: str, n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n ** 3 / best


# --- entry points as a user runs them --------------------------------------------------------------

def _env(workdir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "MLFLOW_EXPERIMENT_NAME": "benchmark", "CVAE_OFFLINE": "1", "CVAE_DATA_DIR": str(workdir / "data")}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _run(workdir: Path, module: str, *args: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=workdir, env=_env(workdir),
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{module} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def _runs(workdir: Path, filter_string: str = ""):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("benchmark")
    return client, client.search_runs([experiment.experiment_id], filter_string=filter_string, max_results=1000)


def epoch_seconds(client, run) -> float:
    return sum(m.value for m in client.get_metric_history(run.info.run_id, "epoch_time_s"))


def data_args(images: int) -> list[str]:
    return ["--dataset", "fashion-mnist", "--limit-train", str(images), "--device", "cpu"]


def warm_up_store(table: Table, workdir: Path, training_sizes: set[int]) -> None:
    """A user's first run in a fresh store also creates MLflow's tables, and the first run on a
    given number of training images trains (and caches) the classifier that judges its samples;
    every later run finds both. Paid here once per size, and shown, so the sections below measure
    the steady state."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.config import DataConfig
    from pipelines.evaluation.classifier import get_classifier

    wall = _run(workdir, "pipelines.entrypoints.train", *data_args(500), "--epochs", "1", "--run-name", "warm-up")
    table.add("recording", "first run in a fresh store (tables; 1 epoch, 500 images)", wall, "s")
    uri = _env(workdir)["MLFLOW_TRACKING_URI"]
    mlflow.set_tracking_uri(uri)  # the classifier's model is logged through MLflow's fluent API
    client = MlflowClient(uri)
    for images in sorted(training_sizes):
        started = time.perf_counter()
        get_classifier(DataConfig(dataset="fashion-mnist", limit_train=images), torch.device("cpu"), images,
                       client=client)
        table.add("recording", f"judge classifier for runs on {images or 'all'} training images, once",
                  time.perf_counter() - started, "s")


def measure_recording(table: Table, workdir: Path, sizes: Sizes) -> None:
    wall = _run(workdir, "pipelines.entrypoints.train", *data_args(sizes.recording_images),
                "--epochs", str(sizes.recording_epochs), "--patience", "0", "--run-name", "recording")
    client, runs = _runs(workdir, "tags.`mlflow.runName` = 'recording'")
    epochs = epoch_seconds(client, runs[0])
    table.add("recording", f"train run wall time ({sizes.recording_epochs} epochs)", wall, "s")
    table.add("recording", "of which epochs (train + validation)", epochs, "s")
    table.add("recording", "share outside epochs (start-up, recording)", 1 - epochs / wall, "fraction",
              "<= 0.15 (5 epochs, all data)")


def measure_study(table: Table, workdir: Path, sizes: Sizes) -> None:
    common = ["--space", sizes.study_space, *data_args(sizes.study_images), "--epochs", str(sizes.study_epochs),
              "--n-trials", str(sizes.study_trials), "--sampler-seed", "0", "--register-as", "none",
              # No pruning: which trials a median pruner stops depends on the order they finish in,
              # so 1 and 2 workers would not train the same trials.
              "--pruner", "none",
              "--storage", f"sqlite:///{workdir / 'optuna.db'}"]
    per_hour = {}
    for workers in (1, 2):
        study = f"bench-{workers}"
        wall = _run(workdir, "pipelines.entrypoints.tune", *common, "--study", study, "--workers", str(workers))
        client, runs = _runs(workdir, f"tags.study = '{study}'")
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        epochs = sum(epoch_seconds(client, r) for r in children)
        per_hour[workers] = len(children) / wall * 3600
        if workers == 1:
            table.add("study", f"{sizes.study_trials} trials, 1 worker: wall time", wall, "s")
            table.add("study", "1 worker: share of wall time inside epochs", epochs / wall, "fraction", ">= 0.85")
        table.add("study", f"{workers} worker(s): trials per hour", per_hour[workers], "trials/h")
    table.add("study", "2 workers / 1 worker, trials per hour", per_hour[2] / per_hour[1], "ratio", ">= 1.6")


def measure_loops(table: Table, sizes: Sizes, root: Path, device: str) -> None:
    setups = [("mlp", 128), ("conv", 128), ("conv", 512)]
    for arch, batch in setups:
        config = loop_config(arch, batch, sizes.loop_images, sizes.loop_epochs, device)
        ours = our_examples_per_s(config)
        conventional = conventional_examples_per_s(config, root)
        name = "784-400-20 MLP" if arch == "mlp" else "conv 32-64"
        table.add("loop", f"{name} b{batch}: ours", ours, "examples/s")
        table.add("loop", f"{name} b{batch}: conventional loop", conventional, "examples/s")
        target = {"cpu": ">= 4"}.get(device, ">= 20") if arch == "mlp" else ""
        table.add("loop", f"{name} b{batch}: ours / conventional", ours / conventional, "ratio", target)
        if arch == "mlp":
            achieved = training_flops_per_example(config) * ours
            peak = matmul_flops_per_s(device)
            table.add("flops", "784-400-20 MLP b128: achieved", achieved / 1e9, "GFLOP/s")
            table.add("flops", "float32 2048² matmul, same run", peak / 1e9, "GFLOP/s")
            table.add("flops", "achieved / matmul", achieved / peak, "ratio")


def measure_cuda(table: Table, sizes: Sizes, workdir: Path) -> None:
    if not torch.cuda.is_available():
        table.add("cuda", "fp32 / bf16 / workers sharing a GPU", "not measured: no CUDA device", "")
        return
    from pipelines.config import with_overrides

    base = loop_config("mlp", 128, sizes.loop_images, sizes.loop_epochs, "cuda")
    for precision in ("fp32", "bf16"):
        config = with_overrides(base, {"execution.precision": precision})
        from pipelines.training.train import train

        result = train(config)
        table.add("cuda", f"784-400-20 MLP b128 {precision}: examples/s",
                  max(r["examples_per_s"] for r in result.history), "examples/s")
        table.add("cuda", f"784-400-20 MLP b128 {precision}: final val/loss", result.history[-1]["val/loss"], "nats")
    common = ["--space", sizes.study_space, "--dataset", "fashion-mnist", "--limit-train", str(sizes.study_images),
              "--epochs", str(sizes.study_epochs), "--device", "cuda", "--register-as", "none",
              "--storage", f"sqlite:///{workdir / 'optuna-cuda.db'}", "--n-trials", str(4 * sizes.study_trials)]
    per_hour = {}
    for workers in (1, 2, 4):
        wall = _run(workdir, "pipelines.entrypoints.tune", *common, "--study", f"cuda-{workers}",
                    "--workers", str(workers))
        per_hour[workers] = 4 * sizes.study_trials / wall * 3600
        table.add("cuda", f"{workers} worker(s) on one GPU: trials per hour", per_hour[workers], "trials/h")
    table.add("cuda", "4 workers / 1 worker on one GPU", per_hour[4] / per_hour[1], "ratio", ">= 1.5")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI: proves the benchmark runs")
    parser.add_argument("--sections", default="loop,recording,study,cuda",
                        help="comma-separated: loop (includes flops), recording, study, cuda")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from pipelines.entrypoints.logs import configure_logging

    configure_logging(logging.WARNING)  # the harness's warnings; what is measured is printed
    if not (DEBIAN_FASHION / f"{IDX_FILES[0]}.gz").is_file():
        sys.exit(f"error: the benchmark reads Fashion-MNIST from {DEBIAN_FASHION} "
                 "(apt-get install dataset-fashion-mnist)")
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    os.environ.setdefault("CVAE_OFFLINE", "1")
    table = Table()
    print(f"benchmark ({'quick' if args.quick else 'full'} sizes) on {os.cpu_count()} CPU cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="cvae-benchmark-") as tmp:
        workdir = Path(tmp)
        os.environ["CVAE_DATA_DIR"] = str(workdir / "data")
        if "loop" in sections:
            measure_loops(table, sizes, torchvision_root(workdir / "torchvision"), "cpu")
        if sections & {"recording", "study"}:
            measured_sizes = {"recording": sizes.recording_images, "study": sizes.study_images}
            warm_up_store(table, workdir, {measured_sizes[s] for s in sections & set(measured_sizes)})
        if "recording" in sections:
            measure_recording(table, workdir, sizes)
        if "study" in sections:
            measure_study(table, workdir, sizes)
        if "cuda" in sections:
            measure_cuda(table, sizes, workdir)
    print("\n" + table.render())
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(COLUMNS, row)) for row in table.rows], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
