"""Tune the optimiser and β for one architecture: learning rate, β, KL warm-up and free bits over the
study's own structure (its base configuration: architecture, widths, latent size, batch size...).

Nothing drawn here decides a tensor's shape, so every trial of a study fuses with the others it is
asked with (`tune --fuse K`, docs/tuning.md).
"""
from __future__ import annotations

from typing import Any

import optuna

from pipelines.config import RunConfig

LR_RANGE = (1e-4, 1e-2)
KL_WEIGHT_RANGE = (0.1, 4.0)
FREE_BITS_MAX = 0.5  # nats per latent dimension


def optimiser(trial: optuna.Trial, base: RunConfig) -> dict[str, Any]:
    return {
        "optim.lr": trial.suggest_float("lr", *LR_RANGE, log=True),
        "objective.kl_weight": trial.suggest_float("kl_weight", *KL_WEIGHT_RANGE, log=True),
        # Up to half the training: a warm-up as long as the run would leave β below its value throughout.
        "objective.warmup_epochs": trial.suggest_float("warmup_epochs", 0.0, max(1.0, base.optim.epochs / 2)),
        "objective.free_bits": trial.suggest_float("free_bits", 0.0, FREE_BITS_MAX),
    }
