"""The trials a study chooses, and the full record they get once it has chosen.

Trials record little while the study runs (params, per-epoch metrics, objective values, model,
manifest: ``record.TRIAL``). When a study invocation ends, the trials it chose (the best one, or
the Pareto front of a multi-objective study, capped) get the rest (``record.BEST_TRIAL``): test
metrics, figures, evaluation and the generator model, from their logged model reloaded.
Everything is decided from one snapshot of the trials, so what the summary says, what is
recorded and what is registered agree.
"""
from __future__ import annotations

import logging
from typing import Sequence

import mlflow.pytorch
import torch
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from pipelines.config import RunConfig, from_params
from pipelines.data import Batcher, DatasetSplits, load_splits
from pipelines.recording.record import BEST_TRIAL, DETAIL_TAG, FULL, record_run
from pipelines.studies.trial_runs import RUN_ID_ATTR
from pipelines.tracking.runs import RunLogger
from pipelines.training.train import KEPT_EPOCH_METRIC, TrainResult

log = logging.getLogger(__name__)

PARETO_RECORD_CAP = 8  # Pareto-front trials that get figures and evaluation; a wide front is capped
RECORDED_IN_FULL = (FULL.name, BEST_TRIAL.name)
_HISTORY_PREFIXES = ("train/", "val/")


def _dominates(a: FrozenTrial, b: FrozenTrial) -> bool:
    return all(x <= y for x, y in zip(a.values, b.values)) and any(x < y for x, y in zip(a.values, b.values))


def chosen_trials(trials: Sequence[FrozenTrial], n_objectives: int) -> list[FrozenTrial]:
    """The best COMPLETE trial (lowest value, earliest on ties), or the Pareto front of minimised
    objectives ordered by trial number; [] when none is complete."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return []
    if n_objectives == 1:
        return [min(complete, key=lambda t: (t.value, t.number))]
    front = [t for t in complete if not any(_dominates(other, t) for other in complete)]
    return sorted(front, key=lambda t: t.number)


def _history(client: MlflowClient, run_id: str, metric_names: Sequence[str]) -> list[dict]:
    """The per-epoch rows ``train`` kept in memory, read back from the run's metric history."""
    rows: dict[int, dict] = {}
    for name in metric_names:
        if name.startswith(_HISTORY_PREFIXES):
            for point in client.get_metric_history(run_id, name):
                rows.setdefault(point.step, {"epoch": point.step})[name] = point.value
    return [rows[step] for step in sorted(rows)]


def record_chosen_trials(client: MlflowClient, chosen: Sequence[FrozenTrial], base: RunConfig,
                         base_splits: DatasetSplits | None, device: torch.device,
                         cap: int = PARETO_RECORD_CAP) -> list[int]:
    """Give each chosen trial (up to ``cap``) its full record, once; return the trial numbers recorded now."""
    if len(chosen) > cap:
        log.info(f"{len(chosen)} trials on the Pareto front; figures and evaluation for the first {cap} "
                 "by the first objective")
        chosen = sorted(chosen, key=lambda t: (t.values[0], t.number))[:cap]
    recorded = []
    for trial in chosen:
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        if not run_id:
            continue
        run = client.get_run(run_id)
        model_uri = run.data.tags.get("model_uri")
        if run.data.tags.get(DETAIL_TAG) in RECORDED_IN_FULL or not model_uri:
            continue
        config = from_params(run.data.params)
        splits = base_splits if base_splits is not None and config.data == base.data else load_splits(config.data, device)
        model = mlflow.pytorch.load_model(model_uri, map_location=device)
        best_epoch = int(run.data.metrics.get("best_epoch", 1))
        # Runs from before kept_epoch was logged always kept the best epoch's weights.
        kept_epoch = int(run.data.metrics.get(KEPT_EPOCH_METRIC, best_epoch))
        result = TrainResult(model=model, splits=splits, batcher=Batcher(config.data.binarize, config.execution.seed, device),
                             history=_history(client, run_id, list(run.data.metrics)), best_epoch=best_epoch,
                             kept_epoch=kept_epoch,
                             best_val_loss=float(run.data.metrics.get("best_val_loss", float("nan"))),
                             stopped_early=False, device=device)
        record_run(RunLogger(run_id, client), result, config, BEST_TRIAL)
        recorded.append(trial.number)
        log.info(f"trial {trial.number}: recorded test metrics, figures, evaluation and generator")
    return recorded
