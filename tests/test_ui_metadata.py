"""What the MLflow UI shows about runs: names, descriptions, datasets, source, experiment kind, params;
and one-line errors for unknown parameters."""
import argparse
import importlib
import re
import sys

import pytest
import yaml

from conftest import EXPERIMENT, REPO, TINY_DATA, TINY_PARAMS, make_store
from pipelines.config import RunConfig, field_index, with_overrides
from pipelines.presets import preset_config
from pipelines.recording.run_description import run_description, run_name, trial_run_name
from pipelines.studies.study_description import study_description
from pipelines.tracking.runs import EXPERIMENT_KIND_TAG, MACHINE_LEARNING_KIND

NOTE = "mlflow.note.content"


@pytest.mark.parametrize("config, name", [
    (with_overrides(RunConfig(), {"kl_weight": 1}), "mlp z=16 β=1"),
    (preset_config("mlp-concat"), "mlp-concat z=2 β=1"),
    (with_overrides(RunConfig(), {"arch": "conv", "kl_weight": 0.5, "lr": 3e-4}), "conv z=16 β=0.5 lr=3e-4"),
    (with_overrides(RunConfig(), {"conditioning": "none", "latent_dim": 2, "kl_weight": 1}), "mlp-vae z=2 β=1"),
    (with_overrides(RunConfig(), {"arch": "conv", "conditioning": "decoder", "kl_weight": 2}), "conv-decoder z=16 β=2"),
    (with_overrides(RunConfig(), {"kl_weight": 1e-4, "lr": 5e-4}), "mlp z=16 β=1e-4 lr=5e-4"),
    # The preset's learning rate is not news; another one is. A preset whose model was replaced
    # is not named after it.
    (with_overrides(preset_config("mlp-concat"), {"lr": 1e-3}), "mlp-concat z=2 β=1 lr=1e-3"),
    (with_overrides(preset_config("mlp-concat"), {"arch": "conv"}), "conv z=2 β=1"),
])
def test_run_name_says_what_was_trained(config, name):
    assert run_name(config) == name


def test_trial_name_has_the_trial_number_and_its_model():
    config = with_overrides(RunConfig(), {"arch": "conv", "latent_dim": 8, "kl_weight": 1})
    assert trial_run_name(7, config) == "trial-7 · conv z=8 β=1"


def test_run_description_has_model_data_metrics_with_units_and_figure_links():
    config = with_overrides(RunConfig(), {"dataset": "fashion-mnist", "latent_dim": 2, "epochs": 3, "kl_weight": 1})
    metrics = {"test/neg_elbo": 250.123, "test/recon": 240.0, "test/kl": 10.123, "best_val_loss": 251.0,
               "best_epoch": 3, "epochs": 3, "val/neg_elbo": 251.0}
    links = {"figures/loss_curves.png": "#/experiments/1/runs/abc/artifacts/figures/loss_curves.png"}
    text = run_description(config, metrics, links, sizes={"train": 1000, "val": 300, "test": 500},
                           images={"figures/latent_scatter_test.png": "get-artifact?path=x"})
    assert text.startswith("**mlp z=2 β=1**: a conditional VAE")
    assert "fashion-mnist" in text and "1000 training / 300 validation / 500 test images" in text
    assert "3 of up to 3 epochs (best epoch 3)" in text
    # Bernoulli on non-binary pixels (the default): a cross-entropy, and the page says so.
    assert ("| test negative ELBO (bound on a Bernoulli cross-entropy of non-binary pixels, not −log p(x), nats per "
            "example) | 250.1 | `test/neg_elbo` |") in text
    assert "`val/neg_elbo`" not in text  # the test set's number is shown; validation's would repeat it
    assert "[loss curves](#/experiments/1/runs/abc/artifacts/figures/loss_curves.png)" in text
    assert "![latent scatter test](get-artifact?path=x)" in text


@pytest.mark.parametrize("binarize, iwae, bound", [
    ("none", "test/iwae_bound_k10", "bound on a Bernoulli cross-entropy of non-binary pixels, not −log p(x)"),
    ("static", "test/iwae_nll_k10", "upper bound on −log p(x)"),
])
def test_the_run_page_shows_the_iwae_the_run_logged_and_says_what_it_bounds(binarize, iwae, bound):
    config = with_overrides(RunConfig(), {"binarize": binarize})
    metrics = {"test/neg_elbo": 250.0, iwae: 245.0, f"{iwae}_bits_per_dim": 0.45, "test/kl": 10.0}
    text = run_description(config, metrics, {})
    assert f"| test IWAE, k=10 ({bound}, nats per example) | 245 | `{iwae}` |" in text
    assert f"| test negative ELBO ({bound}, nats per example) | 250 | `test/neg_elbo` |" in text
    assert "_bits_per_dim" not in text


def test_study_description_links_the_best_trial_and_the_plots():
    text = study_description("smoke", {"COMPLETE": 2, "PRUNED": 1}, ["neg_elbo"], "cross-entropy",
                             {"number": 1, "value": 280.5, "params": {"latent_dim": 8, "lr": 3e-4},
                              "name": "trial-1 · conv z=8 β=1", "link": "#/experiments/1/runs/r1"},
                             {"plots/slice.html": "#/experiments/1/runs/p/artifacts/plots/slice.html"},
                             registered="models:/smoke@best")
    assert "**Optuna study `smoke`**: 3 trials (2 complete, 1 pruned, 0 fail)" in text
    assert "[trial-1 · conv z=8 β=1](#/experiments/1/runs/r1) with neg_elbo = 280.5 (validation negative ELBO" in text
    assert ("bound on a Bernoulli cross-entropy of non-binary pixels, not −log p(x); nats per example), "
            "latent_dim=8, lr=3e-4.") in text
    assert "`models:/smoke@best`" in text and "[slice](#/experiments/1/runs/p/artifacts/plots/slice.html)" in text


# --- unknown parameters ----------------------------------------------------------------------------

def test_closest_option_ignores_dash_or_underscore_and_keeps_the_users_spelling():
    from pipelines.entrypoints.command_line import closest_option

    known = ["--study", "--storage", "--latent-dim", "--latent_dim", "--n-trials", "--n_trials"]
    assert closest_option("--study_name", known) == "--study"
    assert closest_option("--latent_dimm", known) == "--latent_dim"
    assert closest_option("--latent-dimm", known) == "--latent-dim"
    assert closest_option("--n-trails", known) == "--n-trials"
    assert closest_option("--zzz", known) is None


@pytest.mark.parametrize("module, args, line", [
    ("pipelines.entrypoints.tune", ["--study_name", "x"], "error: unknown parameter --study_name; did you mean --study?"),
    ("pipelines.entrypoints.train", ["--latent_dimm", "3"], "error: unknown parameter --latent_dimm; did you mean --latent_dim?"),
    ("pipelines.entrypoints.train", ["--zzz", "3"], "error: unknown parameter --zzz; see --help for the parameters"),
    ("pipelines.entrypoints.evaluate", [], "error: the following arguments are required: --model-uri (see --help)"),
    ("pipelines.entrypoints.generate", ["--model-uri", "m", "--labls", "1"],
     "error: unknown parameter --labls; did you mean --labels?"),
    ("pipelines.entrypoints.reproduce", ["--run-id", "r", "--tolerence", "0"],
     "error: unknown parameter --tolerence; did you mean --tolerance?"),
    ("pipelines.entrypoints.stale_runs", ["--grace-s", "5"], "error: unknown parameter --grace-s; did you mean --grace?"),
])
def test_a_usage_error_is_one_line_exit_2_and_no_run(store, in_process, module, args, line):
    code, stderr = in_process(importlib.import_module(module).main, *args)
    assert code == 2
    assert stderr.strip() == line
    assert store.runs() == []


def test_a_usage_error_in_a_real_process_is_one_line_on_stderr_and_exit_2(store):
    done = store.cli("pipelines.entrypoints.train", "--zzz", "3")
    assert done.returncode == 2
    assert done.stderr.strip() == "error: unknown parameter --zzz; see --help for the parameters"
    assert store.runs() == []


@pytest.mark.slow
def test_unknown_parameter_through_mlflow_run_names_the_p_key_and_fails_the_run(store):
    done = store.mlflow_run("tune", {"study_name": "x"})
    assert done.returncode != 0
    assert "error: unknown parameter study_name; did you mean study?" in done.stderr
    assert "usage:" not in done.stderr
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "unknown parameter study_name; did you mean study?"


# --- MLproject ------------------------------------------------------------------------------------

def _parser_of(entry_point: str) -> argparse.ArgumentParser:
    module = {"main": "train"}.get(entry_point, entry_point)
    return __import__(f"pipelines.entrypoints.{module}", fromlist=["build_parser"]).build_parser()


FIELD_TYPES = {int: "int", float: "float", str: "string", bool: "bool"}


def test_mlproject_options_are_real_typed_options_of_their_commands():
    """`options` is ours (MLflow ignores it): each must reach its command as --name and, for a
    configuration field, carry the field's type."""
    project = yaml.safe_load((REPO / "MLproject").read_text())
    index = field_index()
    for entry, spec in project["entry_points"].items():
        known = _parser_of(entry)._option_string_actions
        for name, option in spec.get("options", {}).items():
            assert f"--{name}" in known, f"{entry}: -P {name} would reach the command as an unknown --{name}"
            assert option.get("help"), f"{entry}: {name} is not documented"
            if name in index and entry in ("main", "train", "tune"):
                typ = index[name][2]
                expected = FIELD_TYPES.get(typ, "list of int")
                assert option["type"] == expected, f"{entry}: {name} is {expected}, not {option['type']}"
        for name, parameter in spec["parameters"].items():
            assert "{" + name + "}" in spec["command"], f"{entry}: {name} is not passed to the command"
            assert parameter.get("default", "x") != "", f"{entry}: {name} would be logged as '' when unset"


def test_defaults_mlproject_names_are_the_commands_own():
    """MLproject repeats a few defaults for `mlflow run` users: each must be the command's."""
    project = yaml.safe_load((REPO / "MLproject").read_text())
    named = 0
    for entry, spec in project["entry_points"].items():
        parser = _parser_of(entry)
        for name, option in spec.get("options", {}).items():
            match = re.search(r"\(default (-?\d+(?:\.\d+)?)\)", option.get("help", ""))
            if match:
                named += 1
                assert float(match.group(1)) == parser.get_default(name), f"{entry}: {name}"
    assert named >= 10


# --- what real runs record ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded(tmp_path_factory, data_dir):
    """One short run through `mlflow run` and one started directly, in the same store."""
    store = make_store(tmp_path_factory.mktemp("ui-metadata"), data_dir)
    via_mlflow = store.mlflow_run("train", {**TINY_PARAMS, "epochs": "1", "latent_dim": "2", "hidden": "64",
                                            "kl_weight": "1"})
    assert via_mlflow.returncode == 0, via_mlflow.stderr[-3000:]
    direct = store.cli("pipelines.entrypoints.train", *TINY_DATA, "--epochs", "1", "--latent-dim", "3",
                       "--hidden", "64", "--kl-weight", "0.5")
    assert direct.returncode == 0, direct.stderr[-3000:]
    first, second = store.runs()
    return store, first, second


@pytest.mark.slow
def test_mlflow_run_logs_only_given_parameters_beside_the_configuration(recorded):
    _, run, _ = recorded
    params = run.data.params
    # `mlflow run` logs its parameters under their bare names; ours are dotted (model.latent_dim).
    given = {k: v for k, v in params.items() if "." not in k}
    assert given == {"dataset": "fashion-mnist", "limit_train": "1000", "val_size": "300", "limit_test": "500",
                     "epochs": "1", "latent_dim": "2", "hidden": "64", "kl_weight": "1"}
    assert params["model.latent_dim"] == "2" and params["model.conditioning"] == "concat"


@pytest.mark.slow
def test_runs_are_named_described_and_show_their_dataset_source_and_model(recorded):
    store, via_mlflow, direct = recorded
    client = store.client
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == MACHINE_LEARNING_KIND  # made by make_store, tagged by us
    assert via_mlflow.info.run_name == "mlp z=2 β=1"  # not MLflow's random name
    assert direct.info.run_name == "mlp z=3 β=0.5"

    for run in (via_mlflow, direct):
        note = run.data.tags[NOTE]
        assert note.startswith(f"**{run.info.run_name}**") and "`test/neg_elbo`" in note
        assert f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}/artifacts/figures/loss_curves.png" in note
        inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation", "test"}
        assert {d.name for d in inputs.values()} == {"fashion-mnist"}
        assert len({d.digest for d in inputs.values()}) == 3
        import json
        assert [json.loads(inputs[c].profile)["examples"] for c in ("training", "validation", "test")] == [1000, 300, 500]
        model_ids = {o.model_id for o in run.outputs.model_outputs}
        assert run.data.tags["model_uri"].removeprefix("models:/") in model_ids  # the Models column

    assert via_mlflow.data.tags["mlflow.source.type"] == "PROJECT"
    tags = direct.data.tags
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"].endswith("pipelines/entrypoints/train.py")
    assert tags["mlflow.source.git.commit"] == tags["git_commit"]


@pytest.mark.slow
def test_the_default_experiment_is_tagged_when_a_run_goes_there(tmp_path, data_dir):
    store = make_store(tmp_path, data_dir)
    env = {k: v for k, v in store.env.items() if k != "MLFLOW_EXPERIMENT_NAME"}
    import subprocess
    done = subprocess.run([sys.executable, "-m", "pipelines.entrypoints.train", *TINY_DATA, "--epochs", "1",
                           "--hidden", "32", "--latent-dim", "2"], cwd=store.root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    default = store.client.get_experiment_by_name("Default")
    assert default.tags[EXPERIMENT_KIND_TAG] == MACHINE_LEARNING_KIND


@pytest.mark.slow
def test_study_trials_are_named_and_the_parent_describes_the_best_trial(store):
    storage = f"sqlite:///{store.root / 'optuna.db'}"
    done = store.cli("pipelines.entrypoints.tune", *TINY_DATA, "--space", "smoke", "--epochs", "1", "--n-trials", "2",
                     "--study", "named", "--storage", storage, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = store.runs()
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.run_name.startswith(f"trial-{trial.data.tags['trial_number']} · ")
        assert " z=" in trial.info.run_name and " β=" in trial.info.run_name
    best_run_id = parent.data.tags["best_run_id"]
    best = next(r for r in trials if r.info.run_id == best_run_id)
    note = parent.data.tags[NOTE]
    assert note.startswith("**Optuna study `named`**: 2 trials")
    assert f"[{best.info.run_name}](#/experiments/{parent.info.experiment_id}/runs/{best_run_id})" in note
    assert "plots/optimization_history.html" in note and "`models:/named@best`" in note
