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


def train(config: RunConfig, logger: RunLogger | None = None, on_epoch: EpochCallback | None = None,
          splits: DatasetSplits | None = None) -> TrainResult:
    """Train one model from ``config``; log its params, tags and per-epoch metrics.

    ``on_epoch(epoch, metrics)`` runs after each epoch's validation (Optuna reports and prunes
    there; an exception it raises stops training and propagates). The returned model holds the
    best validation epoch's weights, or with ``optim.restore_best=false`` the last epoch's (as Keras
    does without restore_best_weights); record it with ``pipelines.recording.record.record_run``.
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
    if logger:
        logger.log_params(flatten(config))
        logger.set_tags(run_tags(config, device))
        log_dataset(logger, config, splits)

    history: list[dict] = []
    best_val, best_epoch, best_state, stale = math.inf, 0, None, 0
    interactive = sys.stderr.isatty()
    stopped_early = False
    for epoch in range(1, config.optim.epochs + 1):
        started = time.perf_counter()
        with tqdm(total=len(splits.train), desc=f"epoch {epoch}/{config.optim.epochs}", unit="img",
                  disable=not interactive, leave=False) as bar:
            train_terms = _train_epoch(steps, optimizer, scaler, batcher, splits.train, config, device, epoch, bar)
        synchronize(device)
        train_seconds = time.perf_counter() - started
        val_terms = evaluate_split(model, splits.val, batcher, config, device, steps=steps)
        metrics = {**{f"train/{k}": v for k, v in train_terms.items()},
                   **{f"val/{k}": v for k, v in val_terms.items()},
                   "lr": optimizer.param_groups[0]["lr"], "epoch_time_s": time.perf_counter() - started,
                   "examples_per_s": len(splits.train) / train_seconds}
        history.append({"epoch": epoch, **metrics})
        if logger:
            logger.log_metrics(metrics, step=epoch)
        log.info(f"epoch {epoch}: train/loss {train_terms['loss']:.2f}  val/loss {val_terms['loss']:.2f}  "
                 f"val/recon {val_terms['recon']:.2f}  val/kl {val_terms['kl']:.2f}  "
                 f"{metrics['examples_per_s']:.0f} img/s")
        if not math.isfinite(val_terms["loss"]):
            from pipelines.training.divergence import divergence_message
            raise NonFiniteLossError(divergence_message(config, "validation", epoch, val_terms))
        if val_terms["loss"] < best_val:
            best_val, best_epoch, stale = val_terms["loss"], epoch, 0
            if config.optim.restore_best:
                best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if on_epoch:
            on_epoch(epoch, metrics)
        if config.optim.patience and stale >= config.optim.patience:
            stopped_early = True
            log.info(f"early stopping: no val/loss improvement for {stale} epochs; best epoch {best_epoch}")
            break

    kept_epoch = len(history)
    if config.optim.restore_best and best_epoch != kept_epoch:
        model.load_state_dict(best_state)
        kept_epoch = best_epoch
    if logger:
        logger.set_tags({COMPILED_TAG: str(steps.compiled).lower()})
        logger.log_metrics({"best_epoch": best_epoch, "best_val_loss": best_val}, step=best_epoch)
        logger.log_metrics({KEPT_EPOCH_METRIC: kept_epoch}, step=kept_epoch)
    return TrainResult(model=model, splits=splits, batcher=batcher, history=history, best_epoch=best_epoch,
                       best_val_loss=best_val, kept_epoch=kept_epoch, stopped_early=stopped_early, device=device,
                       seeds=seeds, determinism=determinism, compiled=steps.compiled,
                       compile_fallback=steps.fallback_error)
