"""What a study is asked to do: its name and storage, space, objectives, sampler, pruner and stopping.

``StudySettings`` validates itself when built (one-line ``ConfigError`` naming the setting); its
defaults are the only ones: the `tune` command line leaves out what the user did not give.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_model_name

from cvae.config import ConfigError, require, require_choice
from pipelines.metrics import DEFAULT_OBJECTIVE, OBJECTIVES, objective_name

DEFAULT_STORAGE = "sqlite:///optuna.db"
HEARTBEAT_GRACE_S = 120  # a running trial silent this long belongs to a dead worker
SAMPLERS = ("auto", "tpe", "random", "cmaes", "nsga2", "bruteforce")
PRUNERS = ("median", "hyperband", "none")
DEFAULT_TRIALS = 20
# What every trial records: "best" keeps params, per-epoch metrics, objective values, the model and the
# manifest, and gives figures, test metrics, evaluation and the generator to the chosen trials only;
# "all" records everything for every trial.
TRIAL_ARTIFACTS = ("best", "all")
# Most trials trained at once as one fused model (`--fuse`): far beyond what one device holds of these models.
MAX_FUSE = 1024
FUSE_AUTO = "auto"
REGISTERED_MODEL = "the registered model's name"


def check_model_name(name: str, what: str = REGISTERED_MODEL, hint: str = "") -> None:
    """Refuse, before any trial, a registered-model name MLflow's registry would refuse when the
    study ends (``/`` or ``:``, a path like ``..``): its own check, said in one line."""
    try:
        _validate_model_name(name)
    except MlflowException as error:
        reason = re.sub(r"^Invalid (?:model name|name:?) '.*?'\.\s*|^Invalid value .*? supplied:\s*", "",
                        error.message.splitlines()[0]).rstrip(".")
        raise ConfigError(f"register_as={name!r} is not valid ({what}): {reason[:1].lower()}{reason[1:]}"
                          f"{hint}") from None


@dataclass(frozen=True)
class StudySettings:
    name: str = "cvae"
    storage: str = DEFAULT_STORAGE
    space: str = "default"
    objectives: tuple[str, ...] = (DEFAULT_OBJECTIVE,)  # names of pipelines.metrics.OBJECTIVES
    sampler: str = "auto"  # tpe for one objective, nsga2 for several
    sampler_seed: int = 0
    pruner: str = "median"
    pruner_startup_trials: int = 5
    pruner_warmup_epochs: int = 0
    n_trials: int | None = None  # this invocation's, all workers together; None with no timeout means DEFAULT_TRIALS
    timeout: float | None = None  # seconds
    register_as: str = ""  # registered model name; "" registers nothing
    heartbeat_grace_s: int = HEARTBEAT_GRACE_S
    trial_artifacts: str = "best"
    workers: int = 1  # worker processes this invocation starts on the study
    # Trials asked at a time and trained fused where they share a structure (studies.fused_trials); 1: one
    # at a time, each alone; "auto": as many as the device gains from (fused_trials.choose_fuse).
    fuse: int | str = FUSE_AUTO

    def __post_init__(self):
        object.__setattr__(self, "objectives", tuple(objective_name(name) for name in self.objectives))
        require(bool(self.name.strip()), "study", self.name, "a non-empty study name")
        require(len(self.objectives) >= 1 and len(set(self.objectives)) == len(self.objectives),
                "objectives", ",".join(self.objectives), "distinct names, e.g. neg_elbo or recon,kl")
        for name in self.objectives:
            require_choice("objectives", name, tuple(OBJECTIVES))
        require(self.multi_objective or self.objectives != ("params",), "objectives", "params",
                "params only beside another objective, e.g. neg_elbo,params")
        require_choice("sampler", self.sampler, SAMPLERS)
        require(not (self.multi_objective and self.sampler == "cmaes"), "sampler", self.sampler,
                "a multi-objective sampler (auto, nsga2, tpe, random): CMA-ES optimises one objective")
        require_choice("pruner", self.pruner, PRUNERS)
        require(self.pruner_startup_trials >= 0, "pruner_startup_trials", self.pruner_startup_trials,
                "an integer >= 0")
        require(self.pruner_warmup_epochs >= 0, "pruner_warmup_epochs", self.pruner_warmup_epochs,
                "an integer >= 0")
        require(self.n_trials is None or self.n_trials >= 1, "n_trials", self.n_trials, "an integer >= 1")
        require(self.timeout is None or self.timeout > 0, "timeout", self.timeout, "a number of seconds > 0")
        require(self.heartbeat_grace_s >= 2, "heartbeat_grace", self.heartbeat_grace_s, "an integer >= 2 (seconds)")
        require_choice("trial_artifacts", self.trial_artifacts, TRIAL_ARTIFACTS)
        require(self.workers >= 1, "workers", self.workers, "an integer >= 1")
        if self.register_as:
            check_model_name(self.register_as)
        require(self.fuse == FUSE_AUTO or (isinstance(self.fuse, int) and not isinstance(self.fuse, bool)
                                           and 1 <= self.fuse <= MAX_FUSE), "fuse", self.fuse,
                f"{FUSE_AUTO!r} or an integer in 1..{MAX_FUSE} (trials trained at once as one fused model; "
                "1 = each alone)")

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def prunes(self) -> bool:
        return self.pruner != "none" and not self.multi_objective


def trials_to_run(settings: StudySettings) -> int | None:
    """How many trials an invocation adds: ``n_trials``, else none counted when a timeout stops it,
    else DEFAULT_TRIALS."""
    return settings.n_trials or (None if settings.timeout else DEFAULT_TRIALS)


def study_params(settings: StudySettings) -> dict[str, object]:
    """The settings as the parent run's params (``RunLogger`` logs the storage without its password)."""
    return {"study.name": settings.name, "study.storage": settings.storage,
            "study.space": settings.space, "study.objectives": ",".join(settings.objectives),
            "study.sampler": settings.sampler, "study.sampler_seed": settings.sampler_seed,
            "study.pruner": settings.pruner if settings.prunes else "none",
            "study.n_trials": settings.n_trials or "", "study.timeout": settings.timeout or "",
            "study.workers": settings.workers, "study.trial_artifacts": settings.trial_artifacts,
            "study.fuse": settings.fuse}
