"""Evaluation math: importance-weighted likelihood bound, active units, Fréchet distance.

Pure PyTorch. Log-likelihoods are in nats per example (summed over pixels and latent dimensions).
"""
from __future__ import annotations

import math

import torch

from cvae.model import CVAE
from cvae.objective import diagonal_normal_log_density, standard_normal_log_density


def importance_log_weights(model: CVAE, x: torch.Tensor, labels: torch.Tensor | None, k: int,
                           chunk: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x), z_i ~ q(z|x): float64 (k, N).

    ``chunk`` importance samples are decoded per pass, so memory grows with chunk * N images, not
    with k * N. Labels repeat per sample for a conditional model and are ignored otherwise.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    labels = labels if model.conditional else None
    n = x.shape[0]
    with model.inference():
        mu, logvar = model.encode(x, labels)
        mu, logvar = mu.float(), logvar.float()
        std = torch.exp(0.5 * logvar)
        pieces = []
        for start in range(0, k, chunk):
            samples = min(chunk, k - start)
            eps = torch.randn((samples, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + eps * std  # (samples, N, D)
            flat_z = z.reshape(samples * n, -1)
            flat_labels = None if labels is None else labels.repeat(samples)
            decoded = model.decode(flat_z.to(x.dtype), flat_labels)
            log_px = -model.reconstruction_nll(decoded, x.repeat(samples, 1, 1, 1)).reshape(samples, n)
            # Prior and posterior densities in float64: their difference is small next to each term.
            z64 = z.double()
            log_prior = standard_normal_log_density(z64)
            log_posterior = diagonal_normal_log_density(z64, mu.double(), logvar.double())
            pieces.append(log_px.double() + log_prior - log_posterior)
    return torch.cat(pieces, dim=0)


def iwae_nll(model: CVAE, x: torch.Tensor, labels: torch.Tensor | None, k: int, chunk: int = 100,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The IWAE bound of -log p(x) per example, nats, float64 (N,): -(logsumexp_i log w_i - log k).

    k=1 is a single-sample estimate of the negative ELBO; the bound tightens (does not increase in
    expectation) as k grows and tends to -log p(x).
    """
    log_w = importance_log_weights(model, x, labels, k, chunk, generator)
    return -(torch.logsumexp(log_w, dim=0) - math.log(k))


def active_units(posterior_means: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose posterior mean varies over the data: Var_x[E_q[z_d|x]] > threshold.

    ``posterior_means`` is (N, D), one row per example (Burda et al., 2016).
    """
    if posterior_means.dim() != 2 or posterior_means.shape[0] < 2:
        raise ValueError(f"posterior_means must be (N >= 2, D), got {tuple(posterior_means.shape)}")
    return int((unit_activity(posterior_means) > threshold).sum().item())


def unit_activity(posterior_means: torch.Tensor) -> torch.Tensor:
    """Per-dimension variance over examples of the posterior mean, float64 (D,)."""
    return posterior_means.double().var(dim=0, unbiased=True)


def _covariance(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    features = features.double()
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, F), got {tuple(features.shape)}")
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, vectors = torch.linalg.eigh(matrix)
    return (vectors * eigenvalues.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, F) and (N_b, F).

    ||m_a - m_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2}); the last trace is computed as the
    sum of square roots of the eigenvalues of S_a^{1/2} S_b S_a^{1/2}, which is symmetric PSD and
    has the same spectrum as S_a S_b, so only symmetric eigendecompositions are needed.
    """
    if features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"feature sizes differ: {tuple(features_a.shape)} vs {tuple(features_b.shape)}")
    mean_a, cov_a = _covariance(features_a)
    mean_b, cov_b = _covariance(features_b.to(features_a.device))
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(distance.clamp(min=0).item())
