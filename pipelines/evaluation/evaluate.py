"""Evaluation of a trained CVAE on the held-out test set, in nats per example.

What the numbers are depends on the likelihood and the data: the run's tag ``likelihood_kind``
(``cvae.likelihood``) says exact-discrete, exact-binary, cross-entropy or continuous-density.

- ``test/neg_elbo``, ``test/recon``, ``test/kl``: the negative ELBO and its two terms;
- ``test/iwae_nll_k{K}`` (exact kinds) or ``test/iwae_bound_k{K}`` (the others, whose numbers are
  not negative log-probabilities of the data): the importance-weighted bound with K samples per
  example; exact kinds also get ``..._bits_per_dim`` (nats / (D ln 2));
- ``test/active_units`` (posterior-mean variance over the test set > 0.01) and ``test/kl_dim_{i}``;
  the tag ``posterior_collapse`` (``posterior_collapse``: no active unit or KL < 0.1 nats);
- conditional models: ``test/sample_accuracy`` (the auxiliary classifier's accuracy on samples
  conditioned on the test labels), ``test/sample_frechet_distance`` (samples vs real test images
  in the classifier's penultimate features) and ``classifier/test_accuracy``.

Training runs log the cheap part (``log_training_evaluation``: IWAE with TRAINING_IWAE_K samples,
active units, KL per dimension, collapse, and the sample accuracy of one batch of samples);
``evaluate_model`` does all.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import torch

from cvae import CVAE, gaussian_kl
from cvae.evaluation import active_units, iwae_nll, unit_activity
from cvae.likelihood import bits_per_dim, is_exact, likelihood_kind
from pipelines.config import DataConfig, RunConfig, flatten
from pipelines.data import Batcher, DatasetSplits, SplitData, as_unit_floats, load_splits
from pipelines.evaluation.classifier import DEFAULT_EPOCHS, accuracy, get_classifier, judge_samples
from pipelines.metrics import BITS_PER_DIM_SUFFIX, IWAE_NLL, LIKELIHOOD_KIND_TAG, iwae_metric, run_likelihood_kind
from pipelines.models.model_resolution import ResolvedModel, load_cvae
from pipelines.tracking.runs import RunLogger
from pipelines.training.execution import seed_everything
from pipelines.training.train import evaluate_split

log = logging.getLogger(__name__)

DEFAULT_IWAE_K = 1000
# A few seconds for the default MLP on the 10k test images on two CPU cores (2-7 s measured on a busy machine).
TRAINING_IWAE_K = 10
IWAE_BATCH = 250  # test images per IWAE batch: under the mmap limit, as train.EVAL_BATCH
DEFAULT_IMAGES_PER_PASS = 10_000  # decoded images held at once: k is split into chunks to fit
# The IWAE keeps k float64 log-weights per test image of a batch, twice while they are concatenated.
IWAE_BYTES_PER_SAMPLE = IWAE_BATCH * 8 * 2


def iwae_memory_bytes(k: int, images_per_pass: int, pixels: int) -> int:
    """About the memory the IWAE estimate holds at once: the log-weights of a batch, and the decoded
    images of a pass with their inputs (float32)."""
    return k * IWAE_BYTES_PER_SAMPLE + min(images_per_pass, k * IWAE_BATCH) * pixels * 4 * 3
ACTIVE_UNIT_THRESHOLD = 0.01
MAX_KL_DIM_METRICS = 32  # above this, KL per dimension only goes to the JSON artifact
SAMPLE_BATCH = 1000
SAMPLES_AT_TRAINING_END = 1000  # one batch, shared evenly by the classes (100 each of 10)
UNITS_ARTIFACT = "evaluation/latent_units.json"
# Posterior collapse: no latent dimension carries information about x. Either test is enough:
# no active unit, or a total KL (nats per example) too small to encode anything useful.
COLLAPSE_KL_NATS = 0.1
COLLAPSE_TAG = "posterior_collapse"


def posterior_collapse(active: int, kl_nats: float) -> bool:
    """The collapse rule: 0 active units, or a KL below COLLAPSE_KL_NATS nats per example."""
    return active == 0 or kl_nats < COLLAPSE_KL_NATS


def collapse_warning(active: int, kl_nats: float) -> str:
    return (f"posterior collapse: {active} active latent units, KL {kl_nats:.3g} nats per example "
            f"(rule: 0 active units or KL < {COLLAPSE_KL_NATS} nats); the decoder ignores z")


def with_bits_per_dim(metrics: dict[str, float], kind: str, image_shape) -> dict[str, float]:
    """``metrics`` plus ``NAME_bits_per_dim`` for each negative ELBO / IWAE NLL, for exact kinds only
    (bits per dimension of a cross-entropy or of a density would invite false comparisons)."""
    if not is_exact(kind):
        return dict(metrics)
    dims = math.prod(image_shape)
    extra = {f"{name}{BITS_PER_DIM_SUFFIX}": bits_per_dim(value, dims) for name, value in metrics.items()
             if not name.endswith(BITS_PER_DIM_SUFFIX) and (name.endswith("/neg_elbo") or name.startswith(IWAE_NLL))}
    return {**metrics, **extra}


@torch.no_grad()
def latent_statistics(model: CVAE, split: SplitData, batcher: Batcher) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means (N, D) over the split and the mean closed-form KL of each dimension (D,)."""
    model.eval()
    means, kl_sum = [], None
    for x, y in batcher.eval_batches(split, IWAE_BATCH):
        mu, logvar = model.encode(x, y)
        means.append(mu.float())
        batch_kl = gaussian_kl(mu, logvar).double().sum(dim=0)
        kl_sum = batch_kl if kl_sum is None else kl_sum + batch_kl
    return torch.cat(means), kl_sum / len(split)


def iwae_estimate(model: CVAE, split: SplitData, batcher: Batcher, k: int, seed: int,
                  images_per_pass: int = DEFAULT_IMAGES_PER_PASS) -> float:
    """Mean over the split of the IWAE bound of -log p(x), nats per example."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    chunk = max(1, images_per_pass // IWAE_BATCH)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in batcher.eval_batches(split, IWAE_BATCH):
        total += iwae_nll(model, x, y, k, chunk, generator).sum()
    return float(total.item()) / len(split)


def likelihood_metrics(model: CVAE, split: SplitData, batcher: Batcher, k: int, seed: int,
                       images_per_pass: int = DEFAULT_IMAGES_PER_PASS,
                       kind: str | None = None) -> tuple[dict[str, float], dict]:
    """(metrics, details): the IWAE bound (named by ``kind``; exact kinds with bits per dimension),
    active units and KL per dimension; details holds the per-dimension lists for the JSON artifact,
    the likelihood kind and the collapse verdict."""
    kind = kind or likelihood_kind(model.config.likelihood, batcher.binarize)
    means, kl_per_dim = latent_statistics(model, split, batcher)
    activity = unit_activity(means)
    iwae = iwae_estimate(model, split, batcher, k, seed, images_per_pass)
    metrics = with_bits_per_dim({iwae_metric(kind, k): iwae}, kind, model.image_shape)
    metrics["test/active_units"] = float(active_units(means, ACTIVE_UNIT_THRESHOLD))
    if len(kl_per_dim) <= MAX_KL_DIM_METRICS:
        metrics.update({f"test/kl_dim_{i}": float(v) for i, v in enumerate(kl_per_dim.tolist())})
    kl = float(kl_per_dim.sum())
    details = {"active_threshold": ACTIVE_UNIT_THRESHOLD, "active_units": int(metrics["test/active_units"]),
               "kl": kl, "kl_per_dim": kl_per_dim.tolist(), "posterior_mean_variance": activity.tolist(),
               "iwae_k": k, "test_examples": len(split), "likelihood_kind": kind,
               "posterior_collapse": posterior_collapse(int(metrics["test/active_units"]), kl)}
    return metrics, details


def report_collapse(logger: RunLogger | None, details: dict) -> bool:
    """Tag the run ``posterior_collapse=true|false`` and log a one-line warning when collapsed."""
    collapsed = bool(details["posterior_collapse"])
    if logger:
        logger.set_tags({COLLAPSE_TAG: str(collapsed).lower()})
    if collapsed:
        log.warning(collapse_warning(details["active_units"], details["kl"]))
    return collapsed


@torch.no_grad()
def conditional_samples(model: CVAE, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """One sample per label, in [0, 1], (N, C, H, W)."""
    generator = torch.Generator(device=labels.device).manual_seed(seed)
    return torch.cat([model.sample(labels[s: s + SAMPLE_BATCH], 1, generator=generator)
                      for s in range(0, len(labels), SAMPLE_BATCH)])


def sample_quality_metrics(model: CVAE, splits: DatasetSplits, data: DataConfig, device: torch.device,
                           seed: int, classifier_train_size: int, classifier_epochs: int) -> dict[str, float]:
    """Samples conditioned on the test labels, judged against the real (non-binarized) test images."""
    classifier = get_classifier(data, device, classifier_train_size, classifier_epochs)
    labels = splits.test.labels
    samples = conditional_samples(model, labels, seed)
    judged = judge_samples(classifier.net, samples, labels, as_unit_floats(splits.test.images))
    return {"test/sample_accuracy": judged["accuracy"],
            "test/sample_frechet_distance": judged["frechet_distance"],
            "classifier/test_accuracy": classifier.test_accuracy}


def evaluate_model(resolved: ResolvedModel, device: torch.device, logger: RunLogger | None = None,
                   k: int = DEFAULT_IWAE_K, limit_test: int | None = None, data_dir: str = "",
                   images_per_pass: int = DEFAULT_IMAGES_PER_PASS, seed: int = 0,
                   classifier_train_size: int = 0, classifier_epochs: int = DEFAULT_EPOCHS,
                   model: CVAE | None = None) -> dict[str, float]:
    """The full report for a logged model (``model``: the one ``resolved`` names, already loaded),
    logged to ``logger``'s run when given."""
    config = resolved.config
    data = config.data
    if limit_test is not None:
        data = replace(data, limit_test=limit_test)
    if data_dir:
        data = replace(data, data_dir=data_dir)
    config = replace(config, data=data)
    seed_everything(seed)  # the ELBO's single-sample z draws from the global generators
    model = model if model is not None else load_cvae(resolved, device)
    splits = load_splits(data, device)
    batcher = Batcher(data.binarize, seed, device)
    kind = run_likelihood_kind(config)
    elbo = evaluate_split(model, splits.test, batcher, config, device)
    metrics = with_bits_per_dim({"test/neg_elbo": elbo["neg_elbo"], "test/recon": elbo["recon"],
                                 "test/kl": elbo["kl"]}, kind, model.image_shape)
    likelihood, details = likelihood_metrics(model, splits.test, batcher, k, seed, images_per_pass, kind)
    metrics.update(likelihood)
    if model.conditional:
        metrics.update(sample_quality_metrics(model, splits, data, device, seed, classifier_train_size,
                                              classifier_epochs))
    if logger:
        logger.log_params({**flatten(config), "evaluate.k": k, "evaluate.seed": seed,
                           "evaluate.model_uri": resolved.model_uri,
                           "evaluate.classifier_train_size": classifier_train_size,
                           "evaluate.classifier_epochs": classifier_epochs})
        logger.set_tags({"evaluated_model_uri": resolved.model_uri,
                         "evaluated_model_id": resolved.model_id or "",
                         "source_run_id": resolved.source_run_id or "", "dataset": data.dataset,
                         LIKELIHOOD_KIND_TAG: kind, **({"preset": config.preset} if config.preset else {})})
        logger.log_metrics(metrics, step=0)
        logger.log_dict(details, UNITS_ARTIFACT)
    report_collapse(logger, details)
    return metrics


def training_sample_accuracy(model: CVAE, splits: DatasetSplits, data: DataConfig, logger: RunLogger,
                             seed: int) -> dict[str, float]:
    """Classifier-judged accuracy of one batch of conditional samples: SAMPLES_AT_TRAINING_END, as
    many of each class (rounded up to a whole number per class). The judge is the cached classifier
    trained on as many training images as the run (data.limit_train), so a quick run pays for a
    quick classifier only."""
    device = next(model.parameters()).device
    classifier = get_classifier(data, device, data.limit_train, DEFAULT_EPOCHS, client=logger.client)
    per_class = math.ceil(SAMPLES_AT_TRAINING_END / splits.num_classes)
    labels = torch.arange(splits.num_classes, device=device).repeat(per_class)
    samples = conditional_samples(model, labels, seed)
    return {"test/sample_accuracy": accuracy(classifier.net, samples, labels),
            "classifier/test_accuracy": classifier.test_accuracy}


def log_training_evaluation(logger: RunLogger, model: CVAE, splits: DatasetSplits, batcher: Batcher,
                            config: RunConfig, step: int,
                            images_per_pass: int = DEFAULT_IMAGES_PER_PASS,
                            sample_accuracy: bool = True) -> dict[str, float]:
    """The cheap part, at the end of training, so the UI can sort runs by it; tags the likelihood
    kind and posterior collapse (with a one-line warning)."""
    kind = run_likelihood_kind(config)
    metrics, details = likelihood_metrics(model, splits.test, batcher, TRAINING_IWAE_K, config.execution.seed,
                                          images_per_pass, kind)
    # The judge classifier is cached in the tracking store: not reachable from a spool (tracking
    # server lost), so a spooled run goes without `test/sample_accuracy` (`evaluate` gives it later).
    if sample_accuracy and model.conditional and not logger.spooled:
        metrics.update(training_sample_accuracy(model, splits, config.data, logger, config.execution.seed))
    logger.log_metrics(metrics, step=step)
    logger.log_dict(details, UNITS_ARTIFACT)
    logger.set_tags({LIKELIHOOD_KIND_TAG: kind})
    report_collapse(logger, details)
    return metrics


def summary_line(run_id: str, model_uri: str, metrics: dict[str, float]) -> str:
    shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items() if "/kl_dim_" not in name)
    return f"evaluate run {run_id} for {model_uri}: {shown}"
