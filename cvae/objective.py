"""The negative ELBO and its pieces, in nats per example.

Everything is computed in float32 whatever the input dtype, so mixed-precision training does
not lose the small differences the KL and the log-likelihood depend on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cvae.config import KL_ESTIMATORS, ObjectiveConfig

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per dimension, closed form: (N, D)."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def standard_normal_log_density(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (z.pow(2) + _LOG_2PI).sum(dim=-1)


def diagonal_normal_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + _LOG_2PI).sum(dim=-1)


def monte_carlo_kl(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Single-sample estimate log q(z|x) - log p(z), summed over dimensions: (N,)."""
    z, mu, logvar = z.float(), mu.float(), logvar.float()
    return diagonal_normal_log_density(z, mu, logvar) - standard_normal_log_density(z)


@dataclass
class LossTerms:
    """Scalars are means over the batch in nats per example.

    ``kl`` is the closed-form KL summed over dimensions, never clamped by free bits, so it is the
    quantity to report; ``loss`` is what to minimise and may use a clamped or sampled KL.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor  # (D,)


def negative_elbo(recon_nll: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                  z: torch.Tensor | None, kl_weight: float, free_bits: float = 0.0,
                  kl_estimator: str = "analytic") -> LossTerms:
    """loss = mean(recon_nll) + kl_weight * KL_used.

    ``recon_nll`` is (N,), already summed over pixels (averaging over pixels would silently
    rescale the balance between reconstruction and KL).

    ``analytic``: KL_used = sum over dims of max(free_bits, batch-mean KL of that dim) when
    free_bits > 0 (free bits per dimension: below the threshold a dimension gets no gradient),
    otherwise the plain closed-form KL.

    ``monte_carlo``: KL_used is the batch mean of the single-sample estimate at ``z``; free bits
    do not apply there because a single-sample estimate per dimension is too noisy to clamp.
    ``kl`` and ``kl_per_dim`` are still the closed form, for reporting.
    """
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={kl_estimator!r} is not valid; "
                         f"choose one of: {', '.join(KL_ESTIMATORS)}")
    sampled_kl = None
    if kl_estimator == "monte_carlo":
        if z is None:
            raise ValueError("kl_estimator='monte_carlo' needs the sampled z")
        sampled_kl = monte_carlo_kl(z, mu, logvar).mean()
    return loss_from_means(recon_nll.float().mean(), gaussian_kl(mu, logvar).mean(dim=0), kl_weight, free_bits,
                           sampled_kl)


def loss_from_means(recon: torch.Tensor, kl_per_dim: torch.Tensor, kl_weight: float, free_bits: float = 0.0,
                    sampled_kl: torch.Tensor | None = None) -> LossTerms:
    """``LossTerms`` from means over a set of examples, a batch or a whole split: ``recon`` the mean
    reconstruction NLL, ``kl_per_dim`` (D,) the mean closed-form KL of each dimension, ``sampled_kl``
    the mean single-sample KL estimate (``monte_carlo`` only; free bits do not apply to it).

    Free bits clamp ``kl_per_dim`` as given, and the clamp is not linear: a split's loss must come
    from the split's means (accumulated over its batches), never from averaging its batches' losses.
    """
    kl = kl_per_dim.sum()
    if sampled_kl is not None:
        kl_used = sampled_kl
    elif free_bits > 0:
        kl_used = free_bits_kl(kl_per_dim, free_bits)
    else:
        kl_used = kl
    return LossTerms(loss=recon + kl_weight * kl_used, recon=recon, kl=kl, kl_per_dim=kl_per_dim)


def free_bits_kl(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """sum over dims of max(free_bits, KL_d), where KL_d is the mean KL of dimension d over the
    examples the number is for.

    The clamp is not linear: the mean of per-batch clamped values depends on how a split is cut
    into batches (see ``loss_from_means``).
    """
    return torch.clamp(kl_per_dim, min=free_bits).sum()


def kl_weight_at(objective: ObjectiveConfig, epochs_done: float) -> float:
    """Linear KL warm-up; ``epochs_done`` is fractional so the weight rises every step."""
    beta = float(objective.kl_weight)
    if objective.warmup_epochs <= 0:
        return beta
    return beta * min(1.0, max(0.0, float(epochs_done)) / float(objective.warmup_epochs))
