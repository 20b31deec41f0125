"""What a person browsing MLflow sees first: run names, descriptions, and the dataset a run used.

- ``run_name(config)``: ``mlp z=16 β=1``, ``conv z=16 β=0.5 lr=3e-4``; a trial's is
  ``trial-7 · conv z=8 β=1``.
- ``run_description(config, metrics, artifacts)``: the short markdown note on the run's page
  (what was trained, headline metrics, links to the key figures); ``study_description`` the
  parent run's note of a study.
- ``log_dataset(logger, config, splits)``: the splits as MLflow dataset inputs (name, digest from
  the data files' SHA-256, sizes), shown in the runs table's Dataset column.

The ``*_description`` and ``run_name`` functions are pure; the ``describe_*``/``log_*``/``name_*``
functions write what they return into a run.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Mapping, Sequence
from urllib.parse import quote, urlencode

import numpy as np
from mlflow.data.dataset_source_registry import get_registered_sources
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE

from pipelines.config import RunConfig
from pipelines.metrics import OBJECTIVES, headline_metrics, run_likelihood_kind
from pipelines.presets import preset_config
from pipelines.tracking.runs import RunLogger

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from pipelines.data import DatasetSplits
    from pipelines.training.train import TrainResult

# Conditioning -> what the name says after the architecture ("mlp", "conv-decoder", "mlp-vae").
CONDITIONING_SUFFIX = {"concat": "", "channel": "-channel", "decoder": "-decoder", "none": "-vae"}
SPLIT_CONTEXTS = (("train", "training"), ("val", "validation"), ("test", "test"))
# Figures linked first, in this order; any other figure of the run follows.
KEY_FIGURES = ("figures/loss_curves.png", "figures/latent_scatter_test.png", "figures/reconstructions.png",
               "figures/class_samples.png", "figures/samples.png")
EMBEDDED_FIGURE = "figures/latent_scatter_test.png"
def _number(value: float) -> str:
    """Three significant digits, short: 1, 0.5, 0.157, 3e-4, 7.84e-3, 250."""
    if value == 0 or 1e-2 <= abs(value) < 1e5:
        return f"{value:.3g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _base_of(config: RunConfig) -> RunConfig:
    try:
        return preset_config(config.preset) if config.preset else RunConfig()
    except Exception:  # a preset renamed since the run: compare with the defaults instead
        return RunConfig()


def run_name(config: RunConfig) -> str:
    """What the run is, in a few characters: the model, latent size z, KL weight β, and the learning
    rate when it is not the preset's (or the default's)."""
    base = _base_of(config)
    model = config.model
    same_model_as_preset = (config.preset and config.preset != "default"
                            and (model.arch, model.conditioning) == (base.model.arch, base.model.conditioning))
    label = config.preset if same_model_as_preset else model.arch + CONDITIONING_SUFFIX.get(
        model.conditioning, f"-{model.conditioning}")
    parts = [label, f"z={model.latent_dim}", f"β={_number(config.objective.kl_weight)}"]
    if config.optim.lr != base.optim.lr:
        parts.append(f"lr={_number(config.optim.lr)}")
    return " ".join(parts)


def trial_run_name(number: int, config: RunConfig) -> str:
    return f"trial-{number} · {run_name(config)}"


def name_trial(logger: RunLogger, number: int, config: RunConfig) -> None:
    """A trial's run is created before its configuration is drawn; name it once it is known."""
    logger.set_tags({MLFLOW_RUN_NAME: trial_run_name(number, config)})


# --- datasets -------------------------------------------------------------------------------------

class SplitDataset(MetaDataset):
    """One split of an IDX dataset, as metadata: the images stay where they are.

    Its digest identifies exactly the examples used: the source files' SHA-256 plus the split
    settings, so two runs with the same digest saw the same images.
    """

    def __init__(self, source, name: str, digest: str, schema: Schema, profile: dict):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def split_digest(source_files: Mapping[str, str], config: RunConfig, split: str) -> str:
    data = config.data
    identity = {"files": dict(sorted(source_files.items())), "split": split, "val_size": data.val_size,
                "split_seed": data.split_seed, "limit_train": data.limit_train, "limit_test": data.limit_test}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def dataset_inputs(config: RunConfig, splits: "DatasetSplits") -> list[DatasetInput]:
    """The training, validation and test splits as MLflow dataset inputs (one per context)."""
    source = _local_source(splits.root)
    c, h, w = splits.image_shape
    schema = Schema([TensorSpec(np.dtype(np.uint8), (-1, c, h, w), "image"),
                     TensorSpec(np.dtype(np.int64), (-1,), "label")])
    inputs = []
    for attr, context in SPLIT_CONTEXTS:
        split = getattr(splits, attr)
        profile = {"examples": len(split), "split": split.name, "classes": splits.num_classes,
                   "image_shape": [c, h, w], "split_seed": config.data.split_seed,
                   "source_files_sha256": splits.source_files}
        dataset = SplitDataset(source, name=splits.dataset, digest=split_digest(splits.source_files, config, attr),
                               schema=schema, profile=profile)
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def _local_source(path: str):
    """MLflow's local-file dataset source (registered twice, so resolving a path would warn)."""
    local = next(s for s in get_registered_sources() if s._get_source_type() == "local")
    return local(path)


def log_dataset(logger: RunLogger, config: RunConfig, splits: "DatasetSplits") -> None:
    logger.client.log_inputs(logger.run_id, datasets=dataset_inputs(config, splits))


# --- descriptions ---------------------------------------------------------------------------------

def run_page(experiment_id: str, run_id: str) -> str:
    """A link to a run's page, relative to the MLflow UI (works under any host and --static-prefix)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def artifact_page(experiment_id: str, run_id: str, path: str) -> str:
    return f"{run_page(experiment_id, run_id)}/artifacts/{quote(path)}"


def artifact_file(run_id: str, path: str) -> str:
    """The artifact's bytes as the tracking server serves them (for images inside a description)."""
    return "get-artifact?" + urlencode({"path": path, "run_uuid": run_id})


def _label(path: str) -> str:
    return PurePosixPath(path).stem.replace("_", " ")


def _model_phrase(config: RunConfig) -> str:
    model = config.model
    conditioning = {"concat": "label concatenated to encoder and decoder inputs",
                    "channel": "label as extra encoder channels", "decoder": "label at the decoder only",
                    "none": "unconditional"}.get(model.conditioning, model.conditioning)
    shape = ("hidden " + "-".join(map(str, model.hidden))) if model.arch == "mlp" else model.arch
    kind = "VAE" if model.conditioning == "none" else "conditional VAE"
    return (f"{kind} ({model.arch}, {shape}; {conditioning}), {model.latent_dim}-D latent, "
            f"{model.likelihood} likelihood, β = {_number(config.objective.kl_weight)}")


def run_description(config: RunConfig, metrics: Mapping[str, float], artifacts: Mapping[str, str],
                    sizes: Mapping[str, int] | None = None, images: Mapping[str, str] | None = None) -> str:
    """Markdown for the run's description (``mlflow.note.content``).

    ``metrics``: what the run logged (``test/…``, ``best_val_loss``, ``best_epoch``, ``epochs``);
    ``artifacts``: artifact path -> link, key figures first; ``sizes``: examples per split;
    ``images``: artifact path -> image URL of figures to show inline.
    """
    data = config.data
    lines = [f"**{run_name(config)}**: a {_model_phrase(config)}."]
    trained = f"Trained on **{data.dataset}**"
    if sizes:
        trained += (f" ({sizes.get('train', '?')} training / {sizes.get('val', '?')} validation / "
                    f"{sizes.get('test', '?')} test images)")
    optim = config.optim
    trained += f" with {optim.optimizer}, lr {_number(optim.lr)}, batch {optim.batch_size}"
    if "epochs" in metrics or "best_epoch" in metrics:
        trained += (f", {int(metrics.get('epochs', optim.epochs))} of up to {optim.epochs} epochs"
                    + (f" (best epoch {int(metrics['best_epoch'])})" if "best_epoch" in metrics else ""))
    if config.preset:
        trained += f"; preset `{config.preset}`"
    lines.append(trained + ".")
    shown = headline_metrics(run_likelihood_kind(config), metrics)
    if "test/neg_elbo" in shown:  # the test set's number says it; validation's would only repeat it
        shown.pop("val/neg_elbo", None)
    rows = [(label, metrics[key], key) for key, label in shown.items()]
    if rows:
        lines += ["", "| metric | value | key |", "|---|---:|---|"]
        lines += [f"| {label} | {value:.4g} | `{key}` |" for label, value, key in rows]
    if artifacts:
        lines += ["", "Figures: " + " · ".join(f"[{_label(path)}]({link})" for path, link in artifacts.items())]
    for path, url in (images or {}).items():
        lines += ["", f"![{_label(path)}]({url})"]
    return "\n".join(lines)


def _figure_paths(logger: RunLogger) -> list[str]:
    listed = [a.path for a in logger.client.list_artifacts(logger.run_id, "figures") if not a.is_dir]
    return [p for p in KEY_FIGURES if p in listed] + sorted(p for p in listed if p not in KEY_FIGURES)


def describe_run(logger: RunLogger, config: RunConfig, result: "TrainResult",
                 metrics: Mapping[str, float]) -> str:
    """Write ``run_description`` into the run: how training went (``result``), the test ``metrics``
    recorded so far, and links to the figures the run has logged so far."""
    best = result.history[result.best_epoch - 1] if result.history else {}
    summary = {"epochs": len(result.history), "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
               **({"val/neg_elbo": best["val/neg_elbo"]} if "val/neg_elbo" in best else {}), **metrics}
    sizes = {attr: len(getattr(result.splits, attr)) for attr, _ in SPLIT_CONTEXTS}
    experiment_id = logger.experiment_id
    paths = _figure_paths(logger)
    links = {p: artifact_page(experiment_id, logger.run_id, p) for p in paths}
    images = {p: artifact_file(logger.run_id, p) for p in paths if p == EMBEDDED_FIGURE}
    text = run_description(config, summary, links, sizes, images)
    logger.set_tags({MLFLOW_RUN_NOTE: text})
    return text


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
        params = ", ".join(f"{k}={_number(v) if isinstance(v, float) else v}" for k, v in best["params"].items())
        lines += ["", f"Best: [{best['name'] or 'trial-' + str(best['number'])}]({best['link']}) with "
                      f"{objectives[0]} = {best['value']:.4g} ({OBJECTIVES[objectives[0]].describe(kind)})"
                      + (f", {params}" if params else "") + "."]
    elif len(objectives) > 1:
        lines += ["", "A multi-objective study has no single best trial: see `pareto_front.csv`."]
    if registered:
        lines += ["", f"Registered model: `{registered}`."]
    if plots:
        lines += ["", "Plots: " + " · ".join(f"[{_label(p)}]({link})" for p, link in plots.items())]
    return "\n".join(lines)


def describe_study(logger: RunLogger, study_name: str, objectives: Sequence[str], kind: str,
                   trials: Sequence["FrozenTrial"], chosen: Sequence["FrozenTrial"]) -> str:
    """Write ``study_description`` into the study's parent run (call it after the plots are logged).

    ``trials`` and ``chosen`` are the snapshot the summary was made from, so the description names
    the same best trial as the parent run's tags while parallel workers go on.
    """
    from collections import Counter

    client, experiment_id = logger.client, logger.experiment_id
    counts = Counter(t.state.name for t in trials)
    best = None
    if len(objectives) == 1 and chosen:
        trial = chosen[0]
        run_id = str(trial.user_attrs.get("mlflow_run_id", ""))
        name = client.get_run(run_id).data.tags.get(MLFLOW_RUN_NAME, "") if run_id else ""
        best = {"number": trial.number, "value": trial.value, "params": trial.params,
                "name": name, "link": run_page(experiment_id, run_id) if run_id else ""}
    plots = {a.path: artifact_page(experiment_id, logger.run_id, a.path)
             for a in client.list_artifacts(logger.run_id, "plots") if not a.is_dir}
    registered = client.get_run(logger.run_id).data.tags.get("registered_model")
    text = study_description(study_name, counts, objectives, kind, best, plots, registered)
    logger.set_tags({MLFLOW_RUN_NOTE: text})
    return text
