"""The Laplace approximation's own check on the training data: a trust region.

Laplace replaces the training loss by its second-order expansion at the MAP.
Under the Gaussian posterior, the expansion predicts that the training loss
rises on average by ``1/2 sum_i tr(Lambda_i S_i)``, where ``S_i = J_i Sigma
J_i^T`` is the posterior covariance of example `i`'s logits and ``Lambda_i``
the loss's Hessian in the logits. The linearised model gives the actual
rise, ``sum_i E[l_i(f_i + e_i)] - l_i(f_i)`` with ``e_i ~ N(0, S_i)``. Where
the expansion holds the two agree; where the posterior spreads the logits
beyond it, the actual rise is larger.

A saturated classifier (training loss ~0) is the extreme case: its curvature
``diag(p) - p p^T`` is ~0, the evidence barely depends on the data and
marglik gives the LoRA weights a prior variance so large that the predictive
is nearly uniform (the calibration battery's BBC-news cases: ECE ~50%). The
trust region keeps the marglik prior where the expansion holds (actual rise
at most `ratio_bound` times the predicted one on training examples) and
otherwise multiplies the prior precision by the smallest factor that brings
the posterior back inside. For a saturated example with logit margin noise of
variance ``v`` the ratio is ``(e^{v/2} - 1) / (v/2)``: 2 at ``v ~ 2.5``.

Everything is computed on cached GLM Jacobians (`laplace_lora_backend.glm`),
so every candidate prior costs a few matrix products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F

from laplace_lora_backend.glm import JacobianBatch, center_logits, psd_factor

__all__ = ["TrustRegion", "expansion_ratio", "loss_rise", "trust_region_scale"]

# the default bound on actual / predicted rise of the training loss
TRUST_RATIO = 2.0
# standard-normal draws per example for the expected loss (antithetic pairs)
N_DRAWS = 512


@dataclass
class TrustRegion:
    """How the trust region checked (and possibly raised) the marglik prior.

    Attributes
    ----------
    ratio_bound : float
        The bound on actual / predicted rise of the training loss.
    scale : float
        Factor applied to the tuned prior precisions (1: marglik kept).
    ratio_marglik : float
        The ratio at the marglik prior.
    ratio : float
        The ratio at the prior set.
    n_examples : int
        Training examples the ratio was computed on.
    """

    ratio_bound: float
    scale: float
    ratio_marglik: float
    ratio: float
    n_examples: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (for JSON).

        Returns
        -------
        dict[str, Any]
            The fields by name.
        """
        return asdict(self)


def _draws(n_classes: int, n_draws: int = N_DRAWS) -> torch.Tensor:
    """Fixed antithetic, exactly whitened standard-normal draws `(n_draws, C)`.

    Returns
    -------
    torch.Tensor
        Float64 draws whose sample mean is 0 and sample covariance is `I`, so
        that for a vanishing covariance the expected loss rise equals the
        quadratic one exactly.
    """
    half = max(n_draws // 2, 2 * n_classes)  # whitening needs > C draws
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(half, n_classes, generator=gen, dtype=torch.float64)
    z = z - z.mean(0)
    L = torch.linalg.cholesky(z.T @ z / half)
    z = torch.linalg.solve_triangular(L, z.T, upper=False).T
    return torch.cat([z, -z])  # (2 * half, C)


def _nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `(..., C)` logits, accurate for saturated examples.

    ``log(1 + sum_{c != y} exp(z_c - z_y))`` through `softplus`, so that a
    loss of 1e-12 is not lost to cancellation.

    Returns
    -------
    torch.Tensor
        `(...)` losses.
    """
    zy = logits.gather(-1, y)
    others = (logits - zy).scatter(-1, y, float("-inf"))
    return F.softplus(torch.logsumexp(others, -1))


def loss_rise(
    f: torch.Tensor, var: torch.Tensor, y: torch.Tensor, n_draws: int = N_DRAWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Actual and predicted rise of the cross-entropy under Gaussian logits.

    Parameters
    ----------
    f : torch.Tensor
        `(batch, C)` logits at the MAP.
    var : torch.Tensor
        `(batch, C, C)` posterior covariance of the logits.
    y : torch.Tensor
        `(batch,)` integer labels.
    n_draws : int, default=512

    Returns
    -------
    actual : torch.Tensor
        `(batch,)` ``E[l(f + e)] - l(f)``, ``e ~ N(0, var)`` (fixed draws).
    predicted : torch.Tensor
        `(batch,)` ``1/2 tr(Lambda var)``, written as
        ``1/2 sum_{c<d} p_c p_d Var(e_c - e_d)`` (no cancellation).
    """
    f, var = center_logits(f.double(), var.double())
    y = y.long().reshape(-1, 1).to(f.device)
    L = psd_factor(var)
    z = _draws(f.shape[-1], n_draws).to(f.device)
    samples = f.unsqueeze(1) + torch.einsum("bck,mk->bmc", L, z)
    actual = _nll(samples, y.unsqueeze(1).expand(-1, z.shape[0], -1)).mean(1)
    actual = actual - _nll(f, y)
    p = f.softmax(-1)
    d = var.diagonal(dim1=-2, dim2=-1)
    diff_var = d.unsqueeze(-1) + d.unsqueeze(-2) - 2 * var  # Var(e_c - e_d)
    predicted = 0.25 * torch.einsum("bc,bd,bcd->b", p, p, diff_var)
    return actual, predicted


def expansion_ratio(
    la: Any,
    batches: Sequence[tuple[JacobianBatch, torch.Tensor]],
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Actual / predicted rise of the training loss at `la`'s prior precision.

    Parameters
    ----------
    la : LoRALaplace
        Fitted (classification).
    batches : Sequence[tuple[JacobianBatch, torch.Tensor]]
        Training examples' Jacobians and labels.
    reduce : callable, optional
        Sums a `(3,)` tensor over the ranks of a distributed fit (every rank
        calls it, also one without examples).

    Returns
    -------
    ratio : float
        1 where the predicted rise is 0.
    n_examples : int
        Examples it was computed on (all ranks).
    """
    total = torch.zeros(3, dtype=torch.float64, device=la._device)
    for jb, y in batches:
        mu, var = jb.moments(la.functional_variance)
        actual, predicted = loss_rise(mu, var, y)
        total += torch.stack(
            [actual.sum(), predicted.sum(), torch.tensor(len(y)).to(actual)]
        ).to(total.device)
    if reduce is not None:
        total = reduce(total)
    actual, predicted, n = (float(v) for v in total)
    return (actual / predicted if predicted > 0 else 1.0), round(n)


def trust_region_scale(
    la: Any,
    batches: Sequence[tuple[JacobianBatch, torch.Tensor]],
    ratio_bound: float = TRUST_RATIO,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_log10_scale: float = 8.0,
    n_bisections: int = 8,
) -> TrustRegion:
    """Raise the prior precision until the expansion holds on `batches`.

    Keeps `la.prior_precision` if its `expansion_ratio` is at most
    `ratio_bound`; else multiplies it (every entry, keeping its structure) by
    the smallest factor in ``[1, 10**max_log10_scale]`` that meets the bound
    (bisection on the factor's logarithm: the posterior covariance, hence the
    ratio, falls as the factor grows), and sets it.

    Parameters
    ----------
    la : LoRALaplace
        Fitted, with the marglik prior precision set.
    batches : Sequence[tuple[JacobianBatch, torch.Tensor]]
        Training examples' Jacobians and labels.
    ratio_bound : float, default=2.0
    reduce : callable, optional
        Sums over the ranks of a distributed fit.
    max_log10_scale : float, default=8.0
    n_bisections : int, default=8
        The factor is found to ``max_log10_scale / 2**n_bisections`` decades.

    Returns
    -------
    TrustRegion
    """
    base = la.prior_precision.detach().clone()

    def ratio_at(log10_scale: float) -> float:
        la.prior_precision = base * 10.0**log10_scale
        return expansion_ratio(la, batches, reduce)[0]

    la.prior_precision = base
    first, n = expansion_ratio(la, batches, reduce)
    if n == 0 or not first > ratio_bound:  # NaN: kept as well
        return TrustRegion(ratio_bound, 1.0, first, first, n)
    lo, hi = 0.0, max_log10_scale
    ratio_hi = ratio_at(hi)
    for _ in range(n_bisections):
        mid = (lo + hi) / 2
        r = ratio_at(mid)
        if r > ratio_bound:
            lo = mid
        else:
            hi, ratio_hi = mid, r
    la.prior_precision = base * 10.0**hi
    return TrustRegion(ratio_bound, 10.0**hi, first, ratio_hi, n)
