"""What a person browsing MLflow sees first about a run: its name, and the note on its page.

- ``run_name(config)``: ``mlp z=16 β=1``, ``conv z=16 β=0.5 lr=3e-4``; a trial's is
  ``trial-7 · conv z=8 β=1``.
- ``run_description(config, metrics, artifacts)``: the short markdown note on the run's page
  (what was trained, headline metrics with what they bound, links to the key figures).

The ``*_description`` and ``*_name`` functions are pure; ``describe_run`` and ``name_trial``
write what they return into a run.
"""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Mapping
from urllib.parse import quote, urlencode

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE

from pipelines.config import RunConfig
from pipelines.metrics import headline_metrics, run_likelihood_kind
from pipelines.presets import preset_config
from pipelines.tracking.datasets import SPLIT_CONTEXTS
from pipelines.tracking.runs import RunLogger
from pipelines.training.train import TrainResult

# Conditioning -> what the name says after the architecture ("mlp", "conv-decoder", "mlp-vae").
CONDITIONING_SUFFIX = {"concat": "", "channel": "-channel", "decoder": "-decoder", "none": "-vae"}
# Figures linked first, in this order; any other figure of the run follows.
KEY_FIGURES = ("figures/loss_curves.png", "figures/latent_scatter_test.png", "figures/reconstructions.png",
               "figures/class_samples.png", "figures/samples.png")
EMBEDDED_FIGURE = "figures/latent_scatter_test.png"


def short_number(value: float) -> str:
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
    parts = [label, f"z={model.latent_dim}", f"β={short_number(config.objective.kl_weight)}"]
    if config.optim.lr != base.optim.lr:
        parts.append(f"lr={short_number(config.optim.lr)}")
    return " ".join(parts)


def trial_run_name(number: int, config: RunConfig) -> str:
    return f"trial-{number} · {run_name(config)}"


def name_trial(logger: RunLogger, number: int, config: RunConfig) -> None:
    """A trial's run is created before its configuration is drawn; name it once it is known."""
    logger.set_tags({MLFLOW_RUN_NAME: trial_run_name(number, config)})


# --- the run's page ---------------------------------------------------------------------------------

def run_page(experiment_id: str, run_id: str) -> str:
    """A link to a run's page, relative to the MLflow UI (works under any host and --static-prefix)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def artifact_page(experiment_id: str, run_id: str, path: str) -> str:
    return f"{run_page(experiment_id, run_id)}/artifacts/{quote(path)}"


def artifact_file(run_id: str, path: str) -> str:
    """The artifact's bytes as the tracking server serves them (for images inside a description)."""
    return "get-artifact?" + urlencode({"path": path, "run_uuid": run_id})


def artifact_label(path: str) -> str:
    return PurePosixPath(path).stem.replace("_", " ")


def _model_phrase(config: RunConfig) -> str:
    model = config.model
    conditioning = {"concat": "label concatenated to encoder and decoder inputs",
                    "channel": "label as extra encoder channels", "decoder": "label at the decoder only",
                    "none": "unconditional"}.get(model.conditioning, model.conditioning)
    shape = ("hidden " + "-".join(map(str, model.hidden))) if model.arch == "mlp" else model.arch
    kind = "VAE" if model.conditioning == "none" else "conditional VAE"
    return (f"{kind} ({model.arch}, {shape}; {conditioning}), {model.latent_dim}-D latent, "
            f"{model.likelihood} likelihood, β = {short_number(config.objective.kl_weight)}")


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
    trained += f" with {optim.optimizer}, lr {short_number(optim.lr)}, batch {optim.batch_size}"
    if "epochs" in metrics or "best_epoch" in metrics:
        trained += (f", {int(metrics.get('epochs', optim.epochs))} of up to {optim.epochs} epochs"
                    + (f" (best epoch {int(metrics['best_epoch'])})" if "best_epoch" in metrics else ""))
        if "kept_epoch" in metrics and metrics["kept_epoch"] != metrics.get("best_epoch"):
            trained += f", keeping the weights of epoch {int(metrics['kept_epoch'])}"
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
        lines += ["", "Figures: " + " · ".join(f"[{artifact_label(path)}]({link})" for path, link in artifacts.items())]
    for path, url in (images or {}).items():
        lines += ["", f"![{artifact_label(path)}]({url})"]
    return "\n".join(lines)


def _figure_paths(logger: RunLogger) -> list[str]:
    listed = [a.path for a in logger.call(lambda client: client.list_artifacts(logger.run_id, "figures"))
              if not a.is_dir]
    return [p for p in KEY_FIGURES if p in listed] + sorted(p for p in listed if p not in KEY_FIGURES)


def describe_run(logger: RunLogger, config: RunConfig, result: TrainResult,
                 metrics: Mapping[str, float]) -> str:
    """Write ``run_description`` into the run: how training went (``result``), the test ``metrics``
    recorded so far, and links to the figures the run has logged so far."""
    kept = result.history[result.kept_epoch - 1] if result.history else {}
    summary = {"epochs": len(result.history), "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
               "kept_epoch": result.kept_epoch,
               **({"val/neg_elbo": kept["val/neg_elbo"]} if "val/neg_elbo" in kept else {}), **metrics}
    sizes = {attr: len(getattr(result.splits, attr)) for attr, _ in SPLIT_CONTEXTS}
    experiment_id = logger.experiment_id
    paths = _figure_paths(logger)
    links = {p: artifact_page(experiment_id, logger.run_id, p) for p in paths}
    images = {p: artifact_file(logger.run_id, p) for p in paths if p == EMBEDDED_FIGURE}
    text = run_description(config, summary, links, sizes, images)
    logger.set_tags({MLFLOW_RUN_NOTE: text})
    return text
