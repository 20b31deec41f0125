"""Batches: uint8 device tensors in, float batches out, binarized as configured.

The split tensors stay uint8 and move to the device once; an epoch is a permutation on that
device and a batch is an index slice of it, so no DataLoader worker sits on the hot path.
"""
from __future__ import annotations

from typing import Iterator

import torch

from pipelines.data.splits import SplitData

STATIC_BINARIZATION_THRESHOLD = 0.5
# Salts that tell the two files' example 0 apart in the evaluation binarization noise.
_FILE_SALT = {"train": 0x2545F491, "test": 0x6A09E667}
_MASK32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """(h * constant) mod 2**32 for h < 2**32, in 16-bit halves so int64 never overflows."""
    low, high = h & 0xFFFF, h >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit over the output."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def evaluation_noise(example_ids: torch.Tensor, pixels: int, source: str) -> torch.Tensor:
    """Uniform [0, 1) noise, (N, pixels), a pure function of (source file, example index, pixel).

    Evaluation's dynamic binarization compares against it, so an example is binarized the same
    way whatever the split's size (``--limit-test``, ``--val-size``), batch, device or seed.
    """
    keys = _mix32((_mix32(example_ids.long() & _MASK32) + _FILE_SALT[source]) & _MASK32)
    pixel = torch.arange(pixels, device=example_ids.device, dtype=torch.int64)
    hashed = _mix32(keys[:, None] ^ _mix32(pixel + 1)[None, :])
    return (hashed >> 8).float() * (1.0 / (1 << 24))  # 24 bits: exact in float32


def as_unit_floats(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; float images pass through."""
    return images.float().div(255.0) if images.dtype == torch.uint8 else images.float()


class Batcher:
    """Turns uint8 device tensors into float batches, binarized as configured.

    Evaluation batches with dynamic binarization use one fixed Bernoulli draw per example (a hash
    of its index in its source), so validation and test losses are comparable across epochs,
    runs and ``--limit-test`` values.
    """

    def __init__(self, binarize: str, seed: int, device: torch.device):
        self.binarize = binarize
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._eval_noise: dict[int, tuple[SplitData, torch.Tensor]] = {}

    def _noise(self, split: SplitData, pixels: int) -> torch.Tensor:
        """The split's evaluation noise, computed once per split (hashing costs ~0.1 s per 1000 images)."""
        cached = self._eval_noise.get(id(split))
        if cached is None or cached[0] is not split:
            ids = split.example_ids().to(self.device)
            cached = self._eval_noise[id(split)] = (split, evaluation_noise(ids, pixels, split.source))
        return cached[1]

    def _to_float(self, images: torch.Tensor) -> torch.Tensor:
        x = as_unit_floats(images)
        if self.binarize == "static":
            return (x >= STATIC_BINARIZATION_THRESHOLD).float()
        return x

    def train_batches(self, split: SplitData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(split), device=self.device, generator=self.generator)
        for start in range(0, len(split), batch_size):
            idx = order[start: start + batch_size]
            x = self._to_float(split.images[idx])
            if self.binarize == "dynamic":
                x = torch.bernoulli(x, generator=self.generator)
            yield x, split.labels[idx]

    def eval_batches(self, split: SplitData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        noise = self._noise(split, split.images[0].numel()) if self.binarize == "dynamic" else None
        for start in range(0, len(split), batch_size):
            x = self._to_float(split.images[start: start + batch_size])
            if noise is not None:
                x = (noise[start: start + batch_size].view_as(x) < x).float()
            yield x, split.labels[start: start + batch_size]
