"""One's own images: a folder per class and an npz file (made here: 3 classes, RGB, 20×24, some
JPEGs), CIFAR-10 and SVHN laid out as torchvision does; the uint8 cache (hit, miss, whole or absent),
the digests of the bytes read, every bad input through the real `train` entry point, and one real
`train` on each of a folder and an npz file, checked in what MLflow recorded."""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_no_running, in_process_on, make_store
from cvae.config import ConfigError
from pipelines.config import DataConfig
from pipelines.data import DataUnavailableError, check_available, class_names, dataset_shape, load_splits, source_identity

CLASSES = ("cat", "dog", "owl")
HEIGHT, WIDTH = 20, 24
PER_CLASS = 12
CPU = torch.device("cpu")
TINY = ["--val-size", "6", "--epochs", "1", "--arch", "mlp", "--hidden", "16", "--latent-dim", "2", "--batch-size", "16"]


def pixels(seed: int, shape=(HEIGHT, WIDTH, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_folder(root: Path) -> Path:
    """3 class sub-folders of RGB 20×24 images, every fourth a JPEG, the rest PNGs."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for k in range(PER_CLASS):
            image = Image.fromarray(pixels(100 * c + k))
            image.save(root / name / (f"{k:02d}.jpg" if k % 4 == 0 else f"{k:02d}.png"))
    return root


def make_npz(path: Path, **arrays) -> Path:
    n = 3 * PER_CLASS
    base = {"x": pixels(7, (n, HEIGHT, WIDTH, 3)), "y": np.arange(n) % 3, "classes": np.array(CLASSES)}
    np.savez(path, **{k: v for k, v in {**base, **arrays}.items() if v is not None})
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("CVAE_CACHE_DIR", str(directory))
    return directory


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "pets")


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def example(splits, position: int) -> tuple[torch.Tensor, int]:
    """The image and label of the source's example ``position``, whichever split holds it."""
    for split in (splits.train, splits.val, splits.test):
        found = (split.example_index == position).nonzero()
        if len(found):
            return split.images[int(found[0])], int(split.labels[int(found[0])])
    raise AssertionError(f"example {position} is in no split")


# --- readers ---------------------------------------------------------------------------------------

def test_a_folder_is_read_with_its_class_names_pixels_and_a_drawn_test_set(folder, cache):
    config = DataConfig(dataset=f"folder:{folder}", val_size=6)
    splits = load_splits(config, CPU)
    assert splits.class_names == CLASSES and splits.image_shape == (3, HEIGHT, WIDTH)
    assert dataset_shape(config) == ((3, HEIGHT, WIDTH), 3) and class_names(config) == CLASSES
    assert (len(splits.train), len(splits.val), len(splits.test)) == (23, 6, 7)  # 36 images, 0.2 drawn as test
    assert splits.test_split == {"drawn_from": 36, "test_fraction": 0.2, "examples": 7, "split_seed": 0}
    every = torch.cat([s.example_index for s in (splits.train, splits.val, splits.test)])
    assert sorted(every.tolist()) == list(range(36))  # each image in exactly one split
    image, label = example(splits, PER_CLASS + 1)  # dog/01.png: lossless, so its pixels are those written
    assert torch.equal(image, torch.from_numpy(pixels(101)).permute(2, 0, 1)) and label == 1
    again = load_splits(config, CPU)
    assert torch.equal(again.test.images, splits.test.images)  # the same seed draws the same sets
    other = load_splits(replace(config, split_seed=1), CPU)
    assert not torch.equal(other.test.example_index, splits.test.example_index)


def test_image_size_and_channels_convert_once(folder, cache):
    grey = load_splits(DataConfig(dataset=f"folder:{folder}", val_size=6, image_channels=1), CPU)
    assert grey.image_shape == (1, HEIGHT, WIDTH)
    reference = np.asarray(Image.open(folder / "cat" / "01.png").convert("L"))
    assert np.array_equal(example(grey, 1)[0][0].numpy(), reference)
    square = load_splits(DataConfig(dataset=f"folder:{folder}", val_size=6, image_size=(16,)), CPU)
    assert square.image_shape == (3, 16, 16)
    assert load_splits(DataConfig(dataset=f"folder:{folder}", val_size=6, image_size=(10, 12), image_channels=1),
                       CPU).image_shape == (1, 10, 12)
    assert len(cache_files(cache)) == 3  # one cache file per (bytes, settings)


def test_an_npz_file_with_its_own_test_set_and_grey_images(tmp_path, cache):
    path = make_npz(tmp_path / "own.npz", x=pixels(1, (30, 8, 9)), y=np.arange(30) % 3,
                    x_test=pixels(2, (5, 8, 9)), y_test=np.array([0, 1, 2, 0, 1]))
    splits = load_splits(DataConfig(dataset=f"npz:{path}", val_size=5), CPU)
    assert splits.image_shape == (1, 8, 9) and splits.class_names == CLASSES and splits.test_split is None
    assert (len(splits.train), len(splits.val), len(splits.test)) == (25, 5, 5)
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(pixels(2, (5, 8, 9))))
    assert splits.test.source == "test" and splits.source_files == {
        "own.npz": hashlib.sha256(path.read_bytes()).hexdigest()}
    unnamed = make_npz(tmp_path / "unnamed.npz", classes=None)
    assert class_names(DataConfig(dataset=f"npz:{unnamed}")) == ("0", "1", "2")


def test_a_relative_path_is_found_under_the_data_root(folder, cache, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path / "pets" / "cat")
    config = DataConfig(dataset="folder:pets", data_dir=str(tmp_path), val_size=6)
    assert load_splits(config, CPU).root == str(folder)


# --- cache and digests -----------------------------------------------------------------------------

def test_decoding_happens_once_and_other_bytes_or_settings_miss(folder, cache, monkeypatch, caplog):
    from pipelines.data.sources import folder as folder_source

    config = DataConfig(dataset=f"folder:{folder}", val_size=6)
    with caplog.at_level(logging.INFO, logger="pipelines.data"):
        first = load_splits(config, CPU)
    assert any("decoded 36 images" in m for m in caplog.messages)
    (name,) = cache_files(cache)
    monkeypatch.setattr(folder_source, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    hit = load_splits(config, CPU)
    assert torch.equal(hit.train.images, first.train.images) and hit.source_files == first.source_files
    Image.fromarray(pixels(999)).save(folder / "owl" / "05.png")  # other bytes: a new key, decoded again
    monkeypatch.undo()
    monkeypatch.setenv("CVAE_CACHE_DIR", str(cache))
    changed = load_splits(config, CPU)
    assert changed.source_files != first.source_files and len(cache_files(cache)) == 2 and name in cache_files(cache)


def test_a_folder_digest_is_of_the_bytes_and_paths_not_of_where_it_lies(folder, cache, tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(folder, moved)
    here = load_splits(DataConfig(dataset=f"folder:{folder}", val_size=6), CPU).source_files
    there = load_splits(DataConfig(dataset=f"folder:{moved}", val_size=6), CPU).source_files
    files = sorted(folder.rglob("*.*"))
    pairs = sorted((p.relative_to(folder).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()) for p in files)
    expected = hashlib.sha256("".join(f"{n}\0{s}\n" for n, s in pairs).encode()).hexdigest()
    assert here == there == {"folder": expected}
    assert len(cache_files(cache)) == 1  # the same bytes and settings: one cache file for both
    assert source_identity(DataConfig(dataset=f"folder:{folder}")).startswith(f"folder:{folder}@")
    assert source_identity(DataConfig(dataset="mnist")) == "mnist"


def test_a_cache_write_that_fails_leaves_nothing_and_a_damaged_cache_file_is_decoded_again(folder, cache,
                                                                                           monkeypatch, caplog):
    from pipelines.data import cache as cache_module

    def cut_short(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # stopped mid-write

    config = DataConfig(dataset=f"folder:{folder}", val_size=6)
    monkeypatch.setattr(cache_module.np, "savez", cut_short)
    with pytest.raises(KeyboardInterrupt):
        load_splits(config, CPU)
    assert cache_files(cache) == []  # no half-written file, under its name or a temporary one
    monkeypatch.undo()
    monkeypatch.setenv("CVAE_CACHE_DIR", str(cache))
    good = load_splits(config, CPU)
    (name,) = cache_files(cache)
    (cache / name).write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING, logger="pipelines.data"):
        again = load_splits(config, CPU)
    assert any("cannot be read" in m and "decoding again" in m for m in caplog.messages)
    assert torch.equal(again.train.images, good.train.images)


# --- CIFAR-10 and SVHN in torchvision's layout ------------------------------------------------------

def test_our_table_of_torchvision_sets_agrees_with_torchvision():
    from torchvision import datasets

    from pipelines.data.sources.torchvision_sets import DATASETS

    cifar = DATASETS["cifar10"]
    assert cifar.folder == datasets.CIFAR10.base_folder
    assert cifar.files == (*(f for f, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list),
                           datasets.CIFAR10.meta["filename"])
    assert DATASETS["svhn"].files == tuple(datasets.SVHN.split_list[s][1] for s in ("train", "test"))


def write_cifar(root: Path, n: int = 4) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
        batch = {"data": pixels(k, (n, 3 * 32 * 32)), "labels": [(k + i) % 10 for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane"] * 10}))


def write_svhn(root: Path, n: int = 12) -> None:
    from scipy.io import savemat

    for split, seed in (("train", 0), ("test", 1)):
        savemat(root / f"{split}_32x32.mat", {"X": pixels(seed, (32, 32, 3, n)), "y": (np.arange(n) % 10 + 1)[:, None]})


@pytest.mark.parametrize("name, write, sizes", [("cifar10", write_cifar, (20, 4)), ("svhn", write_svhn, (12, 12))])
def test_cifar10_and_svhn_are_read_from_torchvisions_layout_offline(name, write, sizes, tmp_path, cache, monkeypatch):
    from torchvision import datasets

    from pipelines.data.sources.torchvision_sets import DATASETS

    monkeypatch.setenv("CVAE_OFFLINE", "1")
    config = DataConfig(dataset=name, data_dir=str(tmp_path), val_size=2)
    with pytest.raises(DataUnavailableError, match=f"^{name} data not found and not downloadable \\(CVAE_OFFLINE"):
        check_available(config)
    assert cache_files(cache) == []
    write(tmp_path)
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.SVHN
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)  # our files are not the real ones
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    splits = load_splits(config, CPU)
    assert splits.image_shape == (3, 32, 32) and len(splits.class_names) == 10
    assert (len(splits.train) + len(splits.val), len(splits.test)) == sizes
    assert set(splits.source_files) == set(DATASETS[name].files)
    assert all(splits.source_files[f] == hashlib.sha256((tmp_path / DATASETS[name].folder / f).read_bytes()).hexdigest()
               for f in DATASETS[name].files)
    if name == "svhn":
        assert set(splits.train.labels.tolist()) <= set(range(10)) and 0 in splits.test.labels.tolist()  # 10 -> 0
    monkeypatch.setattr(cls, "_check_integrity", lambda self: False)  # decoded once: the cache answers
    assert torch.equal(load_splits(config, CPU).test.images, splits.test.images)


# --- bad input, through the real `train` entry point ----------------------------------------------

def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    return errors[0][len("error: "):]


def bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    """(flags, the start of the one error line) for each kind of bad input."""
    flat = tmp / "flat"
    flat.mkdir(parents=True)
    Image.fromarray(pixels(0)).save(flat / "a.png")
    mixed = make_folder(tmp / "mixed")
    Image.fromarray(pixels(1, (16, 16, 3))).save(mixed / "dog" / "odd.png")
    broken = make_folder(tmp / "broken")
    (broken / "owl" / "03.png").write_bytes(b"\x89PNG not really")
    cut = make_folder(tmp / "cut")
    whole = (cut / "cat" / "02.png").read_bytes()
    (cut / "cat" / "02.png").write_bytes(whole[: len(whole) // 2])
    empty = make_folder(tmp / "empty")
    shutil.rmtree(empty / "dog")
    (empty / "dog").mkdir()
    (empty / "dog" / "notes.txt").write_text("no images here")
    n = 3 * PER_CLASS
    npz = {name: make_npz(tmp / f"{name}.npz", **arrays) for name, arrays in {
        "negative": {"y": np.arange(n) % 3 - 1},
        "beyond": {"y": np.arange(n) % 4},
        "unused": {"y": np.arange(n) % 2},
        "none": {"x": np.zeros((0, HEIGHT, WIDTH), np.uint8), "y": np.zeros(0, np.int64)},
        "floats": {"x": pixels(3, (n, HEIGHT, WIDTH)).astype(np.float32)},
        "short": {"y": np.arange(n - 1) % 3},
    }.items()}
    return [
        ([f"--dataset=folder:{flat}"], f"folder:{flat}: {flat} has no class sub-folders"),
        ([f"--dataset=folder:{mixed}"], f"folder:{mixed} holds images of different sizes: "),
        ([f"--dataset=folder:{broken}"], f"{broken / 'owl' / '03.png'} cannot be read as an image: "),
        ([f"--dataset=folder:{cut}"], f"{cut / 'cat' / '02.png'} cannot be read as an image: "),
        ([f"--dataset=folder:{empty}"], f"folder:{empty}: the class 'dog' ({empty / 'dog'}) holds no images"),
        ([f"--dataset=npz:{npz['negative']}"], f"{npz['negative']}: y holds the label -1, outside 0..2"),
        ([f"--dataset=npz:{npz['beyond']}"], f"{npz['beyond']}: y holds the label 3, outside 0..2"),
        ([f"--dataset=npz:{npz['unused']}"], f"{npz['unused']}: y has no image of class 2 ('owl')"),
        ([f"--dataset=npz:{npz['none']}"], f"{npz['none']}: x holds no images"),
        ([f"--dataset=npz:{npz['floats']}"], f"{npz['floats']}: x is float32; expected uint8 images"),
        ([f"--dataset=npz:{npz['short']}"], f"{npz['short']}: x holds 36 images but y 35 labels"),
        ([f"--dataset=npz:{npz['beyond']}", "--image-channels", "2"],
         "data.image_channels=2 is not valid; expected 1 (grey) or 3 (RGB)"),
        ([f"--dataset=folder:{tmp / 'absent'}"], f"data.dataset='folder:{tmp / 'absent'}' is not valid; no such directory"),
        ([f"--dataset=npz:{tmp / 'absent.npz'}"], f"data.dataset='npz:{tmp / 'absent.npz'}' is not valid; no such file"),
        (["--dataset=mnist", "--image-size", "32"], "data.image_size='32' is not valid for mnist"),
    ]


def test_bad_input_is_refused_in_one_line_before_a_run_and_leaves_the_cache_empty(store, in_process, tmp_path, cache):
    from pipelines.entrypoints.train import main

    for flags, message in bad_inputs(tmp_path / "inputs"):
        code, stderr = in_process(main, *TINY, *flags)
        assert code == 2 and one_error_line(stderr).startswith(message), (flags, stderr)
    assert store.runs() == [] and cache_files(cache) == []
    assert_no_running(store)


def test_bad_values_of_the_new_fields_name_the_field():
    for overrides, message in [({"image_size": (0,)}, "data.image_size='0' is not valid"),
                               ({"image_size": (1, 2, 3)}, "data.image_size='1,2,3' is not valid"),
                               ({"test_fraction": 1.0}, "data.test_fraction=1.0 is not valid"),
                               ({"dataset": "folder:"}, "data.dataset='folder:' is not valid; choose one of: ")]:
        with pytest.raises(ConfigError, match=f"^{message}"):
            DataConfig(**{"dataset": "folder:x", **overrides})


# --- a real `train` on each, and what MLflow recorded ---------------------------------------------

@pytest.fixture(scope="module")
def trained_on_own_data(tmp_path_factory, data_dir):
    """One tiny MLP trained in-process on a folder and one on an npz file, in one store."""
    from types import SimpleNamespace

    from pipelines.entrypoints.train import main

    root = tmp_path_factory.mktemp("own-data")
    store = make_store(root / "store", data_dir)
    folder = make_folder(root / "pets")
    npz = make_npz(root / "own.npz")
    codes = []
    with pytest.MonkeyPatch.context() as monkeypatch, in_process_on(store, monkeypatch) as run:
        monkeypatch.setenv("CVAE_CACHE_DIR", str(root / "cache"))
        codes.append(run(main, *TINY, f"--dataset=folder:{folder}", "--run-name", "folder")[0])
        codes.append(run(main, *TINY, f"--dataset=npz:{npz}", "--image-size", "16,12", "--image-channels", "1",
                         "--run-name", "npz")[0])
    assert codes == [0, 0]
    runs = {r.info.run_name: r for r in store.runs()}
    return SimpleNamespace(store=store, runs=runs, folder=folder, npz=npz)


def recorded_inputs(run) -> dict[str, object]:
    return {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_train_on_own_data_records_its_source_digest_and_shape(trained_on_own_data, kind, tmp_path):
    from pipelines.config import from_params
    from pipelines.recording.manifest import load_manifest
    from pipelines.tracking.datasets import split_digest

    run = trained_on_own_data.runs[kind]
    assert run.info.status == "FINISHED"
    path = trained_on_own_data.folder if kind == "folder" else trained_on_own_data.npz
    manifest = load_manifest(trained_on_own_data.store.client, run.info.run_id)
    files = manifest["data"]["source_files_sha256"]
    if kind == "folder":
        assert set(files) == {"folder"}
        shape, names = [3, HEIGHT, WIDTH], list(CLASSES)
    else:
        assert files == {"own.npz": hashlib.sha256(path.read_bytes()).hexdigest()}
        shape, names = [1, 16, 12], list(CLASSES)
        assert run.data.params["data.image_size"] == "16,12" and run.data.params["data.image_channels"] == "1"
    assert run.data.params["data.dataset"] == f"{kind}:{path}"
    assert manifest["data"]["image_shape"] == shape and manifest["data"]["class_names"] == names
    assert manifest["data"]["test_split"] == {"drawn_from": 36, "test_fraction": 0.2, "examples": 7, "split_seed": 0}
    config = from_params(run.data.params)
    inputs = recorded_inputs(run)
    assert set(inputs) == {"training", "validation", "test"}
    for context, split in (("training", "train"), ("validation", "val"), ("test", "test")):
        dataset = inputs[context]
        profile = json.loads(dataset.profile)
        assert dataset.name == f"{kind}:{path}" and dataset.digest == split_digest(files, config, split)
        assert json.loads(dataset.source)["uri"].endswith(str(path))
        assert profile["source_files_sha256"] == files and profile["image_shape"] == shape
        assert profile["class_names"] == names and profile["test_split"]["examples"] == 7
    assert sum(json.loads(inputs[c].profile)["examples"] for c in inputs) == 36


def test_a_model_of_own_colour_images_is_evaluated_generated_reproduced_and_tuned(trained_on_own_data, tmp_path):
    """Everything after `train` on a folder of 3x20x24 colour images, in the same store: evaluate (its
    judge trained on the folder's images), generate (a colour grid named by the folder's classes),
    reproduce (same bytes, same numbers), and a one-trial `tune` on the folder. (`mlflow models serve`
    of a colour model: tests/test_generate_serve.py.)"""
    from PIL import Image

    from pipelines.entrypoints.evaluate import main as evaluate
    from pipelines.entrypoints.generate import main as generate
    from pipelines.entrypoints.reproduce import main as reproduce
    from pipelines.entrypoints.tune import main as tune

    own = trained_on_own_data
    run_id = own.runs["folder"].info.run_id
    grid = tmp_path / "grid.png"
    with pytest.MonkeyPatch.context() as monkeypatch, in_process_on(own.store, monkeypatch) as run:
        monkeypatch.setenv("CVAE_CACHE_DIR", str(own.folder.parent / "cache"))
        codes = {
            "evaluate": run(evaluate, "--model-uri", run_id, "--k", "2", "--classifier-epochs", "1",
                            "--run-name", "evaluated")[0],
            "generate": run(generate, "--model-uri", run_id, "--n", "2", "--output", str(grid))[0],
            "reproduce": run(reproduce, "--run-id", run_id)[0],
            "tune": run(tune, *TINY, f"--dataset=folder:{own.folder}", "--space", "optimiser", "--n-trials", "1",
                        "--study", "own", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}",
                        "--register-as", "none")[0],
        }
    assert codes == {"evaluate": 0, "generate": 0, "reproduce": 0, "tune": 0}
    runs = {r.info.run_name: r for r in own.store.runs()}
    evaluated = runs["evaluated"]
    assert evaluated.info.status == "FINISHED" and evaluated.data.metrics["test/neg_elbo"] > 0
    assert 0 <= evaluated.data.metrics["test/sample_accuracy"] <= 1  # judged by a classifier of the folder
    image = Image.open(grid)
    assert image.mode == "RGB" and image.width >= 2 * WIDTH and image.height >= len(CLASSES) * HEIGHT
    reproduced = [r for r in runs.values() if r.data.tags.get("reproduction_verdict")]
    assert [r.data.tags["reproduction_verdict"] for r in reproduced] == ["agrees"]
    trials = [r for r in runs.values() if r.data.tags.get("study") == "own" and "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert trials[0].data.params["data.dataset"] == f"folder:{own.folder}"
    assert_no_running(own.store)
