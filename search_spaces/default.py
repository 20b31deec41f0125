"""The general-purpose space: latent size, KL weight, architecture with its shape, learning rate."""
from __future__ import annotations

from typing import Any

import optuna

from pipelines.config import RunConfig

MIN_MLP_WIDTH = 32


def default(trial: optuna.Trial, base: RunConfig) -> dict[str, Any]:
    arch = trial.suggest_categorical("arch", ["mlp", "conv"])
    overrides: dict[str, Any] = {
        "model.arch": arch,
        "model.latent_dim": trial.suggest_int("latent_dim", 2, 64, log=True),
        "objective.kl_weight": trial.suggest_float("kl_weight", 1e-3, 4.0, log=True),
        "optim.lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "optim.batch_size": trial.suggest_categorical("batch_size", [64, 128, 256]),
    }
    if arch == "mlp":
        # A tapering stack (w, w/2, w/4, ...) keeps the space to two numbers whatever the depth.
        depth = trial.suggest_int("mlp_depth", 1, 3)
        width = trial.suggest_int("mlp_width", 128, 1024, log=True)
        overrides["model.hidden"] = tuple(max(width >> i, MIN_MLP_WIDTH) for i in range(depth))
    else:
        # Each stride-2 stage doubles the channels, as in the usual conv VAE.
        depth = trial.suggest_int("conv_depth", 1, 3)
        first = trial.suggest_categorical("conv_channels", [16, 32, 64])
        overrides["model.channels"] = tuple(first << i for i in range(depth))
    return overrides
