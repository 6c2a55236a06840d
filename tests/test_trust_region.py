"""The prior's trust region on training examples (`laplace_lora_backend.trust_region`).

The loss rises are checked against Gauss-Hermite quadrature and the direct
trace formula; the search against a classifier saturated on its training data
(where marglik alone makes the predictive nearly uniform) and against a
normal fit (where it must leave marglik's prior alone).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import make_batch, make_loader, make_peft_classifier
from laplace import Laplace

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend.glm import jacobian_batches
from laplace_lora_backend.trust_region import (
    expansion_ratio,
    loss_rise,
    trust_region_scale,
)


def test_actual_rise_matches_quadrature_for_two_classes():
    """Two classes: the loss depends on the margin only, a 1-D Gaussian
    integral (Gauss-Hermite, 80 nodes) is the reference."""
    f = torch.tensor([[2.0, -0.5], [0.3, 0.1], [9.0, -3.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    var = torch.tensor([[1.0, 0.2], [0.2, 0.5]], dtype=torch.float64).expand(3, 2, 2)
    actual, predicted = loss_rise(f, var, y, n_draws=200_000)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    v = 1.0 + 0.5 - 2 * 0.2  # variance of the margin
    for i in range(3):
        sign = 1 if int(y[i]) == 0 else -1
        m = sign * float(f[i, 0] - f[i, 1])
        losses = np.logaddexp(0.0, -(m + math.sqrt(v) * nodes))
        expected = (weights @ losses) / math.sqrt(2 * math.pi) - np.logaddexp(0, -m)
        assert float(actual[i]) == pytest.approx(expected, rel=2e-2, abs=1e-6)
        p = 1 / (1 + math.exp(-m))
        assert float(predicted[i]) == pytest.approx(0.5 * p * (1 - p) * v, rel=1e-10)


def test_predicted_rise_is_half_the_trace_of_the_loss_hessian_times_the_covariance():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(5, 4, generator=g, dtype=torch.float64) * 3
    L = torch.randn(5, 4, 4, generator=g, dtype=torch.float64)
    var = L @ L.mT
    y = torch.randint(0, 4, (5,), generator=g)
    _, predicted = loss_rise(f, var, y)
    p = f.softmax(-1)
    Lam = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    expected = 0.5 * torch.einsum("bij,bji->b", Lam, var)
    assert torch.allclose(predicted, expected, rtol=1e-10)


def test_rises_agree_for_a_vanishing_covariance_and_part_for_a_saturated_margin():
    """Small noise: the expansion is exact (whitened draws make the ratio 1 to
    rounding). A saturated example with margin variance v: actual / predicted
    is (exp(v/2) - 1) / (v/2), 2 near v = 2.5."""
    f = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    var = 1e-8 * torch.eye(3, dtype=torch.float64).unsqueeze(0)
    actual, predicted = loss_rise(f, var, y)
    assert float(actual / predicted) == pytest.approx(1.0, abs=1e-5)
    f = torch.tensor([[30.0, 0.0]], dtype=torch.float64)
    v = 2.5
    var = torch.tensor([[[v, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    actual, predicted = loss_rise(f, var, torch.tensor([0]), n_draws=400_000)
    expected = (math.exp(v / 2) - 1) / (v / 2)
    assert float(actual / predicted) == pytest.approx(expected, rel=2e-2)


class Scaled(torch.nn.Module):
    """A classifier with large logits: trained, it saturates its training set."""

    def __init__(self, inner: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x):
        return self.inner(x) * self.scale


def _saturated():
    model = Scaled(make_peft_classifier("llama"), 30.0)
    batch = make_batch(n=12, pad=True)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
        opt.step()
    la = Laplace(model, "classification", subset_of_weights="lora")
    la.fit(make_loader(batch))
    return la, model, batch


@pytest.fixture(scope="module")
def saturated():
    return _saturated()


def test_trust_region_narrows_the_posterior_of_a_saturated_classifier(saturated):
    la, model, batch = saturated
    assert float(la.loss) / la.n_data < 0.01  # saturated
    with pytest.warns(UserWarning, match="saturated"):
        la.optimize_prior_precision(trust_region=None)
    plain = la.prior_precision.clone()
    x = make_batch(n=12, pad=True, seed=3)
    with torch.no_grad():
        map_probs = model(x).softmax(-1)
    plain_probs = la(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # handled: no saturation warning
        la.optimize_prior_precision()
    tr = la.trust_region
    assert tr.n_examples == 12 and tr.ratio_marglik > 2.0
    assert tr.scale > 1.0 and tr.ratio <= 2.0
    # the whole prior scaled, its structure (fixed lora_A vs tuned lora_B) kept
    assert torch.allclose(la.prior_precision, plain * tr.scale)
    # the smallest factor on the bisection's resolution (8 decades / 2**8)
    batches = jacobian_batches(la, la.trust_region_batches)
    la.prior_precision = plain * tr.scale / 10 ** (8 / 2**8)
    assert expansion_ratio(la, batches)[0] > 2.0
    la.prior_precision = plain * tr.scale
    # marglik's predictive is nearly uniform; the trust region's is near MAP's
    probs = la(x)
    conf = probs.max(-1).values.mean()
    assert plain_probs.max(-1).values.mean() < 0.75
    assert 0.75 < conf <= map_probs.max(-1).values.mean()
    assert (probs.argmax(-1) == map_probs.argmax(-1)).all()


def test_trust_region_keeps_marglik_where_the_expansion_holds():
    model = make_peft_classifier("llama")
    la = Laplace(model, "classification", subset_of_weights="lora")
    la.fit(make_loader(make_batch(n=9, pad=True)))
    la.optimize_prior_precision(trust_region=None)
    plain = la.prior_precision.clone()
    la.optimize_prior_precision()
    assert la.trust_region.scale == 1.0
    assert la.trust_region.ratio_marglik <= 2.0
    assert torch.equal(la.prior_precision, plain)


def test_fit_keeps_the_first_batches_and_a_loaded_posterior_takes_them(saturated):
    la, model, batch = saturated
    assert sum(len(y) for _, y in la.trust_region_batches) == 12
    la.optimize_prior_precision()
    expected = la.prior_precision.clone()
    cached = jacobian_batches(la, la.trust_region_batches)
    la2 = Laplace(model, "classification", subset_of_weights="lora")
    la2.load_state_dict(la.state_dict())
    assert la2.trust_region_batches == []
    with pytest.warns(UserWarning, match="No training examples"):
        la2.optimize_prior_precision()
    la2.optimize_prior_precision(train_batches=cached)
    assert torch.allclose(la2.prior_precision, expected)
    # a new fit starts a new list; the class attribute bounds it
    la2.trust_region_examples = 4
    la2.fit(make_loader(batch, batch_size=3))
    assert [len(y) for _, y in la2.trust_region_batches] == [3, 3]


def test_trust_region_is_skipped_for_regression():
    model = make_peft_classifier("llama", n_out=1)
    batch = make_batch(n=6, pad=True)
    batch["labels"] = torch.randn(6, 1, dtype=torch.float64)
    la = Laplace(model, "regression", subset_of_weights="lora")
    la.fit(make_loader(batch))
    la.optimize_prior_precision(n_steps=5)
    assert la.trust_region is None


def test_trust_region_scale_with_a_fixed_bound_is_monotone(saturated):
    """A looser bound never needs a larger factor."""
    la, _, _ = saturated
    la.optimize_prior_precision(trust_region=None)
    base = la.prior_precision.clone()
    batches = jacobian_batches(la, la.trust_region_batches)
    scales = []
    for bound in (1.5, 2.0, 4.0):
        la.prior_precision = base
        scales.append(trust_region_scale(la, batches, bound).scale)
    assert scales[0] >= scales[1] >= scales[2]


def test_loss_rise_works_for_more_classes_than_draws():
    """Whitening needs more draws than classes: 300 classes, 64 draws asked."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(2, 300, generator=g, dtype=torch.float64)
    var = 1e-8 * torch.eye(300, dtype=torch.float64).expand(2, 300, 300)
    actual, predicted = loss_rise(f, var, torch.tensor([0, 5]), n_draws=64)
    assert torch.allclose(
        actual / predicted, torch.ones(2, dtype=torch.float64), atol=1e-4
    )
