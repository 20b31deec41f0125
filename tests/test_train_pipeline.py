"""The `train` entry point end to end: what a short real run records in MLflow, and how it fails."""
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from conftest import TINY_DATA, TINY_PARAMS

EPOCHS = 3


@pytest.mark.slow
def test_mlflow_run_train_records_a_complete_run(store, tmp_path):
    done = store.mlflow_run("train", {**TINY_PARAMS, "epochs": EPOCHS, "latent_dim": 2, "hidden": "256",
                                      "patience": 0})
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = store.runs()
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["model.latent_dim"] == "2" and params["model.hidden"] == "256"
    assert params["data.dataset"] == "fashion-mnist" and params["optim.epochs"] == str(EPOCHS)
    for tag in ("dataset", "arch", "device_name", "torch_version", "cuda_version", "git_commit", "model_uri"):
        assert tag in tags

    client = store.client
    for key in ("train/loss", "train/recon", "train/kl", "val/loss", "val/recon", "val/kl", "lr",
                "epoch_time_s", "examples_per_s"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    assert val[EPOCHS] < val[1]
    for key in ("test/loss", "test/recon", "test/kl"):
        assert key in run.data.metrics

    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/loss_curves.png", "figures/latent_scatter_test.png",
                       "figures/reconstructions.png", "figures/class_samples.png",
                       "figures/latent_traversal_class0.png"}
    client.download_artifacts(run.info.run_id, "figures", str(tmp_path))
    for path in figures:
        with Image.open(f"{tmp_path}/{path}") as image:
            image.verify()
            assert image.format == "PNG"

    import mlflow.pytorch
    from pipelines.config import from_params
    from pipelines.data import Batcher, load_splits
    from pipelines.training.train import evaluate_split

    mlflow.set_tracking_uri(store.uri)
    model = mlflow.pytorch.load_model(tags["model_uri"])
    model_again = mlflow.pytorch.load_model(tags["model_uri"])
    config = from_params(params)
    x = torch.rand(4, 1, 28, 28)
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(model.encode(x, labels)[0], model_again.encode(x, labels)[0])
    # The reloaded weights give exactly the test loss the run logged (evaluation is seeded).
    import os
    os.environ["CVAE_DATA_DIR"] = store.env["CVAE_DATA_DIR"]
    splits = load_splits(config.data, torch.device("cpu"))
    test = evaluate_split(model, splits.test, Batcher(config.data.binarize, 0, torch.device("cpu")), config,
                          torch.device("cpu"))
    assert test["loss"] == pytest.approx(run.data.metrics["test/loss"], rel=1e-6)


@pytest.mark.slow
def test_bad_input_through_mlflow_run_fails_the_run(store):
    done = store.mlflow_run("train", {**TINY_PARAMS, "latent_dim": 0})
    assert done.returncode != 0
    assert "model.latent_dim=0 is not valid; expected an integer >= 1" in done.stderr
    (run,) = store.runs()
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("args, message", [
    (["--arch", "transformer"], "model.arch='transformer' is not valid; choose one of: mlp, conv"),
    (["--latent-dim", "0"], "model.latent_dim=0 is not valid"),
    (["--lr", "-0.01"], "optim.lr=-0.01 is not valid; expected a number > 0"),
    (["--dataset", "cifar10"], "data.dataset='cifar10' is not valid; choose one of: mnist, fashion-mnist, kmnist"),
    (["--dataset", "mnist"], "mnist data not found and not downloadable"),
    (["--device", "cuda:7"], "execution.device='cuda:7' is not valid"),
])
def test_bad_input_exits_2_with_one_line_and_no_run(store, tmp_path, args, message):
    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine really has a cuda:7")
    done = store.cli("pipelines.entrypoints.train", *TINY_DATA, "--data-dir", str(tmp_path / "empty"), *args)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert store.runs() == []


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_ends_the_run_killed_with_what_it_logged(store, stop_signal):
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines.entrypoints.train", *TINY_DATA, "--epochs", "200", "--patience", "0"],
        cwd=store.root, env=store.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        for line in process.stderr:  # the log
            if line.startswith("epoch 2:") or time.time() > deadline:
                break
        process.send_signal(stop_signal)
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 128 + stop_signal  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    (run,) = store.runs()
    assert run.info.status == "KILLED"
    assert len(store.client.get_metric_history(run.info.run_id, "val/loss")) >= 2


@pytest.mark.cuda
def test_trains_on_cuda_with_bf16(store):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    done = store.cli("pipelines.entrypoints.train", *TINY_DATA, "--epochs", "1", "--device", "cuda",
                     "--precision", "bf16")
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = store.runs()
    assert run.data.tags["device"].startswith("cuda") and run.data.tags["device_name"] != "cpu"


@pytest.mark.slow
def test_the_log_goes_to_stderr_and_quiet_keeps_the_output_alone(store):
    done = store.cli("pipelines.entrypoints.train", *TINY_DATA, "--epochs", "2", "--hidden", "32", "--latent-dim", "2",
                     "--patience", "0", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = store.runs()
    (summary,) = done.stdout.splitlines()  # the output: one summary line
    assert summary.startswith(f"run {run.info.run_id}: best epoch")
    assert "epoch 1:" not in done.stderr and "epoch 2:" not in done.stderr  # --quiet: no progress
    assert len(store.client.get_metric_history(run.info.run_id, "val/loss")) == 2
