"""Choose among the named presets (the reference architectures), keeping the study's data and training.

Only a preset's model and objective take effect; data, optimisation and execution stay those of
the study's base configuration, so ``epochs`` or ``limit_train`` given for the study hold for every
trial and the architectures compete on equal terms.
"""
from __future__ import annotations

from typing import Any

import optuna

from pipelines.config import RunConfig, flatten
from pipelines.presets import preset_config, preset_names

ARCHITECTURE_SECTIONS = ("model.", "objective.")


def architectures(trial: optuna.Trial, base: RunConfig) -> dict[str, Any]:
    name = trial.suggest_categorical("preset", list(preset_names()))
    # The preset's whole model/objective (its fields plus the defaults it leaves alone), not just
    # the keys it names, so nothing of the base's architecture leaks into the preset's.
    chosen = flatten(preset_config(name))
    overrides: dict[str, Any] = {key: value for key, value in chosen.items() if key.startswith(ARCHITECTURE_SECTIONS)}
    overrides["preset"] = name
    return overrides
