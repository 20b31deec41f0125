"""Recording what a finished model is: test metrics, figures, evaluation, the model, the manifest.

One function, ``record_run``, with a level of detail the caller chooses:

- ``FULL``: everything; what the `train` entry point and `reproduce` record for a run a user started.
- ``TRIAL``: what every study trial keeps besides its params and per-epoch metrics: the model
  (reloadable, reproducible) and the manifest. No test-set metrics: trials are compared on
  validation, and the test set is kept for the model the study chooses.
- ``BEST_TRIAL``: what a trial chosen by the study gets on top of ``TRIAL``, once, when the study
  ends: test metrics, figures, evaluation and the generator model.

Training never imports this module; this module imports training.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pipelines.config import RunConfig
from pipelines.data import DatasetSplits, SplitData
from pipelines.evaluation.evaluate import log_training_evaluation, run_likelihood_kind, with_bits_per_dim
from pipelines.models.model_io import log_generator, log_model
from pipelines.recording.manifest import log_manifest
from pipelines.recording.run_description import describe_run
from pipelines.recording.run_figures import figure_builders
from pipelines.tracking.runs import RunLogger
from pipelines.training.train import TrainResult, evaluate_split

# The end-of-run IWAE and active units use this many test images: a few seconds even for a
# convolutional decoder on a CPU. `evaluate` gives the full-test-set report.
TRAINING_EVAL_IMAGES = 1000
# Decoded images held at once by that IWAE: small enough that a conv decoder's activations stay
# in the allocator's heap instead of being mapped and unmapped for every chunk (see train.EVAL_BATCH).
TRAINING_EVAL_IMAGES_PER_PASS = 250
DETAIL_TAG = "recorded"


@dataclass(frozen=True)
class Detail:
    name: str
    test_metrics: bool
    figures: bool
    evaluation: bool
    model: bool
    generator: bool
    manifest: bool


FULL = Detail("full", test_metrics=True, figures=True, evaluation=True, model=True, generator=True, manifest=True)
TRIAL = Detail("trial", test_metrics=False, figures=False, evaluation=False, model=True, generator=False,
               manifest=True)
BEST_TRIAL = Detail("best-trial", test_metrics=True, figures=True, evaluation=True, model=False, generator=True,
                    manifest=False)


@dataclass
class Recorded:
    metrics: dict[str, float]  # what this call logged (test/...)
    model_uri: str | None = None
    model_id: str | None = None


def held_out_test_metrics(result: TrainResult, config: RunConfig) -> dict[str, float]:
    """The loss terms of the kept weights (``result.kept_epoch``) on the whole held-out test set, nats per example."""
    terms = evaluate_split(result.model, result.splits.test, result.batcher, config, result.device)
    return {f"test/{name}": value for name, value in terms.items()}


def evaluation_splits(splits: DatasetSplits, images: int = TRAINING_EVAL_IMAGES) -> DatasetSplits:
    """The splits with the test set cut to its first ``images`` examples (named so, for the record)."""
    test = splits.test
    if len(test) <= images:
        return splits
    subset = SplitData(f"test[:{images}]", test.images[:images], test.labels[:images])
    return replace(splits, test=subset)


def record_run(logger: RunLogger, result: TrainResult, config: RunConfig, detail: Detail = FULL) -> Recorded:
    """Log what ``detail`` asks for about the finished model of ``result`` into ``logger``'s run."""
    recorded = Recorded(metrics={})
    model = result.model.eval()
    if detail.test_metrics:
        recorded.metrics.update(with_bits_per_dim(held_out_test_metrics(result, config), run_likelihood_kind(config),
                                                  result.splits.image_shape))
        logger.log_metrics(recorded.metrics, step=result.kept_epoch)
    if detail.figures:
        with torch.no_grad():
            for path, draw in figure_builders(model, result.splits, result.batcher, result.history,
                                              preset=config.preset).items():
                logger.log_figure(draw(), path)
    if detail.evaluation:
        recorded.metrics.update(log_training_evaluation(
            logger, model, evaluation_splits(result.splits), result.batcher, config, step=result.kept_epoch,
            images_per_pass=TRAINING_EVAL_IMAGES_PER_PASS))
    if detail.model:
        info = log_model(logger, model, config, result.splits.class_names)
        recorded.model_uri, recorded.model_id = info.model_uri, info.model_id
        logger.set_tags({"model_uri": info.model_uri})
    if detail.generator:
        log_generator(logger, model, config, result.splits.class_names)
    if detail.manifest:
        log_manifest(logger, config, result, recorded.metrics, recorded.model_uri, recorded.model_id)
    logger.set_tags({DETAIL_TAG: detail.name})
    describe_run(logger, config, result, recorded.metrics)
    return recorded
