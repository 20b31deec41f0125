"""Choose among the named presets (the reference architectures), keeping the study's data, training
and likelihood, so that every trial's objective is the same quantity.

A preset's architecture and objective (KL weight, estimator, free bits) take effect; data,
optimisation and execution stay those of the study's base configuration, so ``epochs`` or
``limit_train`` given for the study hold for every trial and the architectures compete on equal
terms. Two things are made common, because otherwise trials are not comparable on one number:

- the likelihood (``LIKELIHOOD_FIELDS``) is the study's: a Bernoulli cross-entropy, a Gaussian
  density and a discretized logistic NLL are different quantities (docs/units.md), so a preset
  is evaluated under the study's likelihood, never its own;
- the presets offered are those whose conditioning agrees with the study's: conditional models
  bound -log p(x|y), unconditional ones -log p(x). A study with ``conditioning=none`` compares the
  unconditional presets, any other study the conditional ones.
"""
from __future__ import annotations

from typing import Any

import optuna

from cvae.config import ConfigError
from pipelines.config import RunConfig, flatten
from pipelines.presets import preset_config, preset_names

ARCHITECTURE_SECTIONS = ("model.", "objective.")
LIKELIHOOD_FIELDS = ("model.likelihood", "model.gaussian_variance", "model.gaussian_std")


def comparable_presets(base: RunConfig) -> list[str]:
    """The presets whose conditioning (conditional or not) is the study's, in registry order."""
    conditional = base.model.conditional
    names = [name for name in preset_names() if preset_config(name).model.conditional == conditional]
    if not names:
        raise ConfigError(f"conditioning={base.model.conditioning!r} is not valid for space=architectures; "
                          f"no preset is {'conditional' if conditional else 'unconditional'}")
    return names


def architectures(trial: optuna.Trial, base: RunConfig) -> dict[str, Any]:
    name = trial.suggest_categorical("preset", comparable_presets(base))
    # The preset's whole model/objective (its fields plus the defaults it leaves alone), not just
    # the keys it names, so nothing of the base's architecture leaks into the preset's.
    chosen = flatten(preset_config(name))
    overrides: dict[str, Any] = {key: value for key, value in chosen.items() if key.startswith(ARCHITECTURE_SECTIONS)}
    base_fields = flatten(base)
    overrides.update({key: base_fields[key] for key in LIKELIHOOD_FIELDS})
    overrides["preset"] = name
    return overrides
