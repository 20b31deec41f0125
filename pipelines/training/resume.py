"""Resuming a killed run: what a checkpoint holds, when it is written, and which runs can be resumed.

After every epoch ``train`` captures everything the rest of the run depends on: the model's and
the optimizer's state, the gradient scaler's, every random number generator the loop draws from
(torch's CPU and CUDA defaults, the batcher's generator of batch order and binarization, NumPy's
and Python's), the epoch, and the early-stopping state with its metric history and best weights.
Restored at the start of the next epoch, the run goes on as if it had never stopped: on the CPU
(deterministic) the resumed run's weights and metrics are bitwise those of an uninterrupted one.

Everything is a tensor or a plain value, so the file loads with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import pickle
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipelines.config import RunConfig, flatten, from_params
from pipelines.errors import UserError
from pipelines.tracking import checkpoints
from pipelines.tracking.liveness import alive_reason
from pipelines.tracking.runs import RunLogger, get_run_or_refuse

log = logging.getLogger(__name__)

FORMAT = 1  # what a checkpoint holds; one that says otherwise is refused, not misread
RESUMED_TAG = "resumed_from_epoch"  # on a resumed run: the epoch its last resumption started after
RESUMES_TAG = "resumes"  # on a run that took over another's checkpoint: that run's id


def rng_states(device: torch.device, generator: torch.Generator) -> dict:
    """Every random number generator the training loop draws from, as tensors and plain values."""
    keys, position, has_gauss, cached_gaussian = np.random.get_state()[1:]
    version, python_state, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "batcher": generator.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def restore_rng_states(states: dict, device: torch.device, generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["batcher"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    numpy = states["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))


def capture(config: RunConfig, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler,
            generator: torch.Generator, progress: dict, device: torch.device) -> dict:
    """A checkpoint after ``epoch``: ``progress`` is ``Progress.state_dict()``."""
    return {"format": FORMAT, "epoch": epoch, "config": flatten(config), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states(device, generator), "progress": progress}


@dataclass(frozen=True)
class Resume:
    """A checkpoint to go on from: ``state`` (what ``capture`` made), the run it is of, where it was found."""
    state: dict
    run_id: str
    source: str

    @property
    def epoch(self) -> int:
        return int(self.state["epoch"])

    def matches(self, config: RunConfig) -> bool:
        """Whether the checkpoint is of ``config`` (where the data lie aside)."""
        def comparable(params: dict) -> dict:
            return {k: v for k, v in params.items() if k != "data.data_dir"}
        return comparable(self.state["config"]) == comparable(flatten(config))

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, generator: torch.Generator,
                progress, device: torch.device) -> int:
        """Put the checkpoint's state back (``progress``: the run's ``train.Progress``); return the next epoch."""
        state = self.state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        progress.load_state_dict(state["progress"])
        restore_rng_states(state["rng"], device, generator)  # last: nothing may draw after it
        log.info(f"resuming run {self.run_id} after epoch {self.epoch}, from {self.source}")
        return self.epoch + 1

    def description(self) -> dict:
        """What the manifest says of it."""
        return {"run_id": self.run_id, "after_epoch": self.epoch, "checkpoint": self.source}


class Checkpointer:
    """Writes a run's checkpoint locally after every epoch, and uploads it to the run's artifacts when
    ``upload_s`` seconds have passed since the last upload (0: every epoch). An upload that fails
    (a tracking server away) is a warning: the local checkpoint is there and training goes on."""

    def __init__(self, logger: RunLogger, upload_s: float):
        self.logger, self.upload_s = logger, upload_s
        self.last_upload = time.monotonic()

    def save(self, state: dict) -> None:
        checkpoints.save_local(self.logger.run_id, state)
        if self.upload_s and time.monotonic() - self.last_upload < self.upload_s:
            return
        try:
            checkpoints.upload(self.logger.client, self.logger.run_id)
        except (MlflowException, OSError) as error:
            log.warning(f"could not upload the checkpoint of epoch {state['epoch']} to the run's artifacts "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
                        "it is kept locally")
        self.last_upload = time.monotonic()


def load_checkpoint(client: MlflowClient, run_id: str) -> Resume | None:
    """``run_id``'s checkpoint; None when it has none. A file that cannot be read (cut short, not ours) or
    of another format is refused in one line."""
    try:
        found = checkpoints.find(client, run_id)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"the checkpoint of run {run_id} cannot be read ({reason})") from None
    if found is None:
        return None
    state, source = found
    if state.get("format") != FORMAT:
        raise UserError(f"the checkpoint of run {run_id} ({source}) is of format {state.get('format')!r}; "
                        f"this code reads format {FORMAT}")
    return Resume(state, run_id, source)


def resumable_run(client: MlflowClient, run_id: str) -> tuple[RunConfig, Resume]:
    """The configuration and checkpoint of a run `train --resume` may continue; a one-line ``UserError``
    for an unknown run, a FINISHED one, one whose process may still be alive, or one without a checkpoint."""
    run = get_run_or_refuse(client, run_id, "resume", "the id of a killed or failed MLflow run")
    status = run.info.status
    if status == "FINISHED":
        raise UserError(f"resume={run_id!r} is not valid; the run is FINISHED: there is nothing to resume")
    if status in ("RUNNING", "SCHEDULED"):
        alive = alive_reason(run)
        if alive:
            raise UserError(f"resume={run_id!r} is not valid; the run is {status} and may still be training: "
                            f"{alive}; resume it once its process is gone")
    found = load_checkpoint(client, run_id)
    if found is None:
        raise UserError(f"resume={run_id!r} is not valid; the run has no checkpoint (neither "
                        f"{checkpoints.local_path(run_id)} nor the artifact {checkpoints.ARTIFACT_PATH}): "
                        "it died before its first epoch ended, or was not trained by this harness")
    return from_params(run.data.params), found
