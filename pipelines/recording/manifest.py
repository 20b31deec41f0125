"""The manifest of a run: everything needed to re-run it from the MLflow record alone.

``build_manifest`` gathers the configuration, command line, seeds, determinism and compile
settings, code version, data checksums, environment, hardware (the device's name, memory and
driver among it), and the results (metrics and a checksum of the
final weights); ``log_manifest`` logs it as ``manifest.json`` (plus ``code.diff`` when the tree
was dirty). ``reproduce`` reads it back with ``load_manifest``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import platform
import subprocess
import tempfile
from typing import TYPE_CHECKING, Mapping

import torch

from pipelines.config import RunConfig, to_dict
from pipelines.tracking.runs import REPO_ROOT, RunLogger, command_line, git_commit
from pipelines.training.devices import device_description, hardware_description
from pipelines.training.train import TrainResult

if TYPE_CHECKING:
    from mlflow import MlflowClient

MANIFEST_FILE = "manifest.json"
DIFF_FILE = "code.diff"
MANIFEST_VERSION = 1
# Wall-clock measurements differ on every run by nature; they are not results to reproduce.
TIMING_METRICS = ("epoch_time_s", "examples_per_s")


class ManifestNotFoundError(LookupError):
    """The run exists but has no manifest.json artifact."""


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in sorted key order (name, dtype, shape, then CPU contiguous bytes).

    Equal checksums mean bitwise-identical weights, wherever each model was trained.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape first: 0-d tensors (BatchNorm's num_batches_tracked, a Gaussian log_std) cannot be viewed as bytes
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@functools.cache  # the environment does not change within a process; a study asks once, not per trial
def installed_packages() -> dict[str, str]:
    """name -> version of every installed distribution (what `pip freeze` reports, without a subprocess)."""
    packages: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and name not in packages:  # the first on sys.path is the one imported
            packages[name] = dist.version
    return dict(sorted(packages.items(), key=lambda item: item[0].lower()))


def environment_description(device: torch.device) -> dict:
    info = device_description(device)
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": info["cuda_version"],
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "packages": installed_packages(),
    }


@functools.cache  # the same code for the whole process, as git_commit
def git_diff() -> str:
    """Uncommitted changes to tracked files (what makes the tree dirty); '' when unavailable."""
    try:
        return subprocess.run(["git", "diff", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def result_metrics(result: TrainResult, recorded_metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics a re-run must reproduce: what the recording logged (test metrics of a full
    record; none for a study trial), best epoch/validation loss, the epoch whose weights were kept,
    and the last epoch's training and
    validation metrics (timings excluded)."""
    last = {k: v for k, v in (result.history[-1] if result.history else {}).items()
            if k != "epoch" and k not in TIMING_METRICS}
    return {**recorded_metrics, "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
            "kept_epoch": result.kept_epoch, "epochs_run": len(result.history), **last}


def code_version() -> tuple[dict, str]:
    """The code's record (commit, dirty, diff checksum) and its uncommitted diff ('' when clean)."""
    commit, dirty = git_commit()
    diff = git_diff() if dirty else ""
    # Committed between the two git calls (or no diff to be had): no empty code.diff that says nothing.
    dirty = dirty and bool(diff)
    return {"git_commit": commit, "git_dirty": dirty, "diff_artifact": DIFF_FILE if dirty else None,
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if dirty else None}, diff


def build_manifest(config: RunConfig, result: TrainResult, recorded_metrics: Mapping[str, float],
                   model_uri: str | None, model_id: str | None, run_id: str | None = None,
                   code: dict | None = None) -> dict:
    data = result.splits.summary()
    return {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run_id,
        "config": to_dict(config),
        "command_line": command_line(),
        "seeds": result.seeds,
        "determinism": result.determinism,
        # execution.compile asked; whether the steps ran compiled to the end (auto: eager where it does
        # not pay), and the compile error that sent them back to eager, if one did.
        "compile": {"requested": config.execution.compile, "compiled": result.compiled,
                    "fallback_error": result.compile_fallback},
        "code": code or code_version()[0],
        # Trained fused with other runs (training.fused): the group's size, its members' names and this
        # run's place among them; None when trained alone. `reproduce` re-trains it alone.
        "fusion": result.fusion,
        # Resumed from a checkpoint after a kill (training.resume): the run it was of, the epoch it was taken
        # after and where it was found; None when trained from the start.
        "resumed": result.resumed,
        "data": {
            "dataset": data["dataset"],
            "source_files_sha256": data["source_files_sha256"],
            "sizes": data["sizes"],
            "image_shape": data["image_shape"],
            "class_names": data["class_names"],
            "test_split": data["test_split"],
            "split_seed": config.data.split_seed,
            "val_size": config.data.val_size,
            "limit_train": config.data.limit_train,
            "limit_test": config.data.limit_test,
            "root": data["root"],
        },
        "environment": environment_description(result.device),
        "hardware": hardware_description(result.device),
        "results": {
            "metrics": result_metrics(result, recorded_metrics),
            "weights_sha256": weights_sha256(result.model.state_dict()),
            "model_uri": model_uri,
            "model_id": model_id,
            "stopped_early": result.stopped_early,
        },
    }


def log_manifest(logger: RunLogger, config: RunConfig, result: TrainResult, recorded_metrics: Mapping[str, float],
                 model_uri: str | None, model_id: str | None) -> dict:
    """Log ``manifest.json`` (and ``code.diff`` when the tree is dirty) to the logger's run."""
    code, diff = code_version()
    if code["git_dirty"]:
        logger.log_text(diff, DIFF_FILE)
    manifest = build_manifest(config, result, recorded_metrics, model_uri, model_id, logger.run_id, code)
    logger.log_dict(manifest, MANIFEST_FILE)
    return manifest


def load_manifest(client: "MlflowClient", run_id: str) -> dict:
    """The manifest a run logged; ``ManifestNotFoundError`` when it logged none."""
    from mlflow.exceptions import MlflowException

    if MANIFEST_FILE not in {f.path for f in client.list_artifacts(run_id)}:
        raise ManifestNotFoundError(f"run {run_id} has no {MANIFEST_FILE} artifact")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, MANIFEST_FILE, tmp)
        except MlflowException as error:
            raise ManifestNotFoundError(f"run {run_id}: {MANIFEST_FILE} could not be read ({error})") from None
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
