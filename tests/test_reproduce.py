"""`reproduce`: the comparison functions, and re-running real logged train runs (a study trial is
reproduced in test_study_recording.py)."""
from __future__ import annotations

import copy
import json
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import EXPERIMENT, TINY_PARAMS, assert_no_running, in_process_on, make_store
from pipelines.entrypoints.reproduce import main as reproduce_main
from pipelines.recording.manifest import MANIFEST_FILE, load_manifest, weights_sha256
from pipelines.reproduce import (
    AGREES,
    DIFFERS,
    REPORT_JSON,
    REPORT_MARKDOWN,
    build_report,
    compare_data,
    compare_metrics,
    compare_weights,
    default_tolerance,
    environment_warnings,
    explicit_tolerance,
)

REPRODUCE = "pipelines.entrypoints.reproduce"
SHORT_TRAIN = {**TINY_PARAMS, "epochs": "2", "hidden": "64,32"}
FILE = "train-images-idx3-ubyte.gz"


def manifest(**overrides) -> dict:
    base = {
        "run_id": "original",
        "seeds": {"python": 0, "numpy": 0, "torch": 0, "cuda": 0},
        "determinism": {"deterministic": True},
        "code": {"git_commit": "a" * 40, "git_dirty": False},
        "data": {"dataset": "fashion-mnist", "source_files_sha256": {FILE: "1" * 64},
                 "sizes": {"train": 10, "val": 5, "test": 5}, "split_seed": 0},
        "environment": {"python": "3.11.7", "torch": "2.14.1", "packages": {"torch": "2.14.1", "numpy": "2.1.0"}},
        "hardware": {"device_type": "cpu", "gpu_model": None, "cpu_model": "AMD EPYC"},
        "results": {"metrics": {"test/loss": 100.0, "best_epoch": 2}, "weights_sha256": None},
    }
    for section, values in overrides.items():
        base[section] = {**base[section], **values} if isinstance(values, dict) else values
    return base


def weights(nudge: float = 0.0) -> OrderedDict:
    state = OrderedDict(w=torch.linspace(-1, 1, 6).reshape(2, 3), b=torch.zeros(3))
    state["b"][1] += nudge
    return state


# --- the comparison, as pure functions ------------------------------------------------------------

def test_metrics_agree_only_within_tolerance_and_missing_metrics_never_agree():
    rows = {r["name"]: r for r in compare_metrics({"a": 100.0, "b": 1.0, "c": 5.0},
                                                  {"a": 100.0, "b": 1.0 + 1e-7}, rel_tol=0.0)}
    assert rows["a"]["agrees"] and rows["a"]["abs_diff"] == 0.0
    assert not rows["b"]["agrees"] and rows["b"]["abs_diff"] == pytest.approx(1e-7)
    assert not rows["c"]["agrees"] and rows["c"]["rerun"] is None
    loose = {r["name"]: r for r in compare_metrics({"a": 100.0}, {"a": 100.05}, rel_tol=1e-3)}
    assert loose["a"]["agrees"]  # 0.05 <= 1e-3 * 100


def test_weights_compare_max_abs_difference_checksums_and_the_logged_model():
    original = weights()
    recorded = weights_sha256(original)
    same = compare_weights(original, weights(), 0.0, recorded)
    assert same["agrees"] and same["identical"] and same["max_abs_diff"] == 0.0
    assert same["logged_model_matches_manifest"]
    nudged = compare_weights(original, weights(1e-6), 0.0, recorded)
    assert not nudged["agrees"] and not nudged["identical"]
    assert nudged["max_abs_diff"] == pytest.approx(1e-6)
    assert compare_weights(original, weights(1e-6), 1e-3, recorded)["agrees"]
    renamed = compare_weights(original, {"w": original["w"], "bias": original["b"]}, 1e-3, recorded)
    assert not renamed["agrees"] and renamed["mismatched_tensors"] == ["b", "bias"]
    tampered = compare_weights(original, weights(), 0.0, "0" * 64)
    assert not tampered["logged_model_matches_manifest"] and not tampered["agrees"]
    checksum_only = compare_weights(None, weights(), 0.0, recorded)
    assert checksum_only["agrees"] and checksum_only["max_abs_diff"] is None


def test_data_differences_name_the_file_sizes_and_split_seed():
    recorded = manifest()["data"]
    assert compare_data(recorded, recorded) == []
    changed = {**recorded, "source_files_sha256": {FILE: "2" * 64}, "sizes": {"train": 9, "val": 5, "test": 5},
               "split_seed": 3}
    differences = compare_data(recorded, changed)
    assert len(differences) == 3
    assert FILE in differences[0] and "111111111111 → 222222222222" in differences[0]
    assert "sizes" in differences[1] and "split_seed: 0 → 3" in differences[2]


def test_warnings_name_commit_dirty_tree_packages_and_hardware():
    rerun = manifest(code={"git_commit": "b" * 40, "git_dirty": True},
                     environment={"packages": {"torch": "2.15.0", "numpy": "2.1.0", "scipy": "1.14"}},
                     hardware={"device_type": "cuda", "gpu_model": "NVIDIA H100"})
    warnings = "\n".join(environment_warnings(manifest(), rerun))
    assert f"code commit differs: {'a' * 40} → {'b' * 40}" in warnings
    assert "uncommitted changes" in warnings and "re-run dirty=True" in warnings
    assert "torch 2.14.1 → 2.15.0" in warnings and "scipy (absent) → 1.14" in warnings
    assert "numpy" not in warnings
    assert "device_type differs: cpu → cuda" in warnings and "gpu_model differs: None → NVIDIA H100" in warnings
    assert environment_warnings(manifest(), manifest()) == []


def test_default_tolerance_is_bitwise_only_for_deterministic_cpu_runs():
    cpu, gpu = manifest(), manifest(hardware={"device_type": "cuda"})
    loose = manifest(determinism={"deterministic": False})
    assert default_tolerance(cpu, cpu).weights_abs == 0.0 == default_tolerance(cpu, cpu).metrics_rel
    assert default_tolerance(gpu, gpu).weights_abs == 1e-3
    assert default_tolerance(cpu, gpu).weights_abs == 1e-3
    assert default_tolerance(loose, loose).weights_abs == 1e-2


def test_report_verdict_differs_on_data_seed_metric_or_weight_differences():
    original = manifest(results={"metrics": {"test/loss": 100.0}, "weights_sha256": weights_sha256(weights())})
    rerun = manifest(run_id="rerun", results={"metrics": {"test/loss": 100.0}})
    bitwise = explicit_tolerance(0.0)
    report = build_report(original, rerun, weights(), weights(), bitwise)
    assert report["verdict"] == AGREES and report["differences"] == []
    cases = {
        "data file": (manifest(data={"source_files_sha256": {FILE: "2" * 64}}), weights()),
        "seed torch: 0 → 1": (manifest(seeds={"python": 0, "numpy": 0, "torch": 1, "cuda": 0}), weights()),
        "metric test/loss": (manifest(results={"metrics": {"test/loss": 101.0}}), weights()),
        "weights: max |Δw|": (rerun, weights(1e-3)),
    }
    for expected, (changed, rerun_weights) in cases.items():
        report = build_report(original, changed, weights(), rerun_weights, bitwise)
        assert report["verdict"] == DIFFERS, expected
        assert any(expected in d for d in report["differences"]), (expected, report["differences"])


# --- re-running real runs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def original(tmp_path_factory, data_dir):
    """One short training run through `mlflow run -e train`, in a store shared by this module's tests."""
    store = make_store(tmp_path_factory.mktemp("reproduce"), data_dir)
    done = store.mlflow_run("train", SHORT_TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = store.runs()
    return SimpleNamespace(store=store, run_id=run.info.run_id)


def reruns_of(store, run_id: str):
    return store.runs(f"tags.reproduces = '{run_id}'")


def report_of(store, run_id: str, tmp_dir: Path) -> dict:
    path = store.client.download_artifacts(run_id, REPORT_JSON, str(tmp_dir))
    return json.loads(Path(path).read_text())


@pytest.fixture
def altered(original):
    """Edit the original's manifest for one test, and put the recorded one back afterwards."""
    client = original.store.client
    recorded = load_manifest(client, original.run_id)

    def alter(edit) -> None:
        changed = copy.deepcopy(recorded)
        edit(changed)
        client.log_dict(original.run_id, changed, MANIFEST_FILE)

    yield alter
    client.log_dict(original.run_id, recorded, MANIFEST_FILE)


@pytest.mark.slow
def test_reproduce_via_mlflow_run_agrees_bitwise_and_records_the_report(original, tmp_path):
    store = original.store
    done = store.mlflow_run("reproduce", {"run_id": original.run_id})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "AGREES" in done.stdout
    (rerun,) = reruns_of(store, original.run_id)
    assert rerun.info.status == "FINISHED"
    assert rerun.data.tags["reproduction_verdict"] == AGREES
    artifacts = {f.path for f in store.client.list_artifacts(rerun.info.run_id)}
    assert {REPORT_JSON, REPORT_MARKDOWN, MANIFEST_FILE} <= artifacts
    report = report_of(store, rerun.info.run_id, tmp_path)
    assert report["verdict"] == AGREES and report["differences"] == []
    assert report["original_run_id"] == original.run_id and report["rerun_run_id"] == rerun.info.run_id
    assert report["tolerance"]["weights_abs"] == 0.0
    assert report["weights"]["max_abs_diff"] == 0.0 and report["weights"]["identical"]
    assert report["weights"]["logged_model_matches_manifest"]
    assert {row["name"] for row in report["metrics"]} >= {"test/loss", "val/loss", "best_epoch"}
    assert all(row["abs_diff"] == 0.0 for row in report["metrics"])
    assert rerun.data.metrics["reproduction/max_abs_weight_diff"] == 0.0
    assert_no_running(store)


@pytest.mark.slow
def test_other_data_bytes_are_refused_in_one_line_before_a_run(original, altered, monkeypatch, capsys):
    read = "train-images-idx3-ubyte"  # the name the bytes read are recorded under (uncompressed)
    altered(lambda m: m["data"]["source_files_sha256"].update({read: "0" * 64}))
    before = len(original.store.runs())
    with in_process_on(original.store, monkeypatch, capsys) as run:
        code, stderr = run(reproduce_main, "--run-id", original.run_id)
    assert code == 2 and stderr.strip().splitlines()[-1].startswith(
        f"error: run {original.run_id} was trained on other bytes than the fashion-mnist data here ({read}: "
        "SHA-256 000000000000 recorded, "), stderr
    assert len(original.store.runs()) == before  # nothing re-run, no run opened
    assert_no_running(original.store)


@pytest.mark.slow
def test_an_altered_seed_is_reported_as_differing(original, altered, tmp_path):
    altered(lambda m: m["config"]["execution"].update({"seed": 1}))
    done = original.store.cli(REPRODUCE, "--run-id", original.run_id)
    assert done.returncode == 1 and "DIFFERS" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]
    rerun = reruns_of(original.store, original.run_id)[-1]
    assert rerun.data.params["execution.seed"] == "1"
    report = report_of(original.store, rerun.info.run_id, tmp_path)
    assert report["verdict"] == DIFFERS
    assert any(d.startswith("seed torch: 0 → 1") for d in report["seed_differences"])
    assert report["weights"]["max_abs_diff"] > 0 and not report["weights"]["identical"]
    assert not all(row["agrees"] for row in report["metrics"])


def test_an_unknown_run_id_fails_clearly_before_opening_a_run(store, in_process):
    code, stderr = in_process(reproduce_main, "--run-id", "0" * 32)
    assert code == 2
    assert f"error: run_id='{'0' * 32}' is not valid; no such run" in stderr
    assert store.runs() == []


def test_a_run_without_a_manifest_fails_clearly_before_opening_a_run(store, in_process):
    client = store.client
    bare = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    client.set_terminated(bare, "FINISHED")
    code, stderr = in_process(reproduce_main, "--run-id", bare)
    assert code == 2
    assert f"error: run {bare} has no {MANIFEST_FILE} artifact" in stderr
    assert [r.info.run_id for r in store.runs()] == [bare]


@pytest.mark.slow
def test_an_unknown_run_id_under_mlflow_run_fails_the_run_mlflow_created(store):
    done = store.mlflow_run("reproduce", {"run_id": "no-such-run"})
    assert done.returncode != 0
    assert "error: run_id='no-such-run' is not valid" in done.stderr
    (failed,) = store.runs()
    assert failed.info.status == "FAILED"
    assert_no_running(store)
