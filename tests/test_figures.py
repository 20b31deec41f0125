"""The run's figures for images of any shape and any number of classes: colour grids shown as RGB,
grey ones as grey, every tile at its exact size, class names of any length, many classes."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import cvae
from cvae import ModelConfig
from pipelines.data import Batcher, DatasetSplits, SplitData
from pipelines.recording import figures
from pipelines.recording.run_figures import figure_builders

LONG_NAME = "a class whose name goes on far longer than any legend or axis has room for"
CPU = torch.device("cpu")


def tiny_splits(shape, class_names) -> DatasetSplits:
    g = torch.Generator().manual_seed(0)

    def split(name, n):
        images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        return SplitData(name, images, torch.arange(n) % len(class_names))
    return DatasetSplits("npz:tiny.npz", tuple(class_names), tuple(shape), split("train", 30), split("val", 6),
                         split("test", 30), {}, "")


def images_of(figure: plt.Figure) -> list[np.ndarray]:
    return [image.get_array() for ax in figure.axes for image in ax.get_images()]


@pytest.mark.parametrize("shape", [(3, 20, 24), (1, 7, 9)], ids=lambda s: "x".join(map(str, s)))
def test_every_run_figure_draws_for_any_shape_and_colour_is_shown_as_rgb(shape):
    names = ("cat", "dog", LONG_NAME)
    splits = tiny_splits(shape, names)
    torch.manual_seed(0)
    model = cvae.build(ModelConfig(arch="conv", channels=(4, 8), latent_dim=2, conditioning="decoder"),
                       shape, len(names)).eval()
    builders = figure_builders(model, splits, Batcher("none", 0, CPU), [{"epoch": 1, "train/loss": 1.0}],
                               preset="mlp-concat")  # its notebook's figures too: traversals, class decodes
    assert {Path(p).name for p in builders} >= {"reconstructions.png", "class_samples.png",
                                                "latent_traversal_class0.png", "class_decodes_z0.png",
                                                "latent_traversal_8x8_class1.png", "latent_scatter_train.png"}
    c, h, w = shape
    with torch.no_grad():
        for path, draw in builders.items():
            figure = draw()
            figure.canvas.draw()  # lays out every label: a name that broke the layout would fail here
            for array in images_of(figure):
                assert array.ndim == (3 if c == 3 else 2), path  # RGB, or one grey plane
                if c == 3:
                    assert not np.allclose(array[..., 0], array[..., 1]), path  # colour, not grey in RGB
            if path.endswith("class_samples.png"):
                (array,) = images_of(figure)
                assert array.shape[:2] == (3 * (h + 2) + 2, 10 * (w + 2) + 2)  # 3 rows of 10, each tile h x w
                labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
                assert labels == ["cat", "dog", figures.short_name(LONG_NAME)]
                assert len(labels[2]) == figures.MAX_LABEL_CHARS and labels[2].endswith("…")
            plt.close(figure)


@pytest.mark.parametrize("num_classes, legend", [(3, True), (25, True), (45, False)])
def test_latent_scatter_tells_any_number_of_classes_apart(num_classes, legend):
    rng = np.random.default_rng(0)
    labels = np.arange(200) % num_classes
    names = [f"class {k} " + "x" * k for k in range(num_classes)]
    figure = figures.latent_scatter(rng.normal(size=(200, 3)), labels, names)
    figure.canvas.draw()
    ax = figure.axes[0]
    colours = {tuple(np.round(c.get_facecolor()[0], 4)) for c in ax.collections if len(c.get_offsets())}
    assert len(colours) == num_classes  # one colour per class, none reused
    if legend:
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts == [figures.short_name(n) for n in names]
    else:
        assert ax.get_legend() is None and len(figure.axes) == 2  # a colour bar of class ids instead
        assert figure.axes[1].get_ylabel() == "class id"
    plt.close(figure)


def test_per_class_figures_show_at_most_the_first_classes():
    assert figures.classes_shown(10) == (10, "")
    assert figures.classes_shown(100) == (figures.MAX_CLASSES_SHOWN,
                                          f" (the first {figures.MAX_CLASSES_SHOWN} of 100 classes)")
