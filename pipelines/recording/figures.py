"""Figures as pure functions: arrays in, a matplotlib Figure out. Nothing here logs or saves."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

DPI = 100  # matplotlib's default figure dpi, which mlflow.log_figure saves at
MAX_LABEL_CHARS = 24  # longer class names are shortened (with an ellipsis) in legends and labels
MAX_CLASSES_SHOWN = 20  # figures with a row or a column per class show the first this many
MAX_LEGEND_ENTRIES = 30  # above this many classes the scatter has a colour bar of class ids instead


def short_name(name: str) -> str:
    """A class name cut to MAX_LABEL_CHARS characters (the last one an ellipsis when cut)."""
    name = str(name)
    return name if len(name) <= MAX_LABEL_CHARS else name[: MAX_LABEL_CHARS - 1] + "…"


def classes_shown(num_classes: int) -> tuple[int, str]:
    """How many classes a per-class figure shows, and what its title should add when that is not all."""
    shown = min(num_classes, MAX_CLASSES_SHOWN)
    return shown, ("" if shown == num_classes else f" (the first {shown} of {num_classes} classes)")


def _tile(images: torch.Tensor, nrow: int) -> np.ndarray:
    """The images as one grid: (H, W) grey for one channel, (H, W, 3) RGB for three; other channel
    counts are shown as the grey of their channel mean."""
    # Imported here: torchvision's import costs over a second of CPU, and study trials draw no figures.
    from torchvision.utils import make_grid

    images = images.detach().float().cpu().clamp(0, 1)
    if images.shape[1] not in (1, 3):
        images = images.mean(dim=1, keepdim=True)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0).permute(1, 2, 0).numpy()
    return grid[..., 0] if images.shape[1] == 1 else grid  # make_grid repeats one channel into three


def _show(ax, tiled: np.ndarray) -> None:
    if tiled.ndim == 2:
        ax.imshow(tiled, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(tiled, interpolation="nearest")  # RGB in [0, 1]
    ax.set_xticks([])
    ax.set_yticks([])


def _size(tiled: np.ndarray, min_width: float, min_height: float, margin: float = 1.0) -> tuple[float, float]:
    """A figure size (inches) that shows every image pixel at least once and is at least the given size."""
    return max(min_width, tiled.shape[1] / DPI + margin), max(min_height, tiled.shape[0] / DPI + margin)


def project_2d(latents: np.ndarray) -> tuple[np.ndarray, str]:
    """Latents as 2-D points: as they are for 2-D, PCA above, a jittered strip for 1-D."""
    latents = np.asarray(latents, dtype=np.float64)
    if latents.shape[1] == 2:
        return latents, "z"
    if latents.shape[1] == 1:
        jitter = np.random.default_rng(0).uniform(-0.4, 0.4, size=len(latents))
        return np.stack([latents[:, 0], jitter], axis=1), "z (1-D, jittered)"
    centred = latents - latents.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    explained = singular[:2] ** 2 / max((singular ** 2).sum(), 1e-12)
    return centred @ components[:2].T, f"PCA ({explained[0]:.0%}, {explained[1]:.0%} of variance)"


def _class_colours(num_classes: int):
    if num_classes <= 20:
        cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
        return [cmap(k) for k in range(num_classes)]
    return list(plt.get_cmap("turbo")(np.linspace(0.0, 1.0, num_classes)))


def latent_scatter(latents: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                   title: str = "Latent means by label") -> plt.Figure:
    """Points coloured by class: a legend of (shortened) class names for up to MAX_LEGEND_ENTRIES
    classes, a colour bar of class ids above that."""
    points, basis = project_2d(latents)
    many = len(class_names) > MAX_LEGEND_ENTRIES
    fig, ax = plt.subplots(figsize=(8.5 if many or len(class_names) <= 15 else 10, 6))
    colours = _class_colours(len(class_names))
    for k, name in enumerate(class_names):
        chosen = labels == k
        ax.scatter(points[chosen, 0], points[chosen, 1], s=4, alpha=0.6, color=colours[k], label=short_name(name))
    ax.set_xlabel(f"{basis} 1" if "PCA" not in basis else f"PC 1 — {basis}")
    ax.set_ylabel(f"{basis} 2" if "PCA" not in basis else "PC 2")
    ax.set_title(title)
    if many:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import BoundaryNorm, ListedColormap

        norm = BoundaryNorm(np.arange(len(class_names) + 1) - 0.5, len(class_names))
        fig.colorbar(ScalarMappable(norm=norm, cmap=ListedColormap(colours)), ax=ax, label="class id",
                     ticks=range(0, len(class_names), max(1, len(class_names) // 10)))
    else:
        ax.legend(markerscale=4, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  ncol=1 if len(class_names) <= 15 else 2)
    fig.tight_layout()
    return fig


def reconstruction_grid(inputs: torch.Tensor, reconstructions: torch.Tensor,
                        title: str = "Inputs (top) vs reconstructions (bottom)") -> plt.Figure:
    n = len(inputs)
    tiled = _tile(torch.cat([inputs, reconstructions]), nrow=n)
    fig, ax = plt.subplots(figsize=_size(tiled, max(4, n * 0.8), 2.0))
    _show(ax, tiled)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def image_rows(images: torch.Tensor, row_labels: Sequence[str], per_row: int, title: str) -> plt.Figure:
    """A grid with one labelled row per group (e.g. a row of samples per class)."""
    rows = len(row_labels)
    tiled = _tile(images, nrow=per_row)
    fig, ax = plt.subplots(figsize=_size(tiled, max(4, per_row * 0.7), max(2, rows * 0.7)))
    _show(ax, tiled)
    height = images.shape[-2] + 2
    ax.set_yticks([2 + height * (r + 0.5) for r in range(rows)])
    ax.set_yticklabels([short_name(label) for label in row_labels], fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def latent_grid(images: torch.Tensor, grid_size: int, extent: float, title: str) -> plt.Figure:
    """Images decoded on a regular grid over [-extent, extent]²: a traversal or a 2-D manifold."""
    tiled = _tile(images, nrow=grid_size)
    fig, ax = plt.subplots(figsize=_size(tiled, 7, 7))
    _show(ax, tiled)
    ticks = np.linspace(0, tiled.shape[1], grid_size, endpoint=False) + tiled.shape[1] / grid_size / 2
    values = np.linspace(-extent, extent, grid_size)
    step = max(1, grid_size // 6)
    ax.set_xticks(ticks[::step])
    ax.set_xticklabels([f"{v:.1f}" for v in values[::step]])
    ax.set_yticks(ticks[::step])
    ax.set_yticklabels([f"{v:.1f}" for v in values[::-1][::step]])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def latent_grid_points(grid_size: int, extent: float) -> torch.Tensor:
    """Grid points in row-major display order: top row is the largest z[1]."""
    values = torch.linspace(-extent, extent, grid_size)
    z1, z0 = torch.meshgrid(values.flip(0), values, indexing="ij")
    return torch.stack([z0.reshape(-1), z1.reshape(-1)], dim=1)


def loss_curves(history: Sequence[Mapping[str, float]], keys: Sequence[str] = ("train/loss", "val/loss"),
                title: str = "Loss by epoch (nats per example)") -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [row["epoch"] for row in history]
    for key in keys:
        values = [row.get(key, np.nan) for row in history]
        ax.plot(epochs, values, marker="o", label=key)
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per example")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def labelled_images(images: torch.Tensor, labels: Sequence[str], title: str) -> plt.Figure:
    """One row of images, each captioned: e.g. the decode of every class at one latent point."""
    tiled = _tile(images, nrow=len(images))
    fig, ax = plt.subplots(figsize=_size(tiled, max(4, len(images) * 0.9), 1.9))
    _show(ax, tiled)
    width = images.shape[-1] + 2
    ax.set_xticks([2 + width * (c + 0.5) for c in range(len(images))])
    ax.set_xticklabels([short_name(label) for label in labels], fontsize=7, rotation=30, ha="right")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def image_table(columns: Sequence[torch.Tensor], column_titles: Sequence[str], title: str) -> plt.Figure:
    """A row per example and a captioned column per stage, e.g. input | binarized | reconstruction."""
    rows = len(columns[0])
    interleaved = torch.stack([c.detach().float().cpu() for c in columns], dim=1).flatten(0, 1)
    tiled = _tile(interleaved, nrow=len(columns))
    fig, ax = plt.subplots(figsize=_size(tiled, len(columns) * 1.3 + 0.5, rows * 1.1 + 0.8))
    _show(ax, tiled)
    width = columns[0].shape[-1] + 2
    ax.xaxis.tick_top()
    ax.set_xticks([2 + width * (c + 0.5) for c in range(len(columns))])
    ax.set_xticklabels(column_titles, fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return fig
