"""Fused training: a group of runs of one structure trained at once, as one stacked model (``cvae.fused``).

``train_fused`` is ``train`` for K configurations that differ only where tensor shapes do not
(``PER_MEMBER_FIELDS``: learning rate, weight decay, β, KL warm-up, free bits, seed, patience, ...).
Each member gets what ``train`` gives a run: its own seeds (initial weights, batch order, z draws,
dynamic binarization), its params, tags and dataset inputs, its per-epoch metrics, early stopping,
best checkpoint and ``TrainResult`` holding an ordinary ``CVAE``. A member that stops (early
stopping, an ``on_epoch`` that prunes, divergence) leaves the group, and its compute is freed; the
others go on. Its timings (``epoch_time_s``, ``examples_per_s``) are its group's.

What cannot fuse says why in one line (``fusion_refusal``); the caller trains it alone.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

import cvae
from cvae import kl_weight_at, loss_from_means
from cvae.fused import FusedCVAE, StackedOptimizer, clip_grad_norm_per_member, fusion_refusal, stacked_losses
from pipelines.config import RunConfig, flatten
from pipelines.data import Batcher, DatasetSplits, load_splits
from pipelines.tracking.runs import RunLogger
from pipelines.training.devices import resolve_device, synchronize
from pipelines.training.execution import (
    autocast,
    configure_determinism,
    configure_threads,
    is_deterministic,
    keep_freed_memory,
    seed_everything,
)
from pipelines.training.preflight import COPIES_IN_TRAINING
from pipelines.training.train import (
    EVAL_BATCH,
    EVAL_SEED,
    EpochCallback,
    NonFiniteLossError,
    Progress,
    TrainResult,
    log_run_start,
)

log = logging.getLogger(__name__)

# Fields that may differ within a fused group: none decides a tensor's shape or the code a step runs.
PER_MEMBER_FIELDS = frozenset({
    "preset", "optim.lr", "optim.weight_decay", "optim.patience", "optim.restore_best", "optim.grad_clip",
    "objective.kl_weight", "objective.warmup_epochs", "objective.free_bits", "execution.seed",
    "model.gaussian_std", "model.init",
})


def structure_key(config: RunConfig) -> tuple:
    """What must be equal for runs to fuse: every field but ``PER_MEMBER_FIELDS`` (architecture, widths,
    channels, latent size, conditioning, likelihood, batch size, epochs, data, device...)."""
    return tuple(sorted((key, value) for key, value in flatten(config).items() if key not in PER_MEMBER_FIELDS))


def fusion_refusal_for(config: RunConfig) -> str | None:
    """Why a run of ``config`` cannot train fused, in one line; None when it can."""
    refusal = fusion_refusal(config.model)
    if refusal:
        return refusal
    if config.execution.precision == "fp16":
        return "execution.precision=fp16 does not fuse (one gradient scaler would couple the members)"
    if config.execution.compile == "true":
        return "execution.compile=true does not fuse (fused steps run eagerly)"
    return None


# Each activation a batch keeps for the backward pass is held about three times (itself, its gradient,
# a temporary); each parameter COPIES_IN_TRAINING times (preflight's count).
ACTIVATION_COPIES = 3


def member_bytes(config: RunConfig, image_shape, num_classes: int) -> int:
    """About how much device memory one member of a fused group of ``config`` takes while training: its
    parameters' copies and one batch's activations, every module's output counted in a forward pass on
    the meta device (no memory, no arithmetic), so convolutions are counted as well as dense layers."""
    outputs = 0

    def count(module, inputs, output) -> None:
        nonlocal outputs
        outputs += sum(t.numel() for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor))

    batch = config.optim.batch_size
    with torch.device("meta"):
        model = cvae.build(config.model, image_shape, num_classes).train()
        leaves = [m for m in model.modules() if next(m.children(), None) is None]
        handles = [m.register_forward_hook(count) for m in leaves]
        try:
            labels = torch.zeros(batch, dtype=torch.long) if model.conditional else None
            model(torch.zeros((batch, *image_shape)), labels, noise=torch.zeros((batch, model.latent_dim)))
        finally:
            for handle in handles:
                handle.remove()
        parameters = sum(p.numel() for p in model.parameters())
    return 4 * (COPIES_IN_TRAINING * parameters + ACTIVATION_COPIES * (outputs + batch * math.prod(image_shape)))


@dataclass
class Member:
    """One run of a fused group: its configuration, where it logs, its ``on_epoch`` and its name in the log."""
    config: RunConfig
    logger: RunLogger | None = None
    on_epoch: EpochCallback | None = None
    name: str = ""


def _noise_generator(device: torch.device) -> torch.Generator:
    """The generator of a member's z draws: the stream a run alone would draw them from. On the CPU that
    is the global generator after the model's initialisation (a copy of its state); on an accelerator,
    the device's own generator, seeded and untouched by the initialisation (which happens on the CPU)."""
    if device.type == "cpu":
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
        return generator
    return torch.Generator(device=device).manual_seed(torch.initial_seed())


def _per_member(values: Sequence[float], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(list(values), device=device, dtype=dtype)


class _Group:
    """The members still training: the stacked model and optimizer, and each member's own pieces, in
    the stacked order."""

    def __init__(self, members: Sequence[Member], splits: DatasetSplits, device: torch.device):
        self.device = device
        self.members, self.seeds, self.batchers, self.generators, models = list(members), [], [], [], []
        for member in members:
            config = member.config
            self.seeds.append(seed_everything(config.execution.seed))
            models.append(cvae.build(config.model, splits.image_shape, splits.num_classes).to(device))
            self.generators.append(_noise_generator(device))
            self.batchers.append(Batcher(config.data.binarize, config.execution.seed, device))
        self.latent_dim, self.conditional = models[0].latent_dim, models[0].conditional
        self.model = FusedCVAE(models)
        del models
        first = members[0].config
        self.optimizer = StackedOptimizer(self.model.parameters(), first.optim.optimizer,
                                          _per_member([m.config.optim.lr for m in members], "cpu", torch.float64),
                                          _per_member([m.config.optim.weight_decay for m in members], "cpu",
                                                      torch.float64))
        self.active = list(range(len(members)))  # member index of each stacked slot

    def configs(self) -> list[RunConfig]:
        return [self.members[i].config for i in self.active]

    def leave(self, slots: Sequence[int]) -> None:
        """The members in ``slots`` leave; the stacked tensors shrink to those that stay."""
        if not slots:
            return
        keep = [slot for slot in range(len(self.active)) if slot not in set(slots)]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self.model.keep(index)
        self.optimizer.keep(index, self.model.parameters())
        self.active = [self.active[slot] for slot in keep]

    def train_epoch(self, split, epoch: int, bar) -> torch.Tensor:
        """One epoch of every active member; (K, 3): its loss, recon and KL, nats per example."""
        configs = self.configs()
        first = configs[0]
        batch_size, estimator = first.optim.batch_size, first.objective.kl_estimator
        batches = math.ceil(len(split) / batch_size)
        self.model.train()
        free_bits = _per_member([c.objective.free_bits for c in configs], self.device)
        clip = _per_member([c.optim.grad_clip for c in configs], self.device)
        totals = torch.zeros((len(configs), 3), device=self.device, dtype=torch.float64)
        draws = [self.batchers[i].train_batches(split, batch_size) for i in self.active]
        generators = [self.generators[i] for i in self.active]
        for index, pairs in enumerate(zip(*draws)):
            x = torch.stack([pair[0] for pair in pairs])
            y = torch.stack([pair[1] for pair in pairs]) if self.conditional else None
            count = x.shape[1]
            beta = _per_member([kl_weight_at(c.objective, epoch - 1 + index / batches) for c in configs], self.device)
            noise = torch.stack([torch.randn((count, self.latent_dim), generator=g, device=self.device)
                                 for g in generators])
            self.optimizer.zero_grad()
            with autocast(first.execution, self.device):
                recon, kl, sampled = self.model.terms(x, y, noise, estimator == "monte_carlo")
            loss, recon_mean, kl_mean = stacked_losses(recon, kl, sampled, beta, free_bits, estimator)
            loss.sum().backward()  # member k's parameters get exactly member k's gradient
            if bool((clip > 0).any()):
                clip_grad_norm_per_member(self.model.parameters(), clip)
            self.optimizer.step()
            totals += torch.stack([loss, recon_mean, kl_mean], dim=1).detach().double() * count
            bar.update(count)
        return totals / len(split)

    @torch.no_grad()
    def evaluate(self, split, batch_size: int = EVAL_BATCH) -> list[dict[str, float]]:
        """``train.evaluate_split`` for every active member: the same images and noise for all."""
        configs = self.configs()
        first = configs[0]
        sampled = first.objective.kl_estimator == "monte_carlo"
        self.model.train(False)
        noise = torch.randn((len(split), self.latent_dim), device=self.device,
                            generator=torch.Generator(device=self.device).manual_seed(EVAL_SEED))
        size = len(configs)
        recon = torch.zeros(size, device=self.device, dtype=torch.float64)
        kl_per_dim = torch.zeros((size, self.latent_dim), device=self.device, dtype=torch.float64)
        sampled_kl = torch.zeros(size, device=self.device, dtype=torch.float64)
        start = 0
        for x, y in self.batchers[self.active[0]].eval_batches(split, batch_size):
            with autocast(first.execution, self.device):
                batch_recon, batch_kl, batch_sampled = self.model.terms(
                    x, y if self.conditional else None, noise[start: start + len(x)], sampled, shared_inputs=True)
            start += len(x)
            recon += batch_recon.double().sum(dim=1)
            kl_per_dim += batch_kl.double().sum(dim=1)
            sampled_kl += batch_sampled.double().sum(dim=1)
        examples, results = len(split), []
        for slot, config in enumerate(configs):
            objective = config.objective
            terms = loss_from_means(recon[slot] / examples, kl_per_dim[slot] / examples, objective.kl_weight,
                                    objective.free_bits, sampled_kl[slot] / examples if sampled else None)
            loss, recon_mean, kl = (float(value) for value in (terms.loss, terms.recon, terms.kl))
            results.append({"loss": loss, "recon": recon_mean, "kl": kl, "neg_elbo": recon_mean + kl})
        return results


def _check_group(members: Sequence[Member]) -> None:
    if not members:
        raise ValueError("a fused group needs at least one member")
    for member in members:
        refusal = fusion_refusal_for(member.config)
        if refusal:
            raise ValueError(refusal)
    if len({structure_key(m.config) for m in members}) != 1:
        raise ValueError("fused runs must share their structure (every field but "
                         f"{', '.join(sorted(PER_MEMBER_FIELDS))})")


def train_fused(members: Sequence[Member], splits: DatasetSplits | None = None) -> list[TrainResult | Exception]:
    """Train ``members`` as one fused group; for each, in order, its ``TrainResult`` or the exception that
    ended it alone (``NonFiniteLossError``, or whatever its ``on_epoch`` or its logger raised). An
    exception of the group as a whole (out of memory, Ctrl-C) propagates: it ends every member."""
    _check_group(members)
    first = members[0].config
    device = resolve_device(first.execution)
    configure_threads(first.execution)
    keep_freed_memory()
    determinism = configure_determinism(is_deterministic(first.execution, device))
    splits = splits or load_splits(first.data, device)
    group = _Group(members, splits, device)
    names = [m.name for m in members]
    outcomes: list[TrainResult | Exception | None] = [None] * len(members)
    progress: list[Progress | None] = [None] * len(members)
    for index, member in enumerate(members):
        try:
            log_run_start(member.logger, member.config, device, splits)
            progress[index] = Progress(member.config, member.logger, member.on_epoch,
                                       label=f"{member.name}: " if member.name else "")
        except Exception as error:
            outcomes[index] = error
    group.leave([slot for slot, index in enumerate(group.active) if outcomes[index] is not None])

    def finish(index: int, slot: int) -> TrainResult:
        model = group.model.member(slot)
        kept_epoch = progress[index].finish(model, compiled=False)
        done = progress[index]
        return TrainResult(model=model, splits=splits, batcher=group.batchers[index], history=done.history,
                           best_epoch=done.best_epoch, best_val_loss=done.best_val, kept_epoch=kept_epoch,
                           stopped_early=done.stopped_early, device=device, seeds=group.seeds[index],
                           determinism=determinism, compiled=False,
                           fusion={"population": len(members), "members": names, "index": index})

    interactive = sys.stderr.isatty()
    epochs = first.optim.epochs
    for epoch in range(1, epochs + 1):
        if not group.active:
            break
        started = time.perf_counter()
        with tqdm(total=len(splits.train) * len(group.active), desc=f"fused epoch {epoch}/{epochs}", unit="img",
                  disable=not interactive, leave=False) as bar:
            train_terms = group.train_epoch(splits.train, epoch, bar).tolist()
        synchronize(device)
        train_seconds = time.perf_counter() - started
        val_terms = group.evaluate(splits.val)
        epoch_seconds = time.perf_counter() - started
        leaving = []
        for slot, index in enumerate(list(group.active)):
            config = members[index].config
            loss, recon, kl = train_terms[slot]
            batches = math.ceil(len(splits.train) / config.optim.batch_size)
            # As ``train`` logs it: the β of the epoch's last step.
            terms = {"loss": loss, "recon": recon, "kl": kl,
                     "kl_weight": kl_weight_at(config.objective, epoch - 1 + (batches - 1) / batches)}
            try:
                if not all(math.isfinite(v) for v in (loss, recon, kl)):
                    from pipelines.training.divergence import divergence_message
                    raise NonFiniteLossError(divergence_message(config, "training", epoch, terms))
                stop = progress[index].end_epoch(
                    epoch, lambda slot=slot: group.model.member_state(slot), terms, val_terms[slot],
                    config.optim.lr, epoch_seconds, len(splits.train) / train_seconds)
                if stop or epoch == epochs:
                    outcomes[index] = finish(index, slot)
            except Exception as error:
                outcomes[index] = error
            if outcomes[index] is not None:
                leaving.append(slot)
        if leaving:
            group.leave(leaving)
    return outcomes
