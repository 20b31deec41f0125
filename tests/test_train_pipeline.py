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
# A high learning rate on a few images with patience 1: training stops early, so by construction
# its last epoch is not its best one.
OVERSHOOTS = {"dataset": "fashion-mnist", "limit_train": 100, "val_size": 50, "limit_test": 50, "hidden": "32",
              "latent_dim": 4, "lr": 0.03, "batch_size": 20, "epochs": 20, "patience": 1, "device": "cpu"}


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

    from pipelines.config import PRESET_PARAM, from_dict, from_params
    from pipelines.data import Batcher, load_splits
    from pipelines.models.model_resolution import resolve_model
    from pipelines.recording.manifest import load_manifest
    from pipelines.training.train import evaluate_split

    # No preset and no data directory: no blank params, and the params still rebuild the
    # configuration the run trained (its manifest's), as do the logged model's.
    assert "" not in params.values() and PRESET_PARAM not in params and "data.data_dir" not in params
    config = from_params(params)
    assert config == from_dict(load_manifest(client, run.info.run_id)["config"])
    logged_model = client.get_logged_model(tags["model_uri"].removeprefix("models:/"))
    assert "" not in logged_model.params.values() and from_params(logged_model.params) == config
    assert resolve_model(run.info.run_id, client).config == config

    mlflow.set_tracking_uri(store.uri)
    model = mlflow.pytorch.load_model(tags["model_uri"])
    model_again = mlflow.pytorch.load_model(tags["model_uri"])
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
    (["--dataset", "imagenet"], "data.dataset='imagenet' is not valid; choose one of: mnist, fashion-mnist, kmnist, "
                                "cifar10, svhn, folder:PATH, npz:PATH"),
    (["--dataset", "mnist"], "mnist data not found and not downloadable"),
    (["--device", "cuda:7"], "execution.device='cuda:7' is not valid"),
])
def test_bad_input_exits_2_with_one_line_and_no_run(store, in_process, tmp_path, args, message):
    # In-process: the same exit code and line as a real process (one is: test_faults, test_ui_metadata).
    from pipelines.entrypoints.train import main

    if "cuda:7" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine really has a cuda:7")
    (tmp_path / "empty").mkdir()  # a folder without the data (a missing one is refused as such: test_bad_input)
    code, stderr = in_process(main, *TINY_DATA, "--data-dir", str(tmp_path / "empty"), *args)
    assert code == 2
    assert message in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
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


@pytest.fixture(scope="module")
def early_stopped(data_dir):
    """In-process trainings on the same data and seed that stop early: keeping the last epoch's
    weights, restoring the best, and a run cut at that best epoch (its last weights are the best
    checkpoint's, bitwise: CPU training is deterministic)."""
    from pipelines.config import RunConfig, with_overrides
    from pipelines.data import load_splits
    from pipelines.training.train import train

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CVAE_DATA_DIR", str(data_dir))
        patch.setenv("CVAE_OFFLINE", "1")
        base = with_overrides(RunConfig(), OVERSHOOTS)
        splits = load_splits(base.data, torch.device("cpu"))
        last = train(with_overrides(base, {"restore_best": False}), splits=splits)
        assert last.stopped_early and last.best_epoch < len(last.history), "the fixture must stop early"
        best = train(with_overrides(base, {"restore_best": True}), splits=splits)
        cut = train(with_overrides(base, {"restore_best": False, "epochs": last.best_epoch, "patience": 0}),
                    splits=splits)
    return {"last": last, "best": best, "cut_at_best": cut, "config": base}


def _val_loss(result, config):
    from pipelines.training.train import evaluate_split
    return evaluate_split(result.model, result.splits.val, result.batcher, config, result.device)["loss"]


def _same_weights(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_restore_best_false_keeps_the_last_epochs_weights(early_stopped):
    last, config = early_stopped["last"], early_stopped["config"]
    assert last.kept_epoch == len(last.history) > last.best_epoch
    assert not _same_weights(last.model, early_stopped["cut_at_best"].model)
    # Validation is seeded: the model's validation loss is the one its epoch logged.
    assert _val_loss(last, config) == last.history[-1]["val/loss"] != last.best_val_loss


def test_restore_best_true_keeps_the_best_epochs_weights(early_stopped):
    best, last, config = early_stopped["best"], early_stopped["last"], early_stopped["config"]
    assert [row["val/loss"] for row in best.history] == [row["val/loss"] for row in last.history]
    assert best.kept_epoch == best.best_epoch == last.best_epoch < len(best.history)
    assert _same_weights(best.model, early_stopped["cut_at_best"].model)
    assert _val_loss(best, config) == best.best_val_loss == best.history[best.best_epoch - 1]["val/loss"]


@pytest.mark.slow
def test_a_run_keeping_its_last_weights_records_which_epoch_they_are_from(store):
    """Through the entry point: kept_epoch names the epoch whose weights the logged model holds, and
    the test metrics are logged at that step."""
    import mlflow.pytorch

    from pipelines.config import from_params
    from pipelines.data import Batcher, load_splits
    from pipelines.training.train import evaluate_split

    args = [f"--{key.replace('_', '-')}={value}" for key, value in OVERSHOOTS.items()]
    done = store.cli("pipelines.entrypoints.train", *args, "--conditioning", "none", "--restore-best", "false")
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = store.runs()
    client, metrics = store.client, run.data.metrics
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    assert metrics["kept_epoch"] == max(val) > metrics["best_epoch"]
    assert metrics["best_val_loss"] == min(val.values()) < val[max(val)]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/loss")] == [max(val)]
    mlflow.set_tracking_uri(store.uri)
    model = mlflow.pytorch.load_model(run.data.tags["model_uri"])
    config = from_params(run.data.params)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CVAE_DATA_DIR", store.env["CVAE_DATA_DIR"])
        splits = load_splits(config.data, torch.device("cpu"))
    kept = evaluate_split(model, splits.val, Batcher(config.data.binarize, config.execution.seed, torch.device("cpu")),
                          config, torch.device("cpu"))
    assert kept["loss"] == pytest.approx(val[max(val)], rel=1e-6)


def test_a_loss_with_free_bits_does_not_depend_on_the_evaluation_batch_size(early_stopped):
    from cvae import gaussian_kl
    from pipelines.config import with_overrides
    from pipelines.training.train import evaluate_split

    result, batch = early_stopped["best"], 10
    val = result.splits.val
    with torch.no_grad():
        ((x, y),) = result.batcher.eval_batches(val, len(val))
        kl = gaussian_kl(*result.model.eval().encode(x, y))
    # Free bits at the split's mean KL of the dimension whose KL varies most between images, which
    # batches of 10 straddle: clamping each batch's KL and averaging the batches would give more
    # than clamping the split's.
    kl_of_a_used_dim = kl[:, kl.var(dim=0).argmax()]
    free_bits = float(kl_of_a_used_dim.mean())
    batch_means = kl_of_a_used_dim.view(-1, batch).mean(dim=1)
    assert batch_means.min() < free_bits < batch_means.max()
    config = with_overrides(early_stopped["config"], {"free_bits": free_bits})
    in_batches = evaluate_split(result.model, val, result.batcher, config, result.device, batch_size=batch)
    at_once = evaluate_split(result.model, val, result.batcher, config, result.device, batch_size=len(val))
    assert in_batches == pytest.approx(at_once, rel=1e-6)
    unclamped = evaluate_split(result.model, val, result.batcher, early_stopped["config"], result.device)
    assert in_batches["loss"] > unclamped["loss"]  # the clamp is in the number
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
