"""The manifest every training run logs: what it holds, and that it matches what was logged."""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import platform
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch

from conftest import EXPERIMENT, make_store
from pipelines.config import RunConfig, from_dict, with_overrides
from pipelines.recording.manifest import (
    DIFF_FILE,
    MANIFEST_FILE,
    installed_packages,
    load_manifest,
    log_manifest,
    weights_sha256,
)
from pipelines.tracking.runs import RunLogger, git_commit

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
TINY = {"data.dataset": "fashion-mnist", "data.limit_train": 600, "data.val_size": 200,
        "data.limit_test": 200, "model.hidden": "64,32", "optim.epochs": 1, "execution.device": "cpu"}


@pytest.fixture(scope="module")
def logged(tmp_path_factory, data_dir):
    """One tiny training logged in-process to a throw-away store."""
    import mlflow

    from pipelines.recording.record import FULL, record_run
    from pipelines.tracking.runs import entry_point_run
    from pipelines.training.train import train

    store = make_store(tmp_path_factory.mktemp("manifest-store"), data_dir)
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"MLFLOW_TRACKING_URI": store.uri, "CVAE_DATA_DIR": str(data_dir), "CVAE_OFFLINE": "1"}.items():
            patch.setenv(name, value)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(store.uri)
        client = store.client
        config = with_overrides(RunConfig(), TINY)
        try:
            with entry_point_run(EXPERIMENT) as logger:
                result = train(config, logger)
                recorded = record_run(logger, result, config, FULL)
            yield SimpleNamespace(client=client, run_id=logger.run_id, result=result, config=config,
                                  recorded=recorded, manifest=load_manifest(client, logger.run_id))
        finally:
            mlflow.set_tracking_uri(previous)


def test_manifest_holds_config_command_seeds_and_determinism(logged):
    manifest = logged.manifest
    assert manifest["run_id"] == logged.run_id
    assert from_dict(manifest["config"]) == logged.config
    assert manifest["command_line"]
    assert manifest["seeds"] == {"python": 0, "numpy": 0, "torch": 0, "cuda": 0}
    assert manifest["determinism"]["deterministic"] is True
    assert manifest["determinism"]["use_deterministic_algorithms"] is True
    assert manifest["determinism"]["cudnn_benchmark"] is False


def test_manifest_holds_code_version_and_data_checksums(logged):
    manifest = logged.manifest
    commit, dirty = git_commit()
    assert manifest["code"]["git_commit"] == commit
    assert manifest["code"]["git_dirty"] is dirty
    artifacts = {f.path for f in logged.client.list_artifacts(logged.run_id)}
    assert (DIFF_FILE in artifacts) is dirty
    data = manifest["data"]
    assert data["dataset"] == "fashion-mnist" and data["split_seed"] == 0
    assert data["sizes"] == {"train": 600, "val": 200, "test": 200}
    for name, checksum in data["source_files_sha256"].items():  # of the IDX bytes read, not of the archive
        with gzip.open(f"{FASHION_DIR}/{name}.gz", "rb") as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == checksum, name
    assert len(data["source_files_sha256"]) == 4


def test_manifest_holds_environment_and_hardware(logged):
    environment, hardware = logged.manifest["environment"], logged.manifest["hardware"]
    assert environment["python"] == platform.python_version()
    assert environment["torch"] == torch.__version__
    for package in ("torch", "mlflow", "numpy"):
        assert environment["packages"][package] == importlib.metadata.version(package)
    assert hardware["device_type"] == "cpu" and hardware["gpu_model"] is None
    assert hardware["cpu_model"] and hardware["cpu_count"] >= 1
    assert hardware["device_name"] == hardware["cpu_model"] and hardware["device_memory_gib"] == hardware["ram_gib"] > 0


def test_manifest_says_whether_the_steps_ran_compiled(logged):
    assert logged.manifest["compile"] == {"requested": "auto", "compiled": False, "fallback_error": None}


def test_manifest_results_match_the_logged_metrics_and_model(logged):
    import mlflow.pytorch

    results = logged.manifest["results"]
    run_metrics = logged.client.get_run(logged.run_id).data.metrics
    for name in ("test/loss", "test/recon", "test/kl", "best_val_loss", "val/loss", "train/loss"):
        assert results["metrics"][name] == pytest.approx(run_metrics[name], rel=0, abs=0), name
    assert "epoch_time_s" not in results["metrics"]
    model = mlflow.pytorch.load_model(results["model_uri"], map_location="cpu")
    assert results["weights_sha256"] == weights_sha256(model.state_dict())
    assert results["weights_sha256"] == weights_sha256(logged.result.model.state_dict())


def test_a_dirty_tree_logs_its_diff(logged, monkeypatch, tmp_path):
    import pipelines.recording.manifest as manifest_module

    diff = "diff --git a/cvae/model.py b/cvae/model.py\n+# an uncommitted change\n"
    monkeypatch.setattr(manifest_module, "git_commit", lambda: ("0" * 40, True))
    monkeypatch.setattr(manifest_module, "git_diff", lambda: diff)
    run_id = logged.client.create_run(logged.client.get_run(logged.run_id).info.experiment_id).info.run_id
    manifest = log_manifest(RunLogger(run_id, logged.client), logged.config, logged.result, logged.recorded.metrics,
                            logged.recorded.model_uri, logged.recorded.model_id)
    assert manifest["code"] == {"git_commit": "0" * 40, "git_dirty": True, "diff_artifact": DIFF_FILE,
                                "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()}
    path = logged.client.download_artifacts(run_id, DIFF_FILE, str(tmp_path))
    with open(path, encoding="utf-8") as handle:
        assert handle.read() == diff
    assert load_manifest(logged.client, run_id) == json.loads(json.dumps(manifest))

    monkeypatch.setattr(manifest_module, "git_commit", lambda: ("0" * 40, False))
    clean_run = logged.client.create_run(logged.client.get_run(logged.run_id).info.experiment_id).info.run_id
    log_manifest(RunLogger(clean_run, logged.client), logged.config, logged.result, logged.recorded.metrics,
                            logged.recorded.model_uri, logged.recorded.model_id)
    assert {f.path for f in logged.client.list_artifacts(clean_run)} == {MANIFEST_FILE}


def test_weights_checksum_sees_every_bit_and_ignores_key_order():
    state = OrderedDict(a=torch.arange(6, dtype=torch.float32).reshape(2, 3), b=torch.ones(4))
    reordered = OrderedDict(b=state["b"].clone(), a=state["a"].t().contiguous().t())
    assert weights_sha256(state) == weights_sha256(reordered)
    nudged = OrderedDict(a=state["a"].clone(), b=state["b"].clone())
    nudged["b"][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert weights_sha256(state) != weights_sha256(nudged)
    assert weights_sha256(state) != weights_sha256({"a": state["a"], "c": state["b"]})


def test_installed_packages_is_pip_freeze_without_a_subprocess():
    packages = installed_packages()
    assert packages["torch"] == importlib.metadata.version("torch")
    assert packages["mlflow"] == importlib.metadata.version("mlflow")
    assert len(packages) > 20


def test_weights_checksum_covers_zero_dimensional_buffers():
    import cvae
    from cvae.config import ModelConfig

    model = cvae.build(ModelConfig(arch="conv", channels=(4,), batch_norm=True, likelihood="gaussian"))
    state = model.state_dict()
    assert any(t.dim() == 0 for t in state.values())  # num_batches_tracked, log_std
    before = weights_sha256(state)
    state["log_std"] = state["log_std"] + 1.0
    assert weights_sha256(state) != before
