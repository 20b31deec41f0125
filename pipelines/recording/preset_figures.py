"""The figures of the reference notebooks, which their presets' runs add to the generic ones.

``preset_figure_builders(preset, ...)`` returns artifact path -> drawing function, like
``run_figures.figure_builders``. A figure appears only where the model can draw it: a run that
starts from a preset and then overrides, say, the latent size or the conditioning simply leaves
out the figures that no longer apply.
"""
from __future__ import annotations

from typing import Callable

import matplotlib.pyplot as plt
import torch

from cvae import CVAE
from pipelines.data import STATIC_BINARIZATION_THRESHOLD as BINARIZATION_THRESHOLD
from pipelines.data import Batcher, DatasetSplits, as_unit_floats
from pipelines.presets import notebook_of
from pipelines.recording import figures

Builders = dict[str, Callable[[], plt.Figure]]

TRAVERSAL_CLASSES = (0, 1)  # the two classes whose 8x8 latent traversals mlp-concat draws
TRAVERSAL_GRID, TRAVERSAL_EXTENT = 8, 1.5
MANIFOLD_GRID, MANIFOLD_EXTENT = 30, 1.5
SAMPLED_CLASS = 0  # the class whose 3x3 random samples conv-label-channel draws
BINARIZATION_EXAMPLES = 4


@torch.no_grad()
def split_latents(model: CVAE, split, batcher: Batcher, limit: int, batch_size: int = 1000):
    """Posterior means and labels of the first ``limit`` examples of a split, as NumPy arrays."""
    means, labels, seen = [], [], 0
    for x, y in batcher.eval_batches(split, batch_size):
        mu, _ = model.encode(x, y)
        means.append(mu.float().cpu())
        labels.append(y.cpu())
        seen += len(y)
        if seen >= limit:
            break
    return torch.cat(means)[:limit].numpy(), torch.cat(labels)[:limit].numpy()


def _device(model: CVAE) -> torch.device:
    return next(model.parameters()).device


def _grid_decodes(model: CVAE, grid_size: int, extent: float, label: int | None) -> torch.Tensor:
    points = figures.latent_grid_points(grid_size, extent).to(_device(model))
    labels = None if label is None else torch.full((len(points),), label, device=points.device)
    return model.mean_image(model.decode(points, labels))


def training_latent_scatter(model: CVAE, splits: DatasetSplits, batcher: Batcher, limit: int = 5000) -> Builders:
    return {"figures/latent_scatter_train.png": lambda: figures.latent_scatter(
        *split_latents(model, splits.train, batcher, limit), splits.class_names,
        title=f"Training-set latent means by label ({model.latent_dim}-D)")}


def class_decodes_at_origin(model: CVAE, splits: DatasetSplits, batcher: Batcher) -> Builders:
    if not model.conditional:
        return {}

    def draw() -> plt.Figure:
        shown, of_all = figures.classes_shown(splits.num_classes)
        labels = torch.arange(shown, device=_device(model))
        z = torch.zeros(len(labels), model.latent_dim, device=labels.device)
        return figures.labelled_images(model.mean_image(model.decode(z, labels)), splits.class_names[:shown],
                                       f"Each class decoded at z = 0{of_all}")
    return {"figures/class_decodes_z0.png": draw}


def class_traversals(model: CVAE, splits: DatasetSplits, batcher: Batcher) -> Builders:
    if not model.conditional or model.latent_dim != 2:
        return {}
    size, extent = TRAVERSAL_GRID, TRAVERSAL_EXTENT
    return {f"figures/latent_traversal_{size}x{size}_class{k}.png": (
        lambda k=k: figures.latent_grid(_grid_decodes(model, size, extent, k), size, extent,
                                        f"{size}x{size} latent traversal for class "
                                        f"{figures.short_name(splits.class_names[k])!r}"))
        for k in TRAVERSAL_CLASSES if k < splits.num_classes}


def class_samples_3x3(model: CVAE, splits: DatasetSplits, batcher: Batcher) -> Builders:
    if not model.conditional:
        return {}
    generator = torch.Generator(device=_device(model)).manual_seed(0)
    return {f"figures/class{SAMPLED_CLASS}_samples_3x3.png": lambda: figures.image_rows(
        model.sample([SAMPLED_CLASS], 9, generator=generator), [""] * 3, 3,
        f"Random samples of class {figures.short_name(splits.class_names[SAMPLED_CLASS])!r}")}


def latent_manifold_30x30(model: CVAE, splits: DatasetSplits, batcher: Batcher) -> Builders:
    if model.conditional or model.latent_dim != 2:
        return {}
    size, extent = MANIFOLD_GRID, MANIFOLD_EXTENT
    return {f"figures/latent_manifold_{size}x{size}.png": lambda: figures.latent_grid(
        _grid_decodes(model, size, extent, None), size, extent, f"{size}x{size} latent manifold")}


def binarization_strip(model: CVAE, splits: DatasetSplits, batcher: Batcher) -> Builders:
    def draw() -> plt.Figure:
        test = splits.test
        n = min(BINARIZATION_EXAMPLES, len(test))
        inputs = as_unit_floats(test.images[:n])
        binarized = (inputs >= BINARIZATION_THRESHOLD).float()
        # Like the tutorial, decode one posterior sample rather than the posterior mean.
        generator = torch.Generator(device=inputs.device).manual_seed(0)
        reconstruction = model.mean_image(model(binarized, test.labels[:n], generator=generator).decoded)
        return figures.image_table(
            [inputs, binarized, reconstruction, (reconstruction >= BINARIZATION_THRESHOLD).float()],
            ["input", "binarized", "reconstruction", "binarized\nreconstruction"],
            f"Static binarization at {BINARIZATION_THRESHOLD}")
    return {"figures/binarization_reconstructions.png": draw}


FigureSet = Callable[[CVAE, DatasetSplits, Batcher], Builders]

# What each notebook drew beyond the generic figures (loss curves, test latent scatter, 10 inputs
# vs reconstructions, samples), which every run logs anyway.
PRESET_FIGURES: dict[str, tuple[FigureSet, ...]] = {
    "conv-decoder-cond": (class_decodes_at_origin,),
    "mlp-concat": (training_latent_scatter, class_decodes_at_origin, class_traversals),
    "conv-label-channel": (class_samples_3x3,),
    "mlp-vae": (latent_manifold_30x30,),
    "conv-vae": (binarization_strip,),
}


def preset_figure_builders(preset: str, model: CVAE, splits: DatasetSplits, batcher: Batcher) -> Builders:
    """The figures of ``preset``'s notebook (a ``NAME-fixed`` preset draws NAME's)."""
    builders: Builders = {}
    for figure_set in PRESET_FIGURES.get(notebook_of(preset), ()):
        builders.update(figure_set(model, splits, batcher))
    return builders
