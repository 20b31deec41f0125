"""Loss math checked against hand-written references on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

import cvae
from cvae import ModelConfig, ObjectiveConfig, gaussian_kl, kl_weight_at, negative_elbo
from cvae.likelihood import (
    CONTINUOUS_DENSITY,
    CROSS_ENTROPY,
    EXACT_BINARY,
    EXACT_DISCRETE,
    PIXEL_LEVELS,
    bits_per_dim,
    discretized_logistic_log_prob,
    is_exact,
    likelihood_kind,
)
from cvae.objective import free_bits_kl, monte_carlo_kl


def _model(**kw) -> cvae.CVAE:
    torch.manual_seed(0)
    return cvae.build(ModelConfig(arch="mlp", hidden=(4,), latent_dim=2, **kw), image_shape=(1, 2, 3))


LOGITS = torch.tensor([[[[-2.0, 0.0, 1.5], [3.0, -0.5, 0.25]]],
                       [[[0.7, -1.2, 4.0], [-3.5, 2.2, 0.0]]]])
TARGETS = torch.tensor([[[[0.0, 1.0, 0.3], [1.0, 0.0, 0.5]]],
                        [[[1.0, 0.2, 1.0], [0.0, 0.9, 1.0]]]])  # not only binary


def test_bernoulli_nll_matches_hand_written_bce_sum():
    model = _model()
    p = torch.sigmoid(LOGITS)
    expected = -(TARGETS * torch.log(p) + (1 - TARGETS) * torch.log(1 - p)).sum(dim=(1, 2, 3))
    got = model.reconstruction_nll(LOGITS, TARGETS)
    assert got.shape == (2,)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("variance", ["fixed", "learned"])
def test_gaussian_nll_matches_hand_written_density(variance):
    model = _model(likelihood="gaussian", gaussian_variance=variance, gaussian_std=0.7)
    sigma = 0.7
    if variance == "learned":
        with torch.no_grad():
            model.log_std.fill_(math.log(0.4))
        sigma = 0.4
    mean = 1 / (1 + torch.exp(-LOGITS))
    per_pixel = 0.5 * ((TARGETS - mean) / sigma) ** 2 + math.log(sigma) + 0.5 * math.log(2 * math.pi)
    got = model.reconstruction_nll(LOGITS, TARGETS)
    torch.testing.assert_close(got, per_pixel.sum(dim=(1, 2, 3)))
    if variance == "learned":
        got.sum().backward()
        assert model.log_std.grad is not None and model.log_std.grad.abs() > 0


def test_gaussian_log_std_is_clamped_when_used():
    model = _model(likelihood="gaussian", gaussian_variance="learned")
    with torch.no_grad():
        model.log_std.fill_(50.0)
    got = model.reconstruction_nll(LOGITS, TARGETS)
    sigma = math.exp(2.0)
    mean = torch.sigmoid(LOGITS)
    expected = (0.5 * ((TARGETS - mean) / sigma) ** 2 + 2.0 + 0.5 * math.log(2 * math.pi)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(got, expected)


def test_recon_is_summed_over_pixels_not_averaged():
    model = _model()
    x = torch.zeros(3, 1, 2, 3)
    logits = torch.zeros(3, 1, 2, 3)
    # Each of the 6 pixels costs log 2; a per-pixel mean would give log 2 instead of 6 log 2.
    torch.testing.assert_close(model.reconstruction_nll(logits, x), torch.full((3,), 6 * math.log(2)))
    terms = negative_elbo(torch.tensor([6.0, 12.0]), torch.zeros(2, 2), torch.zeros(2, 2), None, 1.0)
    assert terms.recon.item() == pytest.approx(9.0)


def test_closed_form_kl_by_hand_and_against_monte_carlo():
    mu = torch.tensor([[0.5, -1.0, 0.0]])
    logvar = torch.tensor([[0.3, -0.7, 1.2]])
    by_hand = 0.5 * (mu ** 2 + torch.exp(logvar) - 1 - logvar)
    torch.testing.assert_close(gaussian_kl(mu, logvar), by_hand)

    g = torch.Generator().manual_seed(0)
    n = 200_000
    mu_n, logvar_n = mu.expand(n, 3), logvar.expand(n, 3)
    z = mu_n + torch.randn((n, 3), generator=g) * torch.exp(0.5 * logvar_n)
    estimate = monte_carlo_kl(z, mu_n, logvar_n).mean()
    # Standard error of the estimate is ~0.003 here; 0.02 is > 6 standard errors.
    assert estimate.item() == pytest.approx(by_hand.sum().item(), abs=0.02)


def _terms(beta, free_bits=0.0, estimator="analytic"):
    recon = torch.tensor([10.0, 20.0])
    mu = torch.tensor([[1.0, 0.0], [0.5, 0.1]])
    logvar = torch.tensor([[0.0, -0.2], [0.1, 0.0]])
    z = torch.tensor([[0.9, 0.2], [0.3, -0.1]])
    return negative_elbo(recon, mu, logvar, z, beta, free_bits=free_bits, kl_estimator=estimator)


def test_beta_scales_only_the_kl_term():
    t0, t1, t3 = _terms(0.0), _terms(1.0), _terms(3.0)
    assert t0.loss.item() == pytest.approx(15.0)
    for t in (t0, t1, t3):
        assert t.recon.item() == pytest.approx(15.0)
        assert t.kl.item() == pytest.approx(t1.kl.item())
    assert (t3.loss - t3.recon).item() == pytest.approx(3 * t1.kl.item())
    assert (t1.loss - t1.recon).item() == pytest.approx(t1.kl.item())


def test_loss_terms_shapes_and_reference_values():
    t = _terms(1.0)
    mu = torch.tensor([[1.0, 0.0], [0.5, 0.1]])
    logvar = torch.tensor([[0.0, -0.2], [0.1, 0.0]])
    per_dim = (0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)).mean(0)
    torch.testing.assert_close(t.kl_per_dim, per_dim)
    assert t.kl.item() == pytest.approx(per_dim.sum().item())
    assert t.loss.shape == t.recon.shape == t.kl.shape == ()


def test_monte_carlo_estimator_uses_the_sample_and_reports_closed_form():
    t = _terms(2.0, estimator="monte_carlo")
    z = torch.tensor([[0.9, 0.2], [0.3, -0.1]])
    mu = torch.tensor([[1.0, 0.0], [0.5, 0.1]])
    logvar = torch.tensor([[0.0, -0.2], [0.1, 0.0]])
    log_q = (-0.5 * ((z - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))).sum(1)
    log_p = (-0.5 * (z ** 2 + math.log(2 * math.pi))).sum(1)
    assert t.loss.item() == pytest.approx(15.0 + 2.0 * (log_q - log_p).mean().item(), rel=1e-6)
    assert t.kl.item() == pytest.approx(_terms(2.0).kl.item())
    with pytest.raises(ValueError, match="needs the sampled z"):
        negative_elbo(torch.zeros(2), mu, logvar, None, 1.0, kl_estimator="monte_carlo")
    with pytest.raises(ValueError, match="analytic, monte_carlo"):
        negative_elbo(torch.zeros(2), mu, logvar, z, 1.0, kl_estimator="sampled")


def test_free_bits_clamp_per_dimension_and_stop_gradient_below_threshold():
    # Dim 0 carries lots of KL, dim 1 almost none.
    mu = torch.tensor([[2.0, 0.01], [1.5, -0.01]], requires_grad=True)
    logvar = torch.tensor([[0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    recon = torch.tensor([1.0, 1.0])
    t = negative_elbo(recon, mu, logvar, None, kl_weight=1.0, free_bits=0.5)
    per_dim = t.kl_per_dim.detach()
    assert per_dim[0] > 0.5 > per_dim[1]
    assert t.loss.item() == pytest.approx(1.0 + per_dim[0].item() + 0.5)
    assert t.kl.item() == pytest.approx(per_dim.sum().item())  # reported unclamped
    t.loss.backward()
    assert torch.all(mu.grad[:, 1] == 0) and torch.all(logvar.grad[:, 1] == 0)
    assert torch.all(mu.grad[:, 0] != 0)


def test_warmup_schedule():
    obj = ObjectiveConfig(kl_weight=2.0, warmup_epochs=4.0)
    assert kl_weight_at(obj, 0.0) == 0.0
    assert kl_weight_at(obj, 2.0) == pytest.approx(1.0)
    assert kl_weight_at(obj, 0.5) == pytest.approx(0.25)  # fractional epochs: smooth per step
    assert kl_weight_at(obj, 4.0) == pytest.approx(2.0)
    assert kl_weight_at(obj, 10.0) == pytest.approx(2.0)
    assert kl_weight_at(ObjectiveConfig(kl_weight=0.7, warmup_epochs=0.0), 0.0) == pytest.approx(0.7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
    mu = torch.tensor([[0.5, -1.0]], dtype=dtype)
    logvar = torch.tensor([[0.3, -0.7]], dtype=dtype)
    t = negative_elbo(torch.tensor([100.0], dtype=dtype), mu, logvar, mu, 1.0)
    assert t.loss.dtype == t.kl.dtype == t.kl_per_dim.dtype == torch.float32
    assert gaussian_kl(mu, logvar).dtype == torch.float32


def test_objective_config_errors_name_fields():
    with pytest.raises(cvae.ConfigError, match="objective.kl_estimator.*analytic, monte_carlo"):
        ObjectiveConfig(kl_estimator="iwae")
    with pytest.raises(cvae.ConfigError, match="objective.free_bits"):
        ObjectiveConfig(free_bits=-1.0)


# --- the discretized logistic over 8-bit levels, and what each likelihood's numbers are --------


ALL_LEVELS = torch.arange(PIXEL_LEVELS, dtype=torch.float32) / (PIXEL_LEVELS - 1)


@pytest.mark.parametrize("mean", [0.0, 1e-3, 0.2, 0.5, 127.5 / 255, 0.999, 1.0])
@pytest.mark.parametrize("log_scale", [-9.0, -6.0, -3.0, -1.0, 0.0, 2.0])
def test_discretized_logistic_probabilities_of_all_256_levels_sum_to_one(mean, log_scale):
    log_p = discretized_logistic_log_prob(ALL_LEVELS, torch.full_like(ALL_LEVELS, mean),
                                          torch.full_like(ALL_LEVELS, log_scale))
    assert torch.isfinite(log_p).all() and (log_p <= 1e-6).all()
    assert torch.logsumexp(log_p.double(), 0).exp().item() == pytest.approx(1.0, abs=1e-5)


def test_discretized_logistic_matches_its_cdf_and_extends_the_edge_bins_to_infinity():
    mean, scale = 0.3, 0.05
    cdf = lambda v: torch.sigmoid((torch.as_tensor(v, dtype=torch.float64) - mean) / scale)  # noqa: E731
    half = 0.5 / 255
    log_p = discretized_logistic_log_prob(ALL_LEVELS, torch.full_like(ALL_LEVELS, mean),
                                          torch.full_like(ALL_LEVELS, math.log(scale))).double()
    expected = torch.stack([cdf(half)] + [cdf(k / 255 + half) - cdf(k / 255 - half) for k in range(1, 255)]
                           + [1 - cdf(1 - half)])
    torch.testing.assert_close(log_p.exp(), expected, rtol=1e-4, atol=1e-9)
    # A pixel off the grid is scored as its nearest level.
    off_grid = discretized_logistic_log_prob(torch.tensor([77.4 / 255]), torch.tensor([mean]),
                                             torch.tensor([math.log(scale)]))
    torch.testing.assert_close(off_grid, log_p[77:78].float())


def test_discretized_logistic_model_nll_is_the_summed_negative_log_probability():
    model = _model(likelihood="discretized_logistic", gaussian_variance="learned", gaussian_std=0.2)
    x = torch.tensor([[[[0.0, 1.0, 128 / 255], [3 / 255, 250 / 255, 0.5]]]]).expand(2, 1, 2, 3)
    nll = model.reconstruction_nll(LOGITS, x)
    scale = 0.2 * math.sqrt(3) / math.pi  # a logistic with std sigma has scale sigma * sqrt(3) / pi
    per_pixel = -discretized_logistic_log_prob(x, torch.sigmoid(LOGITS), torch.full_like(x, math.log(scale)))
    torch.testing.assert_close(nll, per_pixel.sum(dim=(1, 2, 3)))
    assert (nll > 0).all()  # probabilities: never a negative NLL, unlike a density
    nll.sum().backward()
    assert model.log_std.grad is not None and model.log_std.grad.abs() > 0


def test_nats_to_bits_per_dimension():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert bits_per_dim(0.0, 784) == 0.0
    # A uniform distribution over 256 levels: 8 bits per dimension whatever the image size.
    assert bits_per_dim(3 * 32 * 32 * math.log(256), 3 * 32 * 32) == pytest.approx(8.0)
    assert bits_per_dim(86.0, 784) == pytest.approx(86.0 / (784 * math.log(2)))


@pytest.mark.parametrize("likelihood,binarize,kind", [
    ("discretized_logistic", "none", EXACT_DISCRETE),
    ("discretized_logistic", "static", EXACT_DISCRETE),
    ("bernoulli", "static", EXACT_BINARY),
    ("bernoulli", "dynamic", EXACT_BINARY),
    ("bernoulli", "none", CROSS_ENTROPY),
    ("gaussian", "none", CONTINUOUS_DENSITY),
    ("gaussian", "dynamic", CONTINUOUS_DENSITY),
])
def test_likelihood_kind_says_what_the_numbers_are(likelihood, binarize, kind):
    assert likelihood_kind(likelihood, binarize) == kind
    assert is_exact(kind) == (kind in (EXACT_DISCRETE, EXACT_BINARY))


def test_free_bits_loss_of_a_split_does_not_depend_on_how_it_is_batched():
    g = torch.Generator().manual_seed(0)
    # Dimension 1 carries KL in half of the examples only: per-batch means straddle the threshold.
    mu = torch.cat([torch.randn(50, 2, generator=g) * torch.tensor([2.0, 1.0]),
                    torch.randn(50, 2, generator=g) * torch.tensor([2.0, 0.01])])
    logvar = torch.zeros_like(mu)
    split_kl = gaussian_kl(mu, logvar).mean(0)
    whole = free_bits_kl(split_kl, 0.3)
    for batch in (10, 25, 100):
        per_dim = sum(gaussian_kl(mu[s: s + batch], logvar[s: s + batch]).sum(0) for s in range(0, 100, batch)) / 100
        assert free_bits_kl(per_dim, 0.3).item() == pytest.approx(whole.item(), rel=1e-6)
    # Averaging the per-batch clamped losses instead would make the number depend on the batch size.
    averaged = {batch: sum(negative_elbo(torch.zeros(batch), mu[s: s + batch], logvar[s: s + batch], None, 1.0,
                                         free_bits=0.3).loss.item() * batch for s in range(0, 100, batch)) / 100
                for batch in (10, 100)}
    assert averaged[10] != pytest.approx(averaged[100], rel=1e-3)
    assert averaged[100] == pytest.approx(whole.item(), rel=1e-6)
