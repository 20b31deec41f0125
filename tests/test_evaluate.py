"""`evaluate`: the cheap metrics of a training run, the full report through `mlflow run -e evaluate`
and the CLI, the three model_uri forms, and the cached auxiliary classifier."""
from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import SHARED_RUN_LATENT_DIM, Store, assert_no_running
from pipelines.config import DataConfig
from pipelines.data import as_unit_floats, load_splits
from pipelines.errors import UserError
from pipelines.evaluation.classifier import CLASSIFIER_EXPERIMENT, cache_key, get_classifier, judge_samples
from pipelines.evaluation.evaluate import (
    TRAINING_IWAE_K,
    UNITS_ARTIFACT,
    collapse_warning,
    evaluate_model,
    iwae_metric,
    posterior_collapse,
    with_bits_per_dim,
)
from pipelines.models.model_resolution import resolve_model

LATENT_DIM = SHARED_RUN_LATENT_DIM
CLASSIFIER = {"classifier_train_size": "3000", "classifier_epochs": "2"}  # seconds, not the full one
EVAL_K = 20
REGISTERED = "cvae-evaluate-test"


@pytest.fixture(scope="module")
def in_store(conditional_run):
    """Point this process's MLflow at the module's store (model loading uses the global URI)."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(conditional_run.store.uri)
    yield conditional_run.store.client
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def classifier(conditional_run, in_store):
    """The quick classifier, trained once in-process so the entry points below find it cached."""
    data = DataConfig(dataset="fashion-mnist", data_dir=str(conditional_run.data_dir))
    return get_classifier(data, torch.device("cpu"), train_size=int(CLASSIFIER["classifier_train_size"]),
                          epochs=int(CLASSIFIER["classifier_epochs"]), client=in_store)


def register_with_alias(client, run) -> None:
    """Version 1 of REGISTERED, aliased 'champion', is the training run's model (once per module)."""
    if client.search_registered_models(f"name = '{REGISTERED}'"):
        return
    model_uri = run.data.tags["model_uri"]
    client.create_registered_model(REGISTERED)
    version = client.create_model_version(REGISTERED, model_uri, run_id=run.info.run_id,
                                          model_id=model_uri[len("models:/"):])
    client.set_registered_model_alias(REGISTERED, "champion", version.version)


def classifier_runs(store: Store, train_size: str = CLASSIFIER["classifier_train_size"]):
    """The classifier runs trained on ``train_size`` images (the training run's end-of-run sample
    accuracy has its own, trained on as many images as that run)."""
    client = store.client
    experiment = client.get_experiment_by_name(CLASSIFIER_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [run for run in runs if run.data.tags.get("train_size") == train_size]


def evaluation_runs(store: Store):
    return store.runs("tags.evaluated_model_uri != ''")


# --- the cheap part, logged by training -----------------------------------------------------------

@pytest.mark.slow
def test_training_run_logs_iwae_active_units_and_kl_per_dimension(conditional_run):
    metrics, tags = conditional_run.run.data.metrics, conditional_run.run.data.tags
    # Bernoulli on grayscale pixels: a cross-entropy, so no metric is called an NLL or given in bits/dim.
    assert tags["likelihood_kind"] == "cross-entropy"
    assert not any("nll" in name or name.endswith("_bits_per_dim") for name in metrics), sorted(metrics)
    iwae = metrics[f"test/iwae_bound_k{TRAINING_IWAE_K}"]
    assert iwae <= metrics["test/neg_elbo"] * 1.01  # a bound at least about as tight as the ELBO
    assert tags["posterior_collapse"] == str(metrics["test/active_units"] == 0 or metrics["test/kl"] < 0.1).lower()
    # One batch of conditional samples judged at the end of training, by a classifier trained on
    # as many images as the run (TINY_PARAMS: 1000), cached in the store.
    assert 0.0 <= metrics["test/sample_accuracy"] <= 1.0 and 0.1 < metrics["classifier/test_accuracy"] <= 1.0
    assert len(classifier_runs(conditional_run.store, train_size="1000")) == 1
    assert 0 <= metrics["test/active_units"] <= LATENT_DIM
    kl_dims = [metrics[f"test/kl_dim_{i}"] for i in range(LATENT_DIM)]
    assert sum(kl_dims) == pytest.approx(metrics["test/kl"], rel=1e-4)  # same closed form, two routes
    store, run_id = conditional_run.store, conditional_run.run.info.run_id
    units = store.client.download_artifacts(run_id, UNITS_ARTIFACT, str(store.root))
    details = json.loads(Path(units).read_text())
    assert details["active_units"] == metrics["test/active_units"]
    assert len(details["posterior_mean_variance"]) == LATENT_DIM
    assert tags["generator_model_uri"].startswith("models:/") and tags["generator_model_uri"] != tags["model_uri"]


# --- model_uri forms ------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_three_model_uri_forms_resolve_to_the_same_model(conditional_run, in_store):
    run_id = conditional_run.run.info.run_id
    model_uri = conditional_run.run.data.tags["model_uri"]
    model_id = model_uri[len("models:/"):]
    register_with_alias(in_store, conditional_run.run)
    for spec in (model_uri, f"models:/{REGISTERED}@champion", f"models:/{REGISTERED}/1", run_id):
        resolved = resolve_model(spec, in_store)
        assert (resolved.model_uri, resolved.model_id, resolved.source_run_id) == (model_uri, model_id, run_id), spec
        assert resolved.config.model.latent_dim == LATENT_DIM and resolved.config.data.limit_test == 500


@pytest.mark.slow
@pytest.mark.parametrize("spec, reason", [
    ("0" * 32, "no run has this id"),
    ("models:/m-doesnotexist", "no logged model"),
    ("models:/nobody@champion", "not valid"),
    ("runs-are-not-like-this", "unrecognised form"),
    ("", "model_uri is required"),
])
def test_bad_model_uris_are_user_errors_naming_the_parameter(conditional_run, in_store, spec, reason):
    with pytest.raises(UserError, match=reason) as caught:
        resolve_model(spec, in_store)
    assert "model_uri" in str(caught.value)


@pytest.mark.slow
def test_the_generator_is_refused_as_the_model_to_evaluate(conditional_run, in_store):
    with pytest.raises(UserError, match="generator"):
        resolve_model(conditional_run.run.data.tags["generator_model_uri"], in_store)


# --- the auxiliary classifier -----------------------------------------------------------------------

@pytest.mark.slow
def test_classifier_is_logged_as_its_own_model_with_its_cache_key(conditional_run, classifier):
    (run,) = classifier_runs(conditional_run.store)
    assert run.info.status == "FINISHED" and run.info.run_id == classifier.run_id
    tags = run.data.tags
    assert tags["dataset"] == "fashion-mnist" and tags["train_size"] == "3000" and tags["epochs"] == "2"
    assert tags["cache_key"] == cache_key("fashion-mnist", (1, 28, 28), 10, 3000, 2) != cache_key(
        "fashion-mnist", (1, 28, 28), 10, 0, 2)
    assert float(tags["test_accuracy"]) == pytest.approx(classifier.test_accuracy, abs=1e-4)
    assert 0.5 < classifier.test_accuracy < 1.0  # 3000 images, two epochs: well above chance
    assert tags["model_uri"] == classifier.model_uri


@pytest.mark.slow
def test_classifier_metrics_on_real_images_and_on_noise(conditional_run, classifier):
    splits = load_splits(DataConfig(dataset="fashion-mnist", data_dir=str(conditional_run.data_dir), limit_train=10),
                         torch.device("cpu"))
    real, labels = as_unit_floats(splits.test.images), splits.test.labels
    itself = judge_samples(classifier.net, real, labels, real)
    assert itself["accuracy"] == pytest.approx(classifier.test_accuracy, abs=1e-9)
    assert itself["frechet_distance"] == pytest.approx(0.0, abs=1e-6)

    halves = judge_samples(classifier.net, real[:5000], labels[:5000], real[5000:])
    noise = torch.rand(real[:1000].shape, generator=torch.Generator().manual_seed(0))
    judged_noise = judge_samples(classifier.net, noise, labels[:1000], real)
    assert judged_noise["accuracy"] < 0.3  # chance is 0.1; noise is all one class or a few
    assert judged_noise["frechet_distance"] > 20 * max(halves["frechet_distance"], 1e-3)


# --- the entry point ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_by_run_id_through_mlflow_run_reuses_the_cached_classifier(conditional_run, classifier):
    before = evaluation_runs(conditional_run.store)
    done = conditional_run.store.mlflow_run("evaluate", {"model_uri": conditional_run.run.info.run_id, "k": str(EVAL_K),
                                                 **CLASSIFIER})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained the" not in done.stdout + done.stderr  # the cached classifier was loaded
    assert len(classifier_runs(conditional_run.store)) == 1
    (run,) = [r for r in evaluation_runs(conditional_run.store) if r.info.run_id not in {b.info.run_id for b in before}]
    assert run.info.status == "FINISHED"
    summary = [line for line in done.stdout.splitlines() if line.startswith("evaluate run ")]
    assert len(summary) == 1 and run.info.run_id in summary[0] and f"test/iwae_bound_k{EVAL_K}" in summary[0]

    metrics, trained_metrics = run.data.metrics, conditional_run.run.data.metrics
    assert run.data.tags["likelihood_kind"] == "cross-entropy" and "posterior_collapse" in run.data.tags
    names = {"test/neg_elbo", "test/recon", "test/kl", f"test/iwae_bound_k{EVAL_K}", "test/active_units",
             "test/sample_accuracy", "test/sample_frechet_distance", "classifier/test_accuracy",
             *(f"test/kl_dim_{i}" for i in range(LATENT_DIM))}
    assert names <= set(metrics), names - set(metrics)
    assert metrics["test/neg_elbo"] == pytest.approx(trained_metrics["test/neg_elbo"], rel=0.01)
    assert metrics["test/kl"] == pytest.approx(trained_metrics["test/kl"], rel=1e-4)
    assert metrics["test/active_units"] == trained_metrics["test/active_units"]
    assert metrics[f"test/iwae_bound_k{EVAL_K}"] <= metrics["test/neg_elbo"] * 1.01
    assert 0.0 <= metrics["test/sample_accuracy"] <= 1.0 and metrics["test/sample_frechet_distance"] > 0
    assert metrics["classifier/test_accuracy"] == pytest.approx(classifier.test_accuracy, abs=1e-9)
    tags = run.data.tags
    assert tags["evaluated_model_uri"] == conditional_run.run.data.tags["model_uri"]
    assert tags["source_run_id"] == conditional_run.run.info.run_id
    assert run.data.params["model.latent_dim"] == str(LATENT_DIM)  # sortable like the training runs


@pytest.mark.slow
def test_evaluate_by_alias_on_the_cli_matches_the_in_process_report(conditional_run, classifier, in_store):
    register_with_alias(in_store, conditional_run.run)
    done = conditional_run.store.cli("pipelines.entrypoints.evaluate", "--model-uri", f"models:/{REGISTERED}@champion",
                             "--k", str(EVAL_K), "--limit-test", "200",
                             "--classifier-train-size", CLASSIFIER["classifier_train_size"],
                             "--classifier-epochs", CLASSIFIER["classifier_epochs"])
    assert done.returncode == 0, done.stderr[-3000:]
    run = conditional_run.store.client.get_run(done.stdout.strip().splitlines()[-1].split()[2])
    assert run.data.params["data.limit_test"] == "200"
    assert len(classifier_runs(conditional_run.store)) == 1

    in_process = evaluate_model(resolve_model(conditional_run.run.data.tags["model_uri"], in_store), torch.device("cpu"),
                                k=EVAL_K, limit_test=200, data_dir=str(conditional_run.data_dir),
                                classifier_train_size=int(CLASSIFIER["classifier_train_size"]),
                                classifier_epochs=int(CLASSIFIER["classifier_epochs"]))
    assert run.data.metrics == pytest.approx(in_process, rel=1e-9)  # same seed, same model, same report


@pytest.mark.slow
def test_evaluate_with_a_bad_model_uri_fails_in_one_line_without_a_run(conditional_run):
    before = len(conditional_run.store.runs())
    done = conditional_run.store.cli("pipelines.entrypoints.evaluate", "--model-uri", "models:/m-doesnotexist")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: model_uri='models:/m-doesnotexist' is not valid")
    assert len(conditional_run.store.runs()) == before
    assert_no_running(conditional_run.store)


# --- the rules behind the tags and names --------------------------------------------------------

@pytest.mark.parametrize("active, kl, collapsed", [
    (0, 5.0, True),  # no active unit: the KL is spread as noise the decoder ignores
    (3, 0.05, True),  # KL under 0.1 nats: z carries next to nothing about x
    (1, 0.1, False),
    (2, 12.0, False),
])
def test_posterior_collapse_rule(active, kl, collapsed):
    assert posterior_collapse(active, kl) is collapsed
    assert ("0 active" in collapse_warning(0, kl)) and collapse_warning(active, kl).startswith("posterior collapse")
    assert len(collapse_warning(active, kl).splitlines()) == 1


def test_bits_per_dim_only_for_exact_likelihoods_and_nll_names_only_for_them():
    nats = {"test/neg_elbo": 100.0, "test/iwae_nll_k10": 90.0, "test/recon": 80.0}
    exact = with_bits_per_dim(nats, "exact-discrete", (1, 28, 28))
    assert exact["test/neg_elbo_bits_per_dim"] == pytest.approx(100.0 / (784 * math.log(2)))
    assert exact["test/iwae_nll_k10_bits_per_dim"] == pytest.approx(90.0 / (784 * math.log(2)))
    assert "test/recon_bits_per_dim" not in exact
    assert with_bits_per_dim(nats, "cross-entropy", (1, 28, 28)) == nats
    assert with_bits_per_dim(nats, "continuous-density", (1, 28, 28)) == nats
    assert iwae_metric("exact-binary", 10) == "test/iwae_nll_k10"
    assert iwae_metric("cross-entropy", 10) == iwae_metric("continuous-density", 10) == "test/iwae_bound_k10"


@pytest.mark.parametrize("likelihood, binarize, bits", [("discretized_logistic", "none", True),
                                                         ("bernoulli", "none", False)])
def test_a_colour_model_on_8_bit_data_reports_bits_per_dim_over_c_h_w(likelihood, binarize, bits):
    import cvae
    from cvae import ModelConfig
    from pipelines.data import Batcher, SplitData
    from pipelines.evaluation.evaluate import likelihood_metrics

    shape = (3, 20, 24)
    torch.manual_seed(0)
    model = cvae.build(ModelConfig(arch="conv", channels=(4, 8), latent_dim=2, conditioning="decoder",
                                   likelihood=likelihood), shape, 3).eval()
    images = torch.randint(0, 256, (12, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    split = SplitData("test", images, torch.arange(12) % 3)
    metrics, details = likelihood_metrics(model, split, Batcher(binarize, 0, torch.device("cpu")), k=4, seed=0)
    if bits:  # exact-discrete: an NLL bound, and bits/dim over D = 3 * 20 * 24 = 1440 dimensions
        assert details["likelihood_kind"] == "exact-discrete"
        assert metrics["test/iwae_nll_k4_bits_per_dim"] == pytest.approx(
            metrics["test/iwae_nll_k4"] / (1440 * math.log(2)))
        # uniform 8-bit noise: no model codes it below 8 bits/dim; an untrained net is not far above
        assert 8 < metrics["test/iwae_nll_k4_bits_per_dim"] < 12
    else:  # a Bernoulli cross-entropy of colour levels: a bound of that, and no bits/dim
        assert details["likelihood_kind"] == "cross-entropy"
        assert "test/iwae_bound_k4" in metrics and not any(name.endswith("_bits_per_dim") for name in metrics)


COLLAPSED = {"posterior_collapse": True, "active_units": 0, "kl": 0.01}


def test_the_harness_logs_where_a_library_user_sends_it():
    import logging

    from pipelines.evaluation.evaluate import report_collapse

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    harness = logging.getLogger("pipelines")
    harness.addHandler(handler)
    try:
        report_collapse(None, COLLAPSED)
    finally:
        harness.removeHandler(handler)
    assert [(r.levelname, r.getMessage()) for r in records] == [("WARNING", collapse_warning(0, 0.01))]


def test_as_a_library_the_harness_prints_nothing_by_itself():
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, "-c", "from pipelines.evaluation.evaluate import report_collapse; "
                           f"report_collapse(None, {COLLAPSED!r})"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and (done.stdout, done.stderr) == ("", ""), done.stderr[-2000:]
