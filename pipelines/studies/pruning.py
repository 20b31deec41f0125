"""Pruning: stopping a trial early when its per-epoch validation value is clearly worse than others'.

Only single-objective studies prune: Optuna reports intermediate values for one objective only.
"""
from __future__ import annotations

import optuna

from pipelines.config import RunConfig
from pipelines.metrics import OBJECTIVES
from pipelines.studies.settings import StudySettings
from pipelines.training.train import EpochCallback


def build_pruner(settings: StudySettings, base: RunConfig) -> optuna.pruners.BasePruner:
    if not settings.prunes:
        return optuna.pruners.NopPruner()
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=base.optim.epochs)
    return optuna.pruners.MedianPruner(n_startup_trials=settings.pruner_startup_trials,
                                       n_warmup_steps=settings.pruner_warmup_epochs)


def pruning_note(settings: StudySettings) -> str | None:
    """Why a pruner the user asked for is off, or None."""
    if settings.multi_objective and settings.pruner != "none":
        return (f"pruner {settings.pruner!r} is off: a multi-objective study cannot prune "
                "(Optuna reports intermediate values for one objective only)")
    return None


def epoch_reporter(settings: StudySettings, trial: optuna.Trial, epochs: int) -> EpochCallback | None:
    """The ``on_epoch`` of a trial's training: report the objective's metric, prune when told to
    (None when the study does not prune)."""
    if not settings.prunes:
        return None
    metric = OBJECTIVES[settings.objectives[0]].metric

    def on_epoch(epoch: int, metrics: dict) -> None:
        trial.report(metrics[metric], step=epoch)
        # Pruning after the last epoch would save nothing and throw a finished result away.
        if epoch < epochs and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric} {metrics[metric]:.4f}")

    return on_epoch
