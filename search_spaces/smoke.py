"""A tiny space for tests and throughput checks: a small MLP, a few seconds per trial on a CPU."""
from __future__ import annotations

from typing import Any

import optuna

from pipelines.config import RunConfig


def smoke(trial: optuna.Trial, base: RunConfig) -> dict[str, Any]:
    return {
        "model.arch": "mlp",
        "model.hidden": (trial.suggest_categorical("width", [32, 64]),),
        "model.latent_dim": trial.suggest_int("latent_dim", 2, 8, log=True),
        "objective.kl_weight": trial.suggest_float("kl_weight", 0.1, 2.0, log=True),
        "optim.lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True),
    }
