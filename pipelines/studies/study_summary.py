"""What a study's parent run keeps when the study concludes: trial counts, the trials table, the
best result (or the Pareto front), Optuna's plots, the registered best model and the run's note."""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Callable, Sequence

import mlflow
import optuna
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from optuna.trial import FrozenTrial, TrialState

from pipelines.metrics import OBJECTIVES
from pipelines.studies.storage import local_stores_lock
from pipelines.studies.study_description import describe_study
from pipelines.studies.trial_runs import RUN_ID_ATTR
from pipelines.tracking.runs import RunLogger

log = logging.getLogger(__name__)

BEST_ALIAS = "best"


def _plot_builders(study: optuna.Study, objectives: Sequence[str],
                   n_complete: int) -> dict[str, Callable[[], object]]:
    """Artifact path -> plot. Multi-objective studies plot each objective, plus the Pareto front."""
    from optuna import visualization as vis

    builders: dict[str, Callable[[], object]] = {}
    for index, name in enumerate(objectives):
        kwargs = {}
        suffix = ""
        if len(objectives) > 1:
            kwargs = {"target": lambda t, i=index: t.values[i], "target_name": name}
            suffix = f"_{name}"
        builders[f"plots/optimization_history{suffix}.html"] = (
            lambda kw=kwargs: vis.plot_optimization_history(study, **kw))
        if n_complete >= 2:  # importances compare trials: one complete trial has nothing to compare
            builders[f"plots/param_importances{suffix}.html"] = (
                lambda kw=kwargs: vis.plot_param_importances(study, **kw))
        builders[f"plots/parallel_coordinate{suffix}.html"] = (
            lambda kw=kwargs: vis.plot_parallel_coordinate(study, **kw))
        builders[f"plots/slice{suffix}.html"] = lambda kw=kwargs: vis.plot_slice(study, **kw)
    if len(objectives) > 1:
        builders["plots/pareto_front.html"] = lambda: vis.plot_pareto_front(study, target_names=list(objectives))
    return builders


def log_study_plots(study: optuna.Study, logger: RunLogger, objectives: Sequence[str], n_complete: int) -> list[str]:
    """Log Optuna's plots as interactive HTML; a plot the trials cannot support yet is skipped."""
    logged = []
    for path, build in _plot_builders(study, objectives, n_complete).items():
        try:
            with warnings.catch_warnings():
                # Optuna reminds that importances assume a minimised target; ours all are.
                warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes", UserWarning)
                figure = build()
            logger.client.log_figure(logger.run_id, figure, path)
            logged.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            log.warning(f"skipped {path}: {error}")
    return logged


def _register(client: MlflowClient, name: str, model_uri: str, tags: dict) -> ModelVersion:
    quoted = name.replace("'", "\\'")
    existing = [v for v in client.search_model_versions(f"name='{quoted}'") if v.source == model_uri]
    version = existing[0] if existing else mlflow.register_model(model_uri, name, tags=tags)
    client.set_registered_model_alias(name, BEST_ALIAS, version.version)
    return version


def register_best_model(client: MlflowClient, name: str, trial: FrozenTrial, study_name: str) -> ModelVersion | None:
    """Register the trial's model under ``name`` and point the ``best`` alias at it.

    A model already registered under that name (a resumed study whose best did not change) is
    not registered twice. Workers that finish together on a local store take turns (a file lock);
    on a server, ``mlflow.register_model`` itself takes the registered model another worker just
    created, and MLflow's HTTP client retries what fails in transit.
    """
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    model_uri = client.get_run(run_id).data.tags.get("model_uri") if run_id else None
    if not model_uri:
        log.warning(f"trial {trial.number} logged no model; nothing registered")
        return None
    tags = {"study": study_name, "trial_number": str(trial.number), RUN_ID_ATTR: run_id}
    with local_stores_lock([mlflow.get_registry_uri()]):
        return _register(client, name, model_uri, tags)


def summarise_study(study: optuna.Study, logger: RunLogger, objectives: Sequence[str], kind: str,
                    register_as: str | None, trials: Sequence[FrozenTrial], chosen: Sequence[FrozenTrial]) -> None:
    """What the parent run keeps: trial counts, the trials table, the best result, plots, the model.

    ``trials`` is one snapshot of the study and ``chosen`` the best trial (or the Pareto front)
    decided from it: the best value, the best params and the registered model all come from
    there, even while parallel workers go on adding trials. Counts and tables cover the whole
    study, including trials of earlier or parallel invocations. ``kind``: the study's likelihood
    kind, which says what its objective values are.
    """
    counts = Counter(t.state.name for t in trials)
    logger.log_metrics({f"trials_{state.lower()}": counts.get(state, 0)
                        for state in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}, step=0)
    logger.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        log.warning("no trial completed yet; no best trial, plots or model")
        describe_study(logger, study.study_name, objectives, kind, trials, chosen)
        return

    if len(objectives) == 1:
        best = chosen[0]
        logger.log_metrics({"best_value": best.value}, step=0)
        logger.log_params({f"best.{k}": v for k, v in best.params.items()})
        logger.set_tags({"best_trial_number": best.number, "best_run_id": best.user_attrs.get(RUN_ID_ATTR, "")})
        log.info(f"best trial {best.number}: {objectives[0]} {best.value:.4f} "
                 f"({OBJECTIVES[objectives[0]].describe(kind)})  {best.params}")
    else:
        front = sorted(chosen, key=lambda t: t.number)
        table = study.trials_dataframe()
        logger.log_text(table[table["number"].isin([t.number for t in front])].to_csv(index=False),
                        "pareto_front.csv")
        logger.log_metrics({"pareto_front_size": len(front)}, step=0)
        logger.set_tags({"pareto_trial_numbers": ",".join(str(t.number) for t in front)})
        log.info(f"Pareto front ({', '.join(objectives)}): "
                 + "; ".join(f"trial {t.number} {tuple(round(v, 4) for v in t.values)}" for t in front))

    log_study_plots(study, logger, objectives, len(complete))

    if len(objectives) > 1:
        log.info("a multi-objective study has no single best model; pick one from the Pareto front "
                 "(pareto_front.csv) and register it with `mlflow.register_model`")
        describe_study(logger, study.study_name, objectives, kind, trials, chosen)
        return
    if register_as:
        version = register_best_model(logger.client, register_as, chosen[0], study.study_name)
        if version is not None:
            logger.set_tags({"registered_model": f"models:/{register_as}@{BEST_ALIAS}",
                             "registered_model_version": version.version})
            log.info(f"registered models:/{register_as}@{BEST_ALIAS} (version {version.version})")
    describe_study(logger, study.study_name, objectives, kind, trials, chosen)
