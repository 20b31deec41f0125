"""Image conversions shared by the sources that decode: to 1 or 3 channels, and resized (aspect
ratio kept) then centre-cropped to ``data.image_size`` with Pillow's ``ImageOps.fit`` (bicubic,
antialiased). Arrays come in as (N, H, W, C) and leave as uint8 (N, C, H, W)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from pipelines.config import DataConfig

GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
# ITU-R 601-2 luma in Pillow's own fixed point: the same grey as Image.convert("L") gives.
_LUMA = np.array([19595, 38470, 7471], dtype=np.uint32)


def target_size(config: DataConfig) -> tuple[int, int] | None:
    """(H, W) every image is fitted to, or None to keep the stored size."""
    if not config.image_size:
        return None
    height, width = (config.image_size * 2)[:2]
    return height, width


def settings(config: DataConfig) -> dict:
    """What changes the decoded arrays, for the cache key."""
    return {"image_size": list(target_size(config) or ()), "image_channels": config.image_channels}


def fitted(image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    if size is None or image.size == (size[1], size[0]):
        return image
    return ImageOps.fit(image, (size[1], size[0]), method=Image.Resampling.BICUBIC)


def pil_to_chw(image: Image.Image, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """A decoded Pillow image as uint8 (C, H, W) with ``channels`` 1 or 3."""
    image = fitted(image.convert("L" if channels == 1 else "RGB"), size)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def arrays_to_nchw(images: np.ndarray, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """uint8 (N, H, W, C) with C 1 or 3 -> uint8 (N, channels or C, H', W')."""
    have = images.shape[-1]
    channels = channels or have
    if channels == 1 and have == 3:
        images = ((images.astype(np.uint32) @ _LUMA + 0x8000) >> 16).astype(np.uint8)[..., None]
    elif channels == 3 and have == 1:
        images = np.repeat(images, 3, axis=-1)
    if size is not None and images.shape[1:3] != size:
        resized = np.empty((len(images), *size, channels), dtype=np.uint8)
        for k, image in enumerate(images):
            pil = Image.fromarray(image[..., 0] if channels == 1 else image)
            resized[k] = np.asarray(fitted(pil, size), dtype=np.uint8).reshape(*size, channels)
        images = resized
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
