"""Prior precision scored on held-out data: grid search and ``"auto"``.

laplace-torch's ``gridsearch`` recomputes the whole predictive (a forward and
`C` backward passes per batch) for every grid point, and scores the points
with one torchmetrics metric it never resets. Here the validation Jacobians
are computed once (`jacobian_batches`); each grid point then costs a few
matrix products, and every score is that point's own.

``"auto"`` (`tune_auto`) is marglik checked against MAP on held-out data: keep
the marglik prior if its validation loss is not worse than MAP's, else take
the grid point with the lowest validation loss, and if no point beats MAP,
switch the posterior off (a prior precision so large that the predictive is
MAP's) and warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from laplace_lora_backend.glm import JacobianBatch

__all__ = [
    "POSTERIOR_OFF",
    "PriorChoice",
    "grid_search",
    "map_loss",
    "nll",
    "score",
    "tune_auto",
]

# "posterior switched off": the predictive equals MAP's to float precision
POSTERIOR_OFF = 1e8

Batches = Sequence[tuple[JacobianBatch, torch.Tensor]]
Loss = Callable[[torch.Tensor, torch.Tensor], Any]


@dataclass
class PriorChoice:
    """How `optimize_prior_precision(method="auto")` chose the prior.

    Attributes
    ----------
    method : str
        ``"marglik"`` (kept), ``"gridsearch"`` (marglik was worse than MAP on
        validation) or ``"map"`` (nothing beat MAP: posterior switched off).
    prior_precision : list[float]
        The prior precision set on the object.
    marglik_prior_precision : list[float]
    val_loss_marglik, val_loss_map : float
        Validation loss of the marglik prior's predictive and of MAP's.
    val_loss : float
        Validation loss of the chosen prior.
    grid : list[float]
        Grid scales (multiples of the marglik prior) tried, if any.
    grid_losses : list[float]
    """

    method: str
    prior_precision: list[float]
    marglik_prior_precision: list[float]
    val_loss_marglik: float
    val_loss_map: float
    val_loss: float
    grid: list[float] = field(default_factory=list)
    grid_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (for JSON).

        Returns
        -------
        dict[str, Any]
            The fields by name.
        """
        return asdict(self)


def nll(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of integer labels under `probs` `(n, C)`.

    Returns
    -------
    torch.Tensor
        Scalar (probabilities clamped at 1e-12).
    """
    p = probs.gather(-1, y.long().reshape(-1, 1)).clamp_min(1e-12)
    return -p.log().mean()


def _evaluate(loss: Loss | Any, out: torch.Tensor, y: torch.Tensor) -> float:
    """Loss of predictions `out` on targets `y`; a torchmetrics metric is reset.

    Returns
    -------
    float
        The loss, summed if it is not a scalar.
    """
    if hasattr(loss, "reset") and hasattr(loss, "update"):
        loss.reset()
        loss.update(out, y)
        value = loss.compute()
        loss.reset()
    else:
        value = loss(out, y)
    return float(torch.as_tensor(value).sum())


def score(
    la: Any,
    batches: Batches,
    loss: Loss | Any = nll,
    link_approx: str = "probit",
    n_samples: int = 100,
    prior_precision: torch.Tensor | float | None = None,
) -> float:
    """Validation loss of the GLM predictive at a prior precision.

    Parameters
    ----------
    la : LoRALaplace
        Fitted; its prior precision is set to `prior_precision` if given.
    batches : Sequence[tuple[JacobianBatch, torch.Tensor]]
        From `jacobian_batches`.
    loss : callable or torchmetrics.Metric, default=nll
        ``loss(predictions, targets)`` over the whole set; a metric is reset
        before and after.
    link_approx : str, default='probit'
    n_samples : int, default=100
        For ``link_approx="mc"``.
    prior_precision : float or torch.Tensor, optional

    Returns
    -------
    float
        The loss (``inf`` if the predictive is not finite).
    """
    if prior_precision is not None:
        la.prior_precision = prior_precision
    outs, ys = [], []
    for jb, y in batches:
        out = la(jb, pred_type="glm", link_approx=link_approx, n_samples=n_samples)
        if isinstance(out, tuple):  # regression: the mean
            out = out[0]
        outs.append(out)
        ys.append(y.to(out.device))
    out, y = torch.cat(outs), torch.cat(ys)
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return _evaluate(loss, out, y)


def map_loss(batches: Batches, likelihood: str, loss: Loss | Any = nll) -> float:
    """Validation loss of MAP's predictive (softmax of the GLM mean).

    Returns
    -------
    float
        `loss` of the softmax of the means (the means themselves for
        regression) over all batches.
    """
    outs, ys = [], []
    for jb, y in batches:
        mu = jb.mean().detach()
        outs.append(F.softmax(mu, -1) if likelihood == "classification" else mu)
        ys.append(y.to(mu.device))
    return _evaluate(loss, torch.cat(outs), torch.cat(ys))


LossAt = Callable[[torch.Tensor | float], float]


def grid_search(
    loss_at: LossAt, grid: Sequence[torch.Tensor | float]
) -> tuple[int, list[float]]:
    """Index of the grid point with the lowest validation loss, and all losses.

    Parameters
    ----------
    loss_at : callable
        ``loss_at(prior_precision)``: sets the prior precision and returns
        the validation loss (e.g. `score` on cached Jacobians, or
        `TokenValidation.loss`). The object's prior precision is left at
        the last grid point (callers set the winner).
    grid : Sequence[torch.Tensor or float]

    Returns
    -------
    best : int
        Index into `grid` of the lowest loss (the first one on ties).
    losses : list[float]
        The validation loss of every grid point.
    """
    losses = [loss_at(p) for p in grid]
    best = min(range(len(grid)), key=losses.__getitem__)
    return best, losses


def tune_auto(
    la: Any,
    marglik: Callable[[], None],
    grid_scales: Sequence[float],
    loss_at: LossAt,
    ref: float,
) -> PriorChoice:
    """Marglik, checked against MAP on validation; grid or MAP as fallback.

    Parameters
    ----------
    la : LoRALaplace
        Fitted.
    marglik : callable
        Sets `la.prior_precision` by maximising the marginal likelihood.
    grid_scales : Sequence[float]
        Multiples of the marglik prior precision tried if marglik is worse
        than MAP on validation (keeping its per-tensor structure).
    loss_at : callable
        ``loss_at(prior_precision)``: the validation loss of the predictive
        at a prior precision (see `grid_search`).
    ref : float
        MAP's validation loss (`map_loss`, `TokenValidation.map_loss`).

    Returns
    -------
    PriorChoice
        Also left set on the object (`la.prior_precision`).
    """
    marglik()
    base = la.prior_precision.detach().clone()
    base_loss = loss_at(base)
    choice = PriorChoice(
        method="marglik",
        prior_precision=base.tolist(),
        marglik_prior_precision=base.tolist(),
        val_loss_marglik=base_loss,
        val_loss_map=ref,
        val_loss=base_loss,
    )
    if base_loss <= ref:
        la.prior_precision = base
        return choice
    scales = [float(s) for s in grid_scales]
    best, losses = grid_search(loss_at, [base * s for s in scales])
    choice.grid, choice.grid_losses = scales, losses
    if losses[best] <= ref:
        prior = base * scales[best]
        choice.method, choice.val_loss = "gridsearch", losses[best]
    else:
        prior = torch.full_like(base, POSTERIOR_OFF)
        choice.method, choice.val_loss = "map", ref
        warnings.warn(
            f"No prior precision beats MAP on the validation data (MAP loss "
            f"{ref:.4g}, marglik {base_loss:.4g}, best grid point "
            f"{losses[best]:.4g}): the posterior is switched off (prior precision "
            f"{POSTERIOR_OFF:g}) and the predictive is MAP's.",
            stacklevel=3,
        )
    la.prior_precision = prior
    choice.prior_precision = prior.tolist()
    return choice
