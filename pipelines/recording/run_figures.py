"""The figures a training run logs, computed from a trained model and its data splits."""
from __future__ import annotations

from typing import Callable, Sequence

import matplotlib.pyplot as plt
import torch

from cvae import CVAE
from pipelines.data import Batcher, DatasetSplits
from pipelines.recording import figures
from pipelines.recording.preset_figures import preset_figure_builders, split_latents

SCATTER_POINTS = 5000
TRAVERSAL_GRID = 15
TRAVERSAL_EXTENT = 2.0


@torch.no_grad()
def figure_builders(model: CVAE, splits: DatasetSplits, batcher: Batcher, history: Sequence[dict],
                    traversal_class: int = 0, preset: str = "") -> dict[str, Callable[[], plt.Figure]]:
    """Artifact path -> a function that draws the figure (so callers can draw one at a time).

    The generic figures, plus those of ``preset``'s reference notebook (see ``preset_figures``).
    """
    model.eval()
    device = next(model.parameters()).device
    x, y = next(batcher.eval_batches(splits.test, 10))
    names = splits.class_names
    builders: dict[str, Callable[[], plt.Figure]] = {
        "figures/loss_curves.png": lambda: figures.loss_curves(history),
        "figures/latent_scatter_test.png": lambda: figures.latent_scatter(
            *split_latents(model, splits.test, batcher, SCATTER_POINTS), names,
            title=f"Test-set latent means by label ({model.config.latent_dim}-D)"),
        "figures/reconstructions.png": lambda: figures.reconstruction_grid(
            x, model.reconstruct(x, y)),
    }
    generator = torch.Generator(device=device).manual_seed(0)
    if model.config.conditional:
        per_class = 10
        shown, of_all = figures.classes_shown(splits.num_classes)
        labels = torch.arange(shown, device=device)
        builders["figures/class_samples.png"] = lambda: figures.image_rows(
            model.sample(labels, per_class, generator=generator), names[:shown], per_class,
            f"Class-conditional samples (a row per class){of_all}")
    else:
        builders["figures/samples.png"] = lambda: figures.image_rows(
            model.sample(None, 100, generator=generator), [""] * 10, 10, "Samples")
    if model.config.latent_dim == 2:
        points = figures.latent_grid_points(TRAVERSAL_GRID, TRAVERSAL_EXTENT).to(device)
        if model.config.conditional:
            cls = torch.full((len(points),), traversal_class, device=device, dtype=torch.long)
            builders[f"figures/latent_traversal_class{traversal_class}.png"] = lambda: figures.latent_grid(
                model.mean_image(model.decode(points, cls)), TRAVERSAL_GRID, TRAVERSAL_EXTENT,
                f"Latent traversal for class {figures.short_name(names[traversal_class])!r}")
        else:
            builders["figures/latent_manifold.png"] = lambda: figures.latent_grid(
                model.mean_image(model.decode(points, None)), TRAVERSAL_GRID, TRAVERSAL_EXTENT,
                "2-D latent manifold")
    builders.update(preset_figure_builders(preset, model, splits, batcher))
    return builders
