"""The note on a study's parent run: trial counts, the best trial (linked) with what its value is, the plots."""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE
from optuna.trial import FrozenTrial

from pipelines.metrics import OBJECTIVES
from pipelines.recording.run_description import artifact_label, artifact_page, run_page, short_number
from pipelines.studies.trial_runs import RUN_ID_ATTR
from pipelines.tracking.runs import RunLogger


def study_description(study_name: str, counts: Mapping[str, int], objectives: Sequence[str], kind: str | None,
                      best: Mapping[str, object] | None, plots: Mapping[str, str],
                      registered: str | None = None) -> str:
    """Markdown for a study's parent run: trial counts, the best trial (linked) and the plots.

    ``kind``: the study's likelihood kind, which says what the objective values are; ``best``:
    ``number``, ``value``, ``params``, and the ``name`` and ``link`` of the best trial's run.
    """
    total = sum(counts.values())
    states = ", ".join(f"{counts.get(s, 0)} {s.lower()}" for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
                       if counts.get(s, 0) or s != "RUNNING")
    lines = [f"**Optuna study `{study_name}`**: {total} trials ({states}); minimising "
             f"{', '.join(f'`{o}`' for o in objectives)} on the validation split. Each trial is a "
             "nested run below this one."]
    if best:
        params = ", ".join(f"{k}={short_number(v) if isinstance(v, float) else v}" for k, v in best["params"].items())
        lines += ["", f"Best: [{best['name'] or 'trial-' + str(best['number'])}]({best['link']}) with "
                      f"{objectives[0]} = {best['value']:.4g} ({OBJECTIVES[objectives[0]].describe(kind)})"
                      + (f", {params}" if params else "") + "."]
    elif len(objectives) > 1:
        lines += ["", "A multi-objective study has no single best trial: see `pareto_front.csv`."]
    if registered:
        lines += ["", f"Registered model: `{registered}`."]
    if plots:
        lines += ["", "Plots: " + " · ".join(f"[{artifact_label(p)}]({link})" for p, link in plots.items())]
    return "\n".join(lines)


def describe_study(logger: RunLogger, study_name: str, objectives: Sequence[str], kind: str,
                   trials: Sequence[FrozenTrial], chosen: Sequence[FrozenTrial]) -> str:
    """Write ``study_description`` into the study's parent run (call it after the plots are logged).

    ``trials`` and ``chosen`` are the snapshot the summary was made from, so the description names
    the same best trial as the parent run's tags while parallel workers go on.
    """
    client, experiment_id = logger.client, logger.experiment_id
    counts = Counter(t.state.name for t in trials)
    best = None
    if len(objectives) == 1 and chosen:
        trial = chosen[0]
        run_id = str(trial.user_attrs.get(RUN_ID_ATTR, ""))
        name = client.get_run(run_id).data.tags.get(MLFLOW_RUN_NAME, "") if run_id else ""
        best = {"number": trial.number, "value": trial.value, "params": trial.params,
                "name": name, "link": run_page(experiment_id, run_id) if run_id else ""}
    plots = {a.path: artifact_page(experiment_id, logger.run_id, a.path)
             for a in client.list_artifacts(logger.run_id, "plots") if not a.is_dir}
    registered = client.get_run(logger.run_id).data.tags.get("registered_model")
    text = study_description(study_name, counts, objectives, kind, best, plots, registered)
    logger.set_tags({MLFLOW_RUN_NOTE: text})
    return text
