"""Where a run's checkpoint lives: a local file written every epoch, a copy in the run's artifacts.

A checkpoint is one ``torch.save`` file of tensors and plain values (what it holds is
``pipelines.training.resume``'s business). Locally it is ``$CVAE_CHECKPOINT_DIR/<run id>/last.pt``
(default ``~/.cache/cvae-harness/checkpoints``), replaced atomically (a temporary file, then
``os.replace``), so a kill mid-write leaves the previous epoch's. Uploaded, it is the run's artifact
``checkpoints/last.pt``, from where another machine resumes it. It is read back with
``weights_only=True``: nothing the harness loads by itself is unpickled.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

CHECKPOINT_DIR_ENV = "CVAE_CHECKPOINT_DIR"
DEFAULT_CHECKPOINT_DIR = Path.home() / ".cache" / "cvae-harness" / "checkpoints"
FILE_NAME = "last.pt"
ARTIFACT_DIR = "checkpoints"
ARTIFACT_PATH = f"{ARTIFACT_DIR}/{FILE_NAME}"


def local_path(run_id: str) -> Path:
    """The local checkpoint file of ``run_id`` (it may not exist)."""
    root = Path(os.environ.get(CHECKPOINT_DIR_ENV) or DEFAULT_CHECKPOINT_DIR).expanduser()
    return root / run_id / FILE_NAME


def save_local(run_id: str, state: dict) -> Path:
    """Write ``state`` as ``run_id``'s local checkpoint, atomically; return its path."""
    path = local_path(run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".last-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def upload(client: MlflowClient, run_id: str) -> None:
    """Copy the local checkpoint to the run's artifacts (``checkpoints/last.pt``, replacing the last)."""
    client.log_artifact(run_id, str(local_path(run_id)), ARTIFACT_DIR)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def find(client: MlflowClient, run_id: str) -> tuple[dict, str] | None:
    """``run_id``'s latest checkpoint and where it came from (the local file, else the artifact); None
    when it has neither. The local file is written every epoch, the artifact only every
    ``execution.checkpoint_upload_s``; when both exist the local one is at least as recent."""
    path = local_path(run_id)
    if path.is_file():
        return load(path), str(path)
    try:
        listed = {f.path for f in client.list_artifacts(run_id, ARTIFACT_DIR)}
    except MlflowException:
        return None
    if ARTIFACT_PATH not in listed:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        downloaded = client.download_artifacts(run_id, ARTIFACT_PATH, tmp)
        return load(Path(downloaded)), f"artifact {ARTIFACT_PATH} of run {run_id}"


def discard_local(run_id: str) -> None:
    """Remove ``run_id``'s local checkpoint: the run finished and will not be resumed."""
    shutil.rmtree(local_path(run_id).parent, ignore_errors=True)
