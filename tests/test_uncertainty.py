"""`la.predictive_uncertainty`: probabilities, logit moments, entropies, BALD.

The GLM variant is checked against the predictive it reports (probit), a
Monte Carlo reference of the logit Gaussian, and its limit at a huge prior
precision (MAP: no epistemic part); the sampling variant against the
functional samples with the same generator.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch, make_loader, make_peft_classifier
from laplace import Laplace

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend import PredictiveUncertainty
from laplace_lora_backend.uncertainty import entropy, uncertainty_from_samples


@pytest.fixture(scope="module")
def fitted():
    model = make_peft_classifier("llama")
    la = Laplace(model, "classification", subset_of_weights="lora", prior_precision=0.5)
    la.fit(make_loader(make_batch(n=9, pad=True)))
    return la, model


def test_glm_uncertainty_matches_its_predictive_and_a_monte_carlo_reference(fitted):
    la, _ = fitted
    x = make_batch(n=5, pad=True, seed=3)
    del x["labels"]  # at prediction time there are no labels
    g = torch.Generator().manual_seed(0)
    u = la.predictive_uncertainty(x, n_samples=20_000, generator=g)
    assert isinstance(u, PredictiveUncertainty)
    assert torch.allclose(u.probs, la(x), atol=1e-12)
    mu, var = la._glm_predictive_distribution(x)
    assert torch.allclose(u.logit_mean, mu) and torch.allclose(u.logit_var, var)
    assert torch.allclose(u.entropy, entropy(u.probs))
    # reference: the same decomposition from an independent sampler
    dist = torch.distributions.MultivariateNormal(
        mu, var + 1e-12 * torch.eye(mu.shape[-1], dtype=mu.dtype)
    )
    torch.manual_seed(1)
    p = dist.sample((20_000,)).softmax(-1)
    expected = entropy(p).mean(0)
    mutual = entropy(p.mean(0)) - expected
    assert torch.allclose(u.expected_entropy, expected, atol=5e-3)
    assert torch.allclose(u.mutual_information, mutual, atol=5e-3)
    assert (u.mutual_information > 1e-3).all()


def test_no_epistemic_uncertainty_when_the_posterior_is_a_point(fitted):
    la, model = fitted
    x = make_batch(n=4, pad=True, seed=4)
    saved = la.prior_precision.clone()
    try:
        la.prior_precision = 1e12
        u = la.predictive_uncertainty(x, n_samples=50)
    finally:
        la.prior_precision = saved
    with torch.no_grad():
        map_probs = model(x).softmax(-1)
    assert torch.allclose(u.probs, map_probs, atol=1e-6)
    assert u.mutual_information.abs().max() < 1e-6
    assert torch.allclose(u.expected_entropy, entropy(map_probs), atol=1e-5)


def test_sampling_predictive_uncertainty_uses_weight_samples(fitted):
    la, _ = fitted
    x = make_batch(n=3, pad=True, seed=5)
    u = la.predictive_uncertainty(
        x, pred_type="nn", n_samples=8, generator=torch.Generator().manual_seed(7)
    )
    samples = la.functional_samples(
        x, pred_type="nn", n_samples=8, generator=torch.Generator().manual_seed(7)
    )
    ref = uncertainty_from_samples(samples.softmax(-1).mean(0), samples)
    for name in ("probs", "logit_mean", "logit_var", "mutual_information"):
        assert torch.allclose(getattr(u, name), getattr(ref, name))
    assert (u.mutual_information >= 0).all()


def test_a_jacobian_batch_gives_the_same_uncertainty(fitted):
    la, _ = fitted
    x = make_batch(n=3, pad=True, seed=6)
    a = la.predictive_uncertainty(x, generator=torch.Generator().manual_seed(0))
    b = la.predictive_uncertainty(
        la.jacobian_batch(x), generator=torch.Generator().manual_seed(0)
    )
    assert torch.allclose(a.mutual_information, b.mutual_information)
    assert torch.allclose(a.probs, b.probs)


def test_regression_is_refused_with_the_alternative():
    model = make_peft_classifier("llama", n_out=1)
    batch = make_batch(n=6, pad=True)
    batch["labels"] = torch.randn(6, 1, dtype=torch.float64)
    la = Laplace(model, "regression", subset_of_weights="lora")
    la.fit(make_loader(batch))
    with pytest.raises(ValueError, match="classification.*mean and variance"):
        la.predictive_uncertainty(batch)
