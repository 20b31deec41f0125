"""What must hold on a GPU: `pytest -m cuda` (benchmarks/gpu/run.sh runs it on the GPU machine).

Training in fp32 and bf16 with the logged model reloaded on the CPU, a study of two workers sharing
the device, reproduction of a device run (bitwise in deterministic mode, within the documented
tolerance otherwise), `evaluate` and `generate`. Every test runs on the device the ``device``
fixture gives: CUDA, skipped where there is none. CVAE_ACCELERATOR_TEST_DEVICE=cpu pushes the same
tests through on the CPU (`run.sh --device cpu --dry-run` does, in CI: tests/test_gpu_script.py),
so they cannot rot between the rare sessions that have a GPU. The entry points run in this process
(the study's workers are processes of their own), against one store for the module.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState
from PIL import Image

from conftest import assert_no_running, make_store

pytestmark = pytest.mark.cuda

DEVICE_ENV = "CVAE_ACCELERATOR_TEST_DEVICE"
PARENT_TAG = "mlflow.parentRunId"
LIMIT_TEST = "200"
DATA = ["--dataset", "fashion-mnist", "--limit-train", "500", "--val-size", "200", "--limit-test", LIMIT_TEST]
SHORT = [*DATA, "--epochs", "1"]
# The test loss of the reloaded model, evaluated in fp32 on the CPU, against the one the run logged
# on the device: fp32 differs there only in the order of additions; bf16 autocast keeps 8 bits of
# mantissa in the matrix products, which moves a sum over 784 pixels by far less than 1%.
RELOAD_REL_TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}


@pytest.fixture(scope="module")
def device() -> str:
    name = os.environ.get(DEVICE_ENV, "cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"no CUDA device ({DEVICE_ENV}=cpu runs these tests on the CPU)")
    return name


@pytest.fixture(scope="module")
def on_device_store(device, tmp_path_factory, data_dir):
    """One store for the module, and this process pointed at it as a command's process would be."""
    from pipelines.tracking.runs import configure_tracking

    store = make_store(tmp_path_factory.mktemp("on-device"), data_dir)
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "CVAE_DATA_DIR", "CVAE_OFFLINE", "PYTHONPATH"):
            patch.setenv(name, store.env[name])  # PYTHONPATH: for the study's worker processes
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.chdir(store.root)
        configure_tracking()
        yield store
    mlflow.set_tracking_uri(previous)


def run(main, *argv: str) -> str:
    """An entry point's ``main`` in this process, with run_main's error handling; its stdout. A
    non-zero exit fails the test with what the command printed."""
    from pipelines.entrypoints.common import exit_code

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = exit_code(main, list(argv))
    assert code == 0, f"exit {code}\n{out.getvalue()[-3000:]}\n{err.getvalue()[-3000:]}"
    return out.getvalue()


@contextlib.contextmanager
def allocates_on(device: str):
    """Fails unless the block allocated memory on a CUDA ``device`` in this process (checks
    nothing on the CPU): the command really ran there."""
    if not device.startswith("cuda"):
        yield
        return
    count = lambda: torch.cuda.memory_stats(device).get("allocation.all.allocated", 0)  # noqa: E731
    before = count()
    yield
    assert count() > before, f"nothing was allocated on {device}"


@pytest.fixture(scope="module")
def trained(device, on_device_store):
    """A `train` run in each precision: fp32 in deterministic mode, bf16 without (CUDA's default)."""
    from pipelines.entrypoints import train

    runs = {}
    for precision, deterministic in (("fp32", "true"), ("bf16", "false")):
        name = f"on-device-{precision}"
        with allocates_on(device):
            run(train.main, *SHORT, "--hidden", "64,32", "--latent-dim", "4", "--device", device,
                "--precision", precision, "--deterministic", deterministic, "--run-name", name)
        (runs[precision],) = on_device_store.runs(f"tags.`mlflow.runName` = '{name}'")
    return runs


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trains_on_the_device_and_the_logged_model_reloads_on_the_cpu(device, trained, precision):
    import mlflow.pytorch

    from pipelines.config import from_params
    from pipelines.data import Batcher, load_splits
    from pipelines.training.train import evaluate_split

    run_ = trained[precision]
    assert run_.info.status == "FINISHED"
    assert run_.data.params["execution.precision"] == precision
    assert run_.data.tags["device"].startswith(device)
    from pipelines.training.devices import device_name
    assert run_.data.tags["device_name"] == device_name(torch.device(device))  # the GPU's name on CUDA
    model = mlflow.pytorch.load_model(run_.data.tags["model_uri"], map_location="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    config = from_params(run_.data.params)
    cpu = torch.device("cpu")
    test = evaluate_split(model, load_splits(config.data, cpu).test, Batcher(config.data.binarize, 0, cpu), config, cpu)
    assert test["loss"] == pytest.approx(run_.data.metrics["test/loss"], rel=RELOAD_REL_TOLERANCE[precision])


def test_two_workers_share_the_device_and_repeat_no_trial(device, on_device_store):
    from pipelines.entrypoints import tune

    storage = f"sqlite:///{on_device_store.root / 'optuna.db'}"
    run(tune.main, "--space", "smoke", *SHORT, "--device", device, "--study", "pool", "--storage", storage,
        "--workers", "2", "--n-trials", "4", "--pruner", "none", "--register-as", "none")
    trials = optuna.load_study(study_name="pool", storage=storage).trials
    # Workers draw until the study holds 4; two finishing at once may each start one more.
    assert 4 <= len(trials) <= 5 and all(t.state == TrialState.COMPLETE for t in trials)
    drawn = [json.dumps(t.params, sort_keys=True) for t in trials]
    assert len(set(drawn)) == len(drawn), f"a trial was repeated: {drawn}"
    (parent,) = [r for r in on_device_store.runs("tags.study = 'pool'") if PARENT_TAG not in r.data.tags]
    children = on_device_store.runs(f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    assert sorted(c.info.run_id for c in children) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    assert sorted(c.data.tags["trial_number"] for c in children) == sorted(str(t.number) for t in trials)
    assert all(c.data.tags["device"].startswith(device) for c in children)
    assert all(r.info.status == "FINISHED" for r in (parent, *children))
    assert_no_running(on_device_store)


def reproduce(store, original, tmp_path) -> dict:
    """`reproduce` of ``original`` in this process, with the default tolerance; the report it logged."""
    from pipelines.entrypoints import reproduce as reproduce_entry_point
    from pipelines.reproduce import REPORT_JSON

    run(reproduce_entry_point.main, "--run-id", original.info.run_id)
    (rerun,) = store.runs(f"tags.reproduces = '{original.info.run_id}'")
    assert rerun.info.status == "FINISHED"
    assert rerun.data.tags["device"] == original.data.tags["device"]
    return json.loads(Path(store.client.download_artifacts(rerun.info.run_id, REPORT_JSON, str(tmp_path))).read_text())


def test_a_deterministic_run_reproduces_bitwise(device, trained, on_device_store, tmp_path):
    from pipelines.reproduce import AGREES

    report = reproduce(on_device_store, trained["fp32"], tmp_path)
    assert report["verdict"] == AGREES, report["differences"]
    assert report["weights"]["identical"] and report["weights"]["max_abs_diff"] == 0.0
    assert all(row["abs_diff"] == 0.0 for row in report["metrics"]), report["metrics"]


def test_a_run_without_determinism_reproduces_within_the_documented_tolerance(device, trained, on_device_store,
                                                                               tmp_path):
    from pipelines.reproduce import AGREES, NON_DETERMINISTIC_TOLERANCE

    report = reproduce(on_device_store, trained["bf16"], tmp_path)
    assert report["tolerance"]["weights_abs"] == report["tolerance"]["metrics_rel"] == NON_DETERMINISTIC_TOLERANCE
    assert report["verdict"] == AGREES, report["differences"]
    assert report["weights"]["max_abs_diff"] <= NON_DETERMINISTIC_TOLERANCE


def test_evaluate_runs_on_the_device(device, trained, on_device_store):
    from pipelines.entrypoints import evaluate

    source = trained["fp32"]
    with allocates_on(device):
        out = run(evaluate.main, "--model-uri", source.info.run_id, "--device", device, "--k", "10",
                  "--limit-test", LIMIT_TEST, "--classifier-train-size", "500", "--classifier-epochs", "1")
    (summary,) = [line for line in out.splitlines() if line.startswith("evaluate run ")]
    evaluation = on_device_store.client.get_run(summary.split()[2])
    assert evaluation.info.status == "FINISHED"
    assert evaluation.data.tags["evaluated_model_uri"] == source.data.tags["model_uri"]
    metrics = evaluation.data.metrics
    assert metrics["test/neg_elbo"] == pytest.approx(source.data.metrics["test/neg_elbo"], rel=0.01)
    assert metrics["test/iwae_bound_k10"] <= metrics["test/neg_elbo"] * 1.01


def test_generate_runs_on_the_device(device, trained, on_device_store, tmp_path):
    from pipelines.entrypoints import generate

    source, output = trained["bf16"], tmp_path / "grid.png"
    with allocates_on(device):
        run(generate.main, "--model-uri", source.info.run_id, "--labels", "0,1", "--n", "4", "--device", device,
            "--output", str(output))
    (generated,) = on_device_store.runs(f"tags.generated_from = '{source.data.tags['model_uri']}'")
    assert generated.info.status == "FINISHED"
    tile = 28 + generate.GRID_PADDING
    with Image.open(output) as image:
        assert image.size == (4 * tile + generate.GRID_PADDING, 2 * tile + generate.GRID_PADDING)
