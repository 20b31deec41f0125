"""System metrics: what a real run records, that the switch turns them off, and that the monitor's
thread never outlives its run, however the run ends."""
from __future__ import annotations

import logging
import sys
import threading

import pytest

from conftest import EXPERIMENT, TINY_DATA, make_store, wait_until
from pipelines.config import RunConfig, with_overrides
from pipelines.tracking.runs import RunLogger, start_run
from pipelines.tracking.system_metrics import MONITOR_THREAD, run_system_metrics, system_metrics

CPU = "system/cpu_utilization_percentage"
MEMORY = "system/system_memory_usage_megabytes"
TINY = {"data.dataset": "fashion-mnist", "data.limit_train": 256, "data.val_size": 100, "model.hidden": "32",
        "model.latent_dim": 2, "optim.epochs": 1, "execution.device": "cpu"}


def monitors() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == MONITOR_THREAD]


def system_keys(client, run_id: str) -> set[str]:
    return {key for key in client.get_run(run_id).data.metrics if key.startswith("system/")}


@pytest.fixture(scope="module")
def client(tmp_path_factory, data_dir):
    return make_store(tmp_path_factory.mktemp("system-metrics"), data_dir).client


@pytest.fixture
def run(client):
    """A new RUNNING run in the module's throw-away store: (client, run id)."""
    return client, start_run(client, EXPERIMENT)


@pytest.mark.slow
def test_a_training_run_records_cpu_and_memory_as_system_metrics(conditional_run):
    metrics = conditional_run.run.data.metrics
    assert 0 <= metrics[CPU] <= 100
    assert metrics[MEMORY] > 0 and 0 < metrics["system/system_memory_usage_percentage"] <= 100
    # The session run is shorter than the 5 s interval: the sample taken as the run ends is there.
    history = conditional_run.store.client.get_metric_history(conditional_run.run.info.run_id, CPU)
    assert len(history) >= 1


@pytest.mark.slow
def test_the_train_entry_point_takes_system_metrics_false_as_mlflow_run_passes_it(store, in_process):
    """`-P system_metrics=false` reaches the entry point as `--system_metrics false`; the run records
    everything else and no system metric (the shared session run shows the default, on)."""
    from pipelines.entrypoints.train import main

    code, _ = in_process(main, *TINY_DATA[:2], "--limit-train", "200", "--val-size", "100", "--limit-test", "100",
                         "--epochs", "1", "--hidden", "16", "--system_metrics", "false")
    assert code == 0
    (run,) = store.runs()
    assert run.info.status == "FINISHED" and run.data.params["execution.system_metrics"] == "False"
    assert "val/loss" in run.data.metrics and system_keys(store.client, run.info.run_id) == set()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_configuration_switches_system_metrics_of_a_real_training(run, data_dir, monkeypatch, enabled):
    from pipelines.training.train import train

    monkeypatch.setenv("CVAE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("CVAE_OFFLINE", "1")
    client, run_id = run
    config = with_overrides(RunConfig(), {**TINY, "execution.system_metrics": enabled,
                                          "execution.system_metrics_interval_s": 0.2})
    logger = RunLogger(run_id, client)
    with run_system_metrics(logger, config.execution):
        train(config, logger)
    recorded = system_keys(client, run_id)
    if enabled:
        assert {CPU, MEMORY} <= recorded
    else:
        assert recorded == set()
    assert not monitors()


@pytest.mark.parametrize("stop", [RuntimeError("training failed"), KeyboardInterrupt()])
def test_a_run_that_raises_stops_the_monitor_thread(run, stop):
    client, run_id = run
    with pytest.raises(type(stop)):
        with system_metrics(client, run_id, interval_s=0.1):
            wait_until(lambda: CPU in system_keys(client, run_id), "a first system-metrics sample")
            (thread,) = monitors()
            raise stop
    assert not thread.is_alive() and not monitors()


def test_a_block_shorter_than_the_interval_still_gets_a_sample(run):
    client, run_id = run
    with system_metrics(client, run_id, interval_s=60):
        pass
    assert [m.step for m in client.get_metric_history(run_id, CPU)] == [0]


def test_without_psutil_the_run_goes_on_unmonitored_after_one_warning(run, monkeypatch, caplog):
    client, run_id = run
    monkeypatch.setitem(sys.modules, "mlflow.system_metrics.system_metrics_monitor", None)
    ran = False
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        with system_metrics(client, run_id):
            ran = True
    assert ran and system_keys(client, run_id) == set() and not monitors()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith("system metrics are not recorded: ")
