"""What every source gives before splitting: uint8 images (N, C, H, W), labels, class names and the
SHA-256 of the bytes read; and the checks that labels and classes make sense."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.data.locations import DataUnavailableError


@dataclass
class Decoded:
    train_images: np.ndarray  # uint8 (N, C, H, W)
    train_labels: np.ndarray  # int64 (N,)
    test_images: np.ndarray | None  # None: no test set of its own (a seeded share of train is drawn)
    test_labels: np.ndarray | None
    class_names: tuple[str, ...]
    source_files: dict[str, str]  # a name that does not depend on where it lies -> SHA-256 of the bytes read
    source_dir: str  # where they were read from

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.train_images.shape[1:])


def check_labels(labels: np.ndarray, class_names: tuple[str, ...], where: str, every_class: bool = True) -> None:
    """Labels are class indices 0..K-1; with ``every_class``, each class has at least one image."""
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DataUnavailableError(f"{where} holds the label {bad}, outside 0..{len(class_names) - 1} "
                                   f"({len(class_names)} classes)")
    if every_class:
        counts = np.bincount(labels, minlength=len(class_names))
        empty = [f"{k} ({class_names[k]!r})" for k in np.flatnonzero(counts == 0)]
        if empty:
            raise DataUnavailableError(f"{where} has no image of class {', '.join(empty[:5])}"
                                       f"{' and more' if len(empty) > 5 else ''}: every class needs images")
