"""The evaluation math of cvae.evaluation: IWAE bound, active units, Fréchet distance."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cvae
from cvae import ModelConfig, gaussian_kl
from cvae.evaluation import active_units, frechet_distance, importance_log_weights, iwae_nll


def _tiny_model(conditioning="concat") -> cvae.CVAE:
    torch.manual_seed(0)
    return cvae.build(ModelConfig(arch="mlp", hidden=(16, 8), latent_dim=3, conditioning=conditioning))


def _batch(n=6):
    g = torch.Generator().manual_seed(1)
    return (torch.rand((n, 1, 28, 28), generator=g) > 0.5).float(), torch.arange(n) % 10


@pytest.mark.parametrize("conditioning", ["concat", "none"])
def test_iwae_k1_is_the_negative_elbo_in_expectation(conditioning):
    model = _tiny_model(conditioning)
    x, y = _batch()
    repeats = 4000
    draws = iwae_nll(model, x.repeat(repeats, 1, 1, 1), y.repeat(repeats), k=1,
                     generator=torch.Generator().manual_seed(2)).reshape(repeats, -1)
    with torch.no_grad():
        mu, logvar = model.encode(x, y if model.conditional else None)
        z = mu + torch.randn((repeats, *mu.shape), generator=torch.Generator().manual_seed(3)) \
            * torch.exp(0.5 * logvar)
        decoded = model.decode(z.reshape(-1, 3), y.repeat(repeats) if model.conditional else None)
        recon = model.reconstruction_nll(decoded, x.repeat(repeats, 1, 1, 1)).reshape(repeats, -1).double()
    # Independent estimates of the same expectation: E[recon] + closed-form KL.
    neg_elbo = recon.mean(0) + gaussian_kl(mu, logvar).sum(1).double()
    standard_error = (draws.var(0) / repeats + recon.var(0) / repeats).sqrt()
    assert torch.all((draws.mean(0) - neg_elbo).abs() < 5 * standard_error + 1e-6), \
        (draws.mean(0), neg_elbo, standard_error)


def test_iwae_k1_matches_the_single_sample_elbo_exactly():
    model = _tiny_model()
    x, y = _batch()
    nll = iwae_nll(model, x, y, k=1, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mu, logvar = model.encode(x, y)
        z = mu + torch.randn((1, *mu.shape), generator=torch.Generator().manual_seed(5))[0] * torch.exp(0.5 * logvar)
        recon = model.reconstruction_nll(model.decode(z, y), x).double()
        log_q = (-0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))).sum(1).double()
        log_p = (-0.5 * (z ** 2 + math.log(2 * math.pi))).sum(1).double()
    torch.testing.assert_close(nll, recon + log_q - log_p, rtol=1e-5, atol=1e-3)


def test_iwae_tightens_as_k_grows():
    model = _tiny_model()
    x, y = _batch(4)
    generator = torch.Generator().manual_seed(7)
    repeats = 40  # independent estimates per image, as a batch of copies
    means = {}
    for k in (1, 10, 100):
        estimates = iwae_nll(model, x.repeat(repeats, 1, 1, 1), y.repeat(repeats), k, chunk=100,
                             generator=generator)
        means[k] = (estimates.mean().item(), estimates.std().item() / math.sqrt(len(estimates)))
    for small, large in ((1, 10), (10, 100)):
        noise = 3 * math.hypot(means[small][1], means[large][1])
        assert means[large][0] <= means[small][0] + noise, means
    assert means[100][0] < means[1][0], means  # a random-init posterior leaves a clear gap


def test_iwae_chunking_only_splits_the_work():
    model = _tiny_model()
    x, y = _batch(3)
    log_w = importance_log_weights(model, x, y, k=10, chunk=3, generator=torch.Generator().manual_seed(0))
    assert log_w.shape == (10, 3) and log_w.dtype == torch.float64 and torch.isfinite(log_w).all()
    chunked = iwae_nll(model, x, y, k=10, chunk=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(chunked, -(torch.logsumexp(log_w, 0) - math.log(10)))


def test_iwae_restores_training_mode_and_rejects_bad_k():
    model = _tiny_model()
    model.train()
    x, y = _batch(2)
    iwae_nll(model, x, y, k=2)
    assert model.training
    with pytest.raises(ValueError, match="k and chunk"):
        iwae_nll(model, x, y, k=0)


def test_active_units_on_a_constructed_case():
    g = torch.Generator().manual_seed(0)
    n = 2000
    means = torch.stack([
        torch.randn(n, generator=g),  # variance 1: active
        0.5 * torch.randn(n, generator=g),  # variance 0.25: active
        0.05 * torch.randn(n, generator=g),  # variance 0.0025: below 0.01
        torch.full((n,), 3.0),  # constant: collapsed
    ], dim=1)
    assert active_units(means) == 2
    assert active_units(means, threshold=0.001) == 3
    assert active_units(means, threshold=2.0) == 0
    with pytest.raises(ValueError):
        active_units(means[:1])


def test_frechet_distance_against_closed_forms_and_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.full((6,), 0.5)
    assert frechet_distance(a, a + shift) == pytest.approx(6 * 0.25, rel=1e-6)
    # Scaling by 2: means differ by m, covariances S and 4S: |m|^2 + Tr(S) + 4Tr(S) - 4Tr(S).
    centred = a - a.mean(0)
    expected = float(a.mean(0).pow(2).sum() + torch.trace(centred.T @ centred / (len(a) - 1)))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)

    scipy_linalg = pytest.importorskip("scipy.linalg")
    b = torch.randn(400, 6, generator=g) * 1.5 + 0.3
    a64, b64 = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    reference = (((a64.mean(0) - b64.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb)
                 - 2 * np.trace(scipy_linalg.sqrtm(ca @ cb).real))
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="feature sizes"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))


# --- IWAE against brute-force quadrature of p(x) = integral p(x|z) p(z) dz -----------------------

QUADRATURE_Z = torch.linspace(-10.0, 10.0, 40001, dtype=torch.float64)


def _one_dimensional_model(likelihood: str, image_shape=(1, 1, 1)) -> cvae.CVAE:
    torch.manual_seed(4)
    return cvae.build(ModelConfig(arch="mlp", hidden=(8,), latent_dim=1, conditioning="none", likelihood=likelihood,
                                  gaussian_variance="fixed", gaussian_std=0.15), image_shape=image_shape)


def _quadrature_log_px(model: cvae.CVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) for each image in x (N, C, H, W) by the rectangle rule over a 1-D latent, float64."""
    z = QUADRATURE_Z[:, None]
    with model.inference():
        decoded = model.decode(z.float(), None)  # (Z, C, H, W)
        log_px_given_z = torch.stack([-model.reconstruction_nll(decoded, image.expand_as(decoded)).double()
                                      for image in x])  # (N, Z)
    log_prior = -0.5 * (QUADRATURE_Z ** 2 + math.log(2 * math.pi))
    step = float(QUADRATURE_Z[1] - QUADRATURE_Z[0])
    return torch.logsumexp(log_px_given_z + log_prior, dim=1) + math.log(step)


def test_quadrature_marginal_of_the_discretized_logistic_sums_to_one_over_all_256_levels():
    model = _one_dimensional_model("discretized_logistic")
    levels = (torch.arange(256, dtype=torch.float32) / 255).view(256, 1, 1, 1)
    log_px = _quadrature_log_px(model, levels)
    assert torch.logsumexp(log_px, 0).exp().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("likelihood, pixels", [
    ("discretized_logistic", [0.0, 37 / 255, 128 / 255, 1.0]),
    ("bernoulli", [0.0, 1.0]),  # binary pixels: the Bernoulli is exact there
])
def test_iwae_converges_to_the_quadrature_nll(likelihood, pixels):
    model = _one_dimensional_model(likelihood)
    x = torch.tensor(pixels).view(-1, 1, 1, 1)
    true_nll = -_quadrature_log_px(model, x)
    repeats = 20
    estimates = iwae_nll(model, x.repeat(repeats, 1, 1, 1), None, k=2000, chunk=500,
                         generator=torch.Generator().manual_seed(11)).reshape(repeats, -1)
    mean, standard_error = estimates.mean(0), estimates.std(0) / math.sqrt(repeats)
    # A bound: at or above the truth in expectation, and within a hundredth of a nat at k = 2000.
    assert torch.all(mean >= true_nll - 4 * standard_error - 1e-6), (mean, true_nll)
    assert torch.all(mean - true_nll < 0.01), (mean, true_nll)
    draws = 4000
    single = iwae_nll(model, x.repeat(draws, 1, 1, 1), None, k=1,
                      generator=torch.Generator().manual_seed(12)).reshape(draws, -1)
    noise = 4 * (single.var(0) / draws + standard_error ** 2).sqrt()
    assert torch.all(single.mean(0) >= mean - noise)  # k = 1 (the ELBO) is the loosest
