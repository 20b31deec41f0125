"""Sampling a study's trials: one of Optuna's samplers, seeded afresh for every trial.

The seed of a trial's sampling is a hash of the study's sampler seed and the trial number
(``trial_seed``, stored as the trial's ``sampler_seed`` attribute): trial numbers are unique in the
storage, so concurrent workers never draw alike, and a resumed study never replays its first draws.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Callable

import optuna

from pipelines.studies.settings import StudySettings

SAMPLER_SEED_ATTR = "sampler_seed"


def _sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "tpe":
        # group=True: the spaces are conditional (conv and mlp have different parameters).
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if kind == "bruteforce":
        # Every combination once, then the study stops: right for small categorical spaces
        # such as `architectures`, where a random draw would repeat presets.
        return optuna.samplers.BruteForceSampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def trial_seed(sampler_seed: int, trial_number: int) -> int:
    """The seed of one trial's sampling: a hash of the study's sampler seed and the trial number.

    Trial numbers are handed out by the storage, once each, so concurrent workers never draw
    with the same seed (a seed per worker plus a count of trials seen collides as soon as two
    workers start at different times), and a resumed study never replays its first draws.
    """
    digest = hashlib.sha256(f"{sampler_seed}:{trial_number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class PerTrialSeededSampler(optuna.samplers.BaseSampler):
    """Delegates to a fresh sampler for every trial, seeded by ``trial_seed``.

    Optuna's samplers keep what they learn in the storage (TPE and random keep nothing else,
    CMA-ES and NSGA-II their state in system attributes), so a new instance per trial loses
    nothing but the shared random stream that made workers repeat each other.
    """

    def __init__(self, factory: Callable[[int], optuna.samplers.BaseSampler], sampler_seed: int):
        self._factory = factory
        self.sampler_seed = sampler_seed
        self._inner = factory(sampler_seed)

    def __str__(self) -> str:
        return f"{type(self._inner).__name__} (seeded per trial from {self.sampler_seed})"

    def before_trial(self, study, trial) -> None:
        self._inner = self._factory(trial_seed(self.sampler_seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def build_sampler(settings: StudySettings, seed: int) -> optuna.samplers.BaseSampler:
    kind = settings.sampler
    if kind == "auto":
        kind = "nsga2" if settings.multi_objective else "tpe"

    def make(trial_seed_value: int) -> optuna.samplers.BaseSampler:
        # Optuna still labels TPE's `group` and the brute-force sampler experimental; the warning
        # would only alarm users.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _sampler(kind, trial_seed_value)

    return PerTrialSeededSampler(make, seed)
