"""What a likelihood's numbers mean, and the discretized logistic over 8-bit pixel levels.

Pure PyTorch. A reconstruction term is an exact negative log-probability of the data only when
the likelihood is a normalised distribution over the values the data can take:

- ``exact-discrete``: ``discretized_logistic``, a distribution over the 256 levels of an 8-bit
  pixel (PixelCNN++ / IAF style, edge bins extended to +-infinity), on any data;
- ``exact-binary``: ``bernoulli`` on binarized pixels (``binarize`` static or dynamic);
- ``cross-entropy``: ``bernoulli`` on non-binary pixels in [0, 1] (grey or colour levels): not a
  distribution over such images (a perfect reconstruction still costs the pixels' entropies);
- ``continuous-density``: ``gaussian`` on pixels in [0, 1]: a density, not a probability, so it
  cannot be compared with the discrete kinds (and it can be negative).

Only the exact kinds bound -log p(x) of the data as stored; only they get bits per dimension,
D = C * H * W (3 * 32 * 32 = 3072 for CIFAR-10, the unit its published results use).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PIXEL_LEVELS = 256  # 8-bit images: pixel value k / 255 for k = 0..255
# A logistic with standard deviation sigma has scale sigma * sqrt(3) / pi.
LOGISTIC_SCALE_PER_STD = math.sqrt(3.0) / math.pi

EXACT_DISCRETE = "exact-discrete"
EXACT_BINARY = "exact-binary"
CROSS_ENTROPY = "cross-entropy"
CONTINUOUS_DENSITY = "continuous-density"
EXACT_KINDS = (EXACT_DISCRETE, EXACT_BINARY)


def likelihood_kind(likelihood: str, binarize: str) -> str:
    """What a run's reconstruction numbers are, from ``model.likelihood`` and ``data.binarize``."""
    if likelihood == "discretized_logistic":
        return EXACT_DISCRETE
    if likelihood == "bernoulli":
        return CROSS_ENTROPY if binarize == "none" else EXACT_BINARY
    if likelihood == "gaussian":
        return CONTINUOUS_DENSITY
    raise ValueError(f"unknown likelihood {likelihood!r}")


def is_exact(kind: str) -> bool:
    """True when the numbers are negative log-probabilities of the data (bounds on -log p(x))."""
    return kind in EXACT_KINDS


def bits_per_dim(nats_per_example: float, dims: int) -> float:
    """nats per example -> bits per dimension: nats / (D ln 2), D = C * H * W."""
    return nats_per_example / (dims * math.log(2.0))


def pixel_levels(x: torch.Tensor, levels: int = PIXEL_LEVELS) -> torch.Tensor:
    """Pixels in [0, 1] -> the nearest level index 0..levels-1 (as float)."""
    return torch.round(x.clamp(0.0, 1.0) * (levels - 1))


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                  levels: int = PIXEL_LEVELS) -> torch.Tensor:
    """log P(pixel level of x) per pixel, for a logistic(mean, scale) discretized to ``levels`` bins.

    ``x`` and ``mean`` are in [0, 1]; x is snapped to the nearest level k / (levels - 1). Level k
    owns the interval [k - 1/2, k + 1/2] / (levels - 1), except that level 0 extends to -inf and
    the top level to +inf, so the probabilities of all levels sum to exactly 1.

    The interior bin mass sigmoid(a) - sigmoid(b), with a > b the standardised bin edges, is
    computed as sigmoid(a) * sigmoid(-b) * (1 - exp(-(a - b))): its log is a sum of terms that are
    each stable, with no cancellation, whatever the scale and wherever the bin lies.
    """
    x, mean, log_scale = x.float(), mean.float(), log_scale.float()
    k = pixel_levels(x, levels)
    step = 1.0 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    centred = k * step - mean
    upper = (centred + 0.5 * step) * inv_scale
    lower = (centred - 0.5 * step) * inv_scale
    bottom, top = k == 0, k == levels - 1
    zero = torch.zeros((), dtype=upper.dtype, device=upper.device)
    # log(1 - exp(-width)), width = a - b = step / scale: the same for every interior bin.
    log_width_term = torch.log(-torch.expm1(-(step * inv_scale)))
    return (torch.where(top, zero, F.logsigmoid(upper))
            + torch.where(bottom, zero, F.logsigmoid(-lower))
            + torch.where(bottom | top, zero, log_width_term.expand_as(upper)))
