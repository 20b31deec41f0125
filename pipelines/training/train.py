"""Training: one function, ``train``, used by the `train` entry point, Optuna trials and `reproduce`.

``train`` trains, validates, early-stops and reports each epoch; it logs params, tags and
per-epoch metrics only. Saying what the finished model is (test metrics, figures, evaluation,
the model, the manifest) is ``pipelines.recording.record``'s job, which imports this module.

Losses are nats per example: reconstruction summed over pixels, KL summed over latent
dimensions, both averaged over the batch.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

import cvae
from cvae import CVAE, kl_weight_at, loss_from_means
from cvae.likelihood import likelihood_kind
from pipelines.config import RunConfig, flatten
from pipelines.data import Batcher, DatasetSplits, SplitData, load_splits
from pipelines.errors import RunFailedError
from pipelines.tracking.datasets import log_dataset
from pipelines.tracking.runs import RunLogger, git_commit
from pipelines.training.devices import device_description, resolve_device, synchronize
from pipelines.training.execution import (
    configure_determinism,
    configure_threads,
    grad_scaler,
    is_deterministic,
    keep_freed_memory,
    seed_everything,
)
from pipelines.training.resume import RESUMED_TAG, Checkpointer, Resume, capture
from pipelines.training.steps import Steps, should_compile

log = logging.getLogger(__name__)

# Evaluation batch: a conv layer's activations for 250 images stay under glibc's 32 MB mmap limit,
# so freed buffers are reused from the heap; at 1000 images every batch mapped and unmapped
# hundreds of MB and a short conv run spent most of its time in the kernel zeroing pages.
EVAL_BATCH = 250
EVAL_SEED = 1234
EpochCallback = Callable[[int, dict], None]
# The epoch whose weights the trained model holds (the best one, or the last with restore_best=false):
# the test metrics and the logged model are of that epoch's weights.
KEPT_EPOCH_METRIC = "kept_epoch"
# Whether the training and evaluation steps ran through torch.compile to the end (execution.compile
# asks; auto and a compile failure can both mean eager).
COMPILED_TAG = "compiled"


class NonFiniteLossError(RunFailedError):
    """Training diverged: a loss became NaN or infinite."""


@dataclass
class TrainResult:
    """A trained model and how it got there; nothing about the test set.

    ``best_epoch``/``best_val_loss``: the epoch with the lowest validation loss (what early stopping
    watches). ``kept_epoch``: the epoch whose weights ``model`` holds, the best one with
    ``optim.restore_best`` and the last one trained without it.
    """
    model: CVAE
    splits: DatasetSplits
    batcher: Batcher
    history: list[dict]
    best_epoch: int
    best_val_loss: float
    kept_epoch: int
    stopped_early: bool
    device: torch.device
    seeds: dict = field(default_factory=dict)
    determinism: dict = field(default_factory=dict)
    # Whether the steps ran through torch.compile to the end; why they fell back to eager, if they did.
    compiled: bool = False
    compile_fallback: str | None = None
    # Trained fused with others (``training.fused``): the group's size and its members' names, and
    # this model's place among them; None when trained alone.
    fusion: dict | None = None
    # Resumed from a checkpoint (``training.resume``): the run whose checkpoint it was, the epoch it was
    # taken after and where it was found; None when trained from the start.
    resumed: dict | None = None


def build_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = config.optim
    if opt.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=0.9, weight_decay=opt.weight_decay)
    cls = torch.optim.AdamW if opt.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=opt.lr, weight_decay=opt.weight_decay)


@torch.no_grad()
def evaluate_split(model: CVAE, split: SplitData, batcher: Batcher, config: RunConfig,
                   device: torch.device, batch_size: int = EVAL_BATCH, steps: Steps | None = None) -> dict[str, float]:
    """Loss terms over a whole split at the configured β (no warm-up), nats per example.

    The posterior samples come from a fixed seed, one draw per example, so the same weights always
    give the same numbers, however the split is batched: a reloaded model can be checked against
    its logged metrics. The loss is formed from the split's means (free bits clamp the split's KL
    per dimension, as ``loss_from_means`` says), not averaged over batches. ``steps``: the
    training's own (compiled when it is); eager steps of ``model`` otherwise.
    """
    model.eval()
    steps = steps or Steps(model, config, device)
    objective = config.objective
    sampled = objective.kl_estimator == "monte_carlo"
    noise = torch.randn((len(split), model.latent_dim), generator=torch.Generator(device=device).manual_seed(EVAL_SEED),
                        device=device)
    recon = torch.zeros((), device=device, dtype=torch.float64)
    kl_per_dim = torch.zeros(model.latent_dim, device=device, dtype=torch.float64)
    sampled_kl = torch.zeros((), device=device, dtype=torch.float64)
    start = 0
    for x, y in batcher.eval_batches(split, batch_size):
        batch_recon, batch_kl, batch_sampled = steps.eval_sums(x, y, noise[start: start + len(y)])
        start += len(y)
        recon += batch_recon
        kl_per_dim += batch_kl
        sampled_kl += batch_sampled
    examples = len(split)
    terms = loss_from_means(recon / examples, kl_per_dim / examples, objective.kl_weight, objective.free_bits,
                            sampled_kl / examples if sampled else None)
    loss, recon_mean, kl = (float(value) for value in (terms.loss, terms.recon, terms.kl))
    return {"loss": loss, "recon": recon_mean, "kl": kl, "neg_elbo": recon_mean + kl}


def _train_epoch(steps: Steps, optimizer, scaler, batcher, split, config, device, epoch, bar) -> dict[str, float]:
    steps.model.train()
    batches = math.ceil(len(split) / config.optim.batch_size)
    totals = torch.zeros(3, device=device, dtype=torch.float64)
    beta = config.objective.kl_weight
    for index, (x, y) in enumerate(batcher.train_batches(split, config.optim.batch_size)):
        beta = kl_weight_at(config.objective, epoch - 1 + index / batches)
        terms = steps.train_step(optimizer, scaler, x, y, beta)
        # Accumulate on the device: a .item() per step would synchronise with the GPU every batch.
        totals += terms.double() * len(y)
        bar.update(len(y))
    loss, recon, kl = (totals / len(split)).tolist()
    if not all(math.isfinite(v) for v in (loss, recon, kl)):
        from pipelines.training.divergence import divergence_message
        raise NonFiniteLossError(divergence_message(config, "training", epoch, {"loss": loss, "recon": recon, "kl": kl}))
    return {"loss": loss, "recon": recon, "kl": kl, "kl_weight": beta}


def run_tags(config: RunConfig, device: torch.device) -> dict[str, str]:
    commit, dirty = git_commit()
    info = device_description(device)
    return {"dataset": config.data.dataset, "arch": config.model.arch,
            "conditioning": config.model.conditioning,
            # What the likelihood numbers are (cvae.likelihood): exact-discrete, exact-binary,
            # cross-entropy or continuous-density; only the exact kinds are NLLs.
            "likelihood_kind": likelihood_kind(config.model.likelihood, config.data.binarize),
            **info, "git_commit": commit, "git_dirty": str(dirty).lower(),
            **({"preset": config.preset} if config.preset else {})}


class Progress:
    """One model's training so far: its epochs' metrics, its best validation epoch, early stopping and
    the epoch whose weights it keeps. ``train`` keeps one; a fused group (``training.fused``) one per member,
    so that each member logs, stops and keeps its weights exactly as it would alone."""

    def __init__(self, config: RunConfig, logger: RunLogger | None, on_epoch: EpochCallback | None, label: str = "",
                 checkpoint: Callable[[int], None] | None = None):
        self.config, self.logger, self.on_epoch, self.label = config, logger, on_epoch, label
        self.checkpoint = checkpoint
        self.history: list[dict] = []
        self.best_val, self.best_epoch, self.best_state, self.stale = math.inf, 0, None, 0
        self.stopped_early = False

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the training so far (``training.resume``)."""
        return {"history": self.history, "best_val": self.best_val, "best_epoch": self.best_epoch,
                "best_state": self.best_state, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(entry) for entry in state["history"]]
        self.best_val, self.best_epoch = float(state["best_val"]), int(state["best_epoch"])
        self.best_state, self.stale = state["best_state"], int(state["stale"])
        patience = self.config.optim.patience
        self.stopped_early = bool(patience and self.stale >= patience)

    def log_missing_epochs(self) -> None:
        """Log the history's epochs the run lacks: a run resumed in a new run (a retried trial), or one
        killed after writing an epoch's checkpoint and before logging its metrics."""
        if not self.logger or not self.history:
            return
        first_metric = next(key for key in self.history[0] if key != "epoch")
        logged = {m.step for m in self.logger.client.get_metric_history(self.logger.run_id, first_metric)}
        for entry in self.history:
            if entry["epoch"] not in logged:
                self.logger.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, step=entry["epoch"])

    def end_epoch(self, epoch: int, state: Callable[[], dict], train_terms: dict, val_terms: dict, lr: float,
                  epoch_seconds: float, examples_per_s: float) -> bool:
        """Keep the best weights (``state()``: the model's state dict now), write the checkpoint, log the
        epoch, run ``on_epoch`` (its exception propagates); True when early stopping says stop."""
        config = self.config
        metrics = {**{f"train/{k}": v for k, v in train_terms.items()},
                   **{f"val/{k}": v for k, v in val_terms.items()},
                   "lr": lr, "epoch_time_s": epoch_seconds, "examples_per_s": examples_per_s}
        self.history.append({"epoch": epoch, **metrics})
        finite = math.isfinite(val_terms["loss"])
        if finite and val_terms["loss"] < self.best_val:
            self.best_val, self.best_epoch, self.stale = val_terms["loss"], epoch, 0
            if config.optim.restore_best:
                self.best_state = copy.deepcopy(state())
        elif finite:
            self.stale += 1
        if finite and self.checkpoint:  # before the metrics are logged: a kill between the two loses neither
            self.checkpoint(epoch)
        if self.logger:
            self.logger.log_metrics(metrics, step=epoch)
        log.info(f"{self.label}epoch {epoch}: train/loss {train_terms['loss']:.2f}  val/loss {val_terms['loss']:.2f}  "
                 f"val/recon {val_terms['recon']:.2f}  val/kl {val_terms['kl']:.2f}  "
                 f"{metrics['examples_per_s']:.0f} img/s")
        if not finite:
            from pipelines.training.divergence import divergence_message
            raise NonFiniteLossError(divergence_message(config, "validation", epoch, val_terms))
        if self.on_epoch:
            self.on_epoch(epoch, metrics)
        if config.optim.patience and self.stale >= config.optim.patience:
            self.stopped_early = True
            log.info(f"{self.label}early stopping: no val/loss improvement for {self.stale} epochs; "
                     f"best epoch {self.best_epoch}")
            return True
        return False

    def finish(self, model: CVAE, compiled: bool) -> int:
        """Give ``model`` the kept weights and log the best and kept epochs; return the kept epoch."""
        kept_epoch = len(self.history)
        if self.config.optim.restore_best and self.best_epoch != kept_epoch:
            model.load_state_dict(self.best_state)
            kept_epoch = self.best_epoch
        if self.logger:
            self.logger.set_tags({COMPILED_TAG: str(compiled).lower()})
            self.logger.log_metrics({"best_epoch": self.best_epoch, "best_val_loss": self.best_val},
                                    step=self.best_epoch)
            self.logger.log_metrics({KEPT_EPOCH_METRIC: kept_epoch}, step=kept_epoch)
        return kept_epoch


def log_run_start(logger: RunLogger | None, config: RunConfig, device: torch.device, splits: DatasetSplits) -> None:
    """What a run logs before its first epoch: params, tags, dataset inputs."""
    if logger:
        logger.log_params(flatten(config))
        logger.set_tags(run_tags(config, device))
        log_dataset(logger, config, splits)


def train(config: RunConfig, logger: RunLogger | None = None, on_epoch: EpochCallback | None = None,
          splits: DatasetSplits | None = None, resume: Resume | None = None) -> TrainResult:
    """Train one model from ``config``; log its params, tags and per-epoch metrics.

    ``on_epoch(epoch, metrics)`` runs after each epoch's validation (Optuna reports and prunes
    there; an exception it raises stops training and propagates). The returned model holds the
    best validation epoch's weights, or with ``optim.restore_best=false`` the last epoch's (as Keras
    does without restore_best_weights); record it with ``pipelines.recording.record.record_run``.

    With a ``logger``, a checkpoint is written after every epoch (``training.resume``). ``resume``: go
    on from such a checkpoint, in the logger's run, from the epoch after it; epochs the run lacks (all
    of them in a new run) are logged from the checkpoint's history.
    """
    device = resolve_device(config.execution, announce=True)
    configure_threads(config.execution)
    keep_freed_memory()
    determinism = configure_determinism(is_deterministic(config.execution, device))
    seeds = seed_everything(config.execution.seed)
    splits = splits or load_splits(config.data, device)
    model = cvae.build(config.model, splits.image_shape, splits.num_classes).to(device)
    steps = Steps(model, config, device, compiled=should_compile(config.execution, device))
    optimizer = build_optimizer(config, model)
    scaler = grad_scaler(config.execution, device)
    batcher = Batcher(config.data.binarize, config.execution.seed, device)
    if resume is not None and logger and resume.run_id == logger.run_id:
        logger.set_tags(run_tags(config, device))  # the same run: its params and datasets are logged already
    else:
        log_run_start(logger, config, device, splits)

    checkpointer = Checkpointer(logger, config.execution.checkpoint_upload_s) if logger else None

    def checkpoint(epoch: int) -> None:
        checkpointer.save(capture(config, epoch, model, optimizer, scaler, batcher.generator,
                                  progress.state_dict(), device))

    progress = Progress(config, logger, on_epoch, checkpoint=checkpoint if checkpointer else None)
    first_epoch = 1
    if resume is not None:
        first_epoch = resume.restore(model, optimizer, scaler, batcher.generator, progress, device)
        progress.log_missing_epochs()
        if logger:
            logger.set_tags({RESUMED_TAG: first_epoch - 1})
    interactive = sys.stderr.isatty()
    for epoch in range(first_epoch, 0 if progress.stopped_early else config.optim.epochs + 1):
        started = time.perf_counter()
        with tqdm(total=len(splits.train), desc=f"epoch {epoch}/{config.optim.epochs}", unit="img",
                  disable=not interactive, leave=False) as bar:
            train_terms = _train_epoch(steps, optimizer, scaler, batcher, splits.train, config, device, epoch, bar)
        synchronize(device)
        train_seconds = time.perf_counter() - started
        val_terms = evaluate_split(model, splits.val, batcher, config, device, steps=steps)
        if progress.end_epoch(epoch, model.state_dict, train_terms, val_terms, optimizer.param_groups[0]["lr"],
                              time.perf_counter() - started, len(splits.train) / train_seconds):
            break

    kept_epoch = progress.finish(model, steps.compiled)
    return TrainResult(model=model, splits=splits, batcher=batcher, history=progress.history,
                       best_epoch=progress.best_epoch, best_val_loss=progress.best_val, kept_epoch=kept_epoch,
                       stopped_early=progress.stopped_early, device=device, seeds=seeds, determinism=determinism,
                       compiled=steps.compiled, compile_fallback=steps.fallback_error,
                       resumed=resume.description() if resume else None)
