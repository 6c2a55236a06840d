"""Prior-precision tuning on cached Jacobians: grid search and ``"auto"``.

laplace-torch's ``gridsearch`` recomputes the whole predictive (a forward and
`C` backward passes per batch) for every grid point, and scores the points
with one torchmetrics metric it never resets. Here the validation Jacobians
are computed once (`jacobian_batches`); each grid point then costs a few
matrix products, and every score is that point's own.

``method="auto"`` (`tune_auto`) is marglik checked against MAP on held-out
data: keep the marglik prior if its validation loss is not worse than MAP's,
else take the grid point with the lowest validation loss, and if no point
beats MAP, switch the posterior off (a prior precision so large that the
predictive is MAP's) and warn.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from laplace.utils import Likelihood, LinkApprox, PredType, PriorStructure, TuningMethod
from torch.nn import functional as F

from laplace_lora_backend.curvature.discovery import LoRAWeight, lora_init
from laplace_lora_backend.distributed import active_group, reduce_tensor
from laplace_lora_backend.glm import JacobianBatch, jacobian_batches
from laplace_lora_backend.trust_region import TRUST_RATIO, trust_region_scale

__all__ = [
    "LORA_PRIOR",
    "PriorChoice",
    "PriorTuning",
    "grid_search",
    "map_loss",
    "score",
    "tune_auto",
]

# "posterior switched off": the predictive equals MAP's to float precision
POSTERIOR_OFF = 1e8
# prior_structure of the LoRA classes (see `lora_prior_groups`)
LORA_PRIOR = "lora"

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


def grid_search(
    la: Any,
    batches: Batches,
    grid: Sequence[torch.Tensor | float],
    loss: Loss | Any = nll,
    link_approx: str = "probit",
    n_samples: int = 100,
) -> tuple[int, list[float]]:
    """Index of the grid point with the lowest validation loss, and all losses.

    Every point is scored on the cached Jacobians; the object's prior
    precision is left at the last grid point (callers set the winner).

    Returns
    -------
    best : int
        Index into `grid` of the lowest loss (the first one on ties).
    losses : list[float]
        The validation loss of every grid point.
    """
    losses = [score(la, batches, loss, link_approx, n_samples, p) for p in grid]
    best = min(range(len(grid)), key=losses.__getitem__)
    return best, losses


def tune_auto(
    la: Any,
    batches: Batches,
    marglik: Callable[[], None],
    grid_scales: Sequence[float],
    loss: Loss | Any = nll,
    link_approx: str = "probit",
    n_samples: int = 100,
) -> PriorChoice:
    """Marglik, checked against MAP on validation; grid or MAP as fallback.

    Parameters
    ----------
    la : LoRALaplace
        Fitted.
    batches : Sequence[tuple[JacobianBatch, torch.Tensor]]
        Validation Jacobians (`jacobian_batches`).
    marglik : callable
        Sets `la.prior_precision` by maximising the marginal likelihood.
    grid_scales : Sequence[float]
        Multiples of the marglik prior precision tried if marglik is worse
        than MAP on validation (keeping its per-tensor structure).
    loss, link_approx, n_samples
        As for `score`.

    Returns
    -------
    PriorChoice
        Also left set on the object (`la.prior_precision`).
    """
    marglik()
    base = la.prior_precision.detach().clone()
    base_loss = score(la, batches, loss, link_approx, n_samples, base)
    ref = map_loss(batches, str(getattr(la.likelihood, "value", la.likelihood)), loss)
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
    best, losses = grid_search(
        la, batches, [base * s for s in scales], loss, link_approx, n_samples
    )
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


def lora_prior_groups(
    weights: Sequence[LoRAWeight], init: bool | str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"lora"`` prior structure: which tensors are tuned, which fixed.

    `lora_A` is drawn at random when the adapter is created and, by the
    `A -> c A`, `B -> B / c` symmetry of ``B A``, its scale is not set by the
    data: its prior is the distribution PEFT drew it from, variance
    ``1 / (3 in_features)`` for the default Kaiming-uniform initialisation
    (``init_lora_weights=True``) and ``1 / r^2`` for ``"gaussian"``. `lora_B`
    (zero at initialisation, all of what fine-tuning learns) gets one prior
    precision tuned by marglik. With a data-dependent initialisation (PiSSA,
    ...) `lora_A` gets its own tuned precision.

    Returns
    -------
    groups : torch.Tensor
        `(n_tensors,)` long: the tuned precision each tensor shares.
    fixed : torch.Tensor
        `(n_tensors,)`: the fixed precision, NaN where tuned.
    """
    init = True if init is None else init
    groups, fixed = [], []
    for w in weights:
        precision = float("nan")
        if w.kind == "A" and init is True:
            precision = 3.0 * w.in_features
        elif w.kind == "A" and str(init).lower() == "gaussian":
            precision = float(w.out_features) ** 2
        groups.append(0 if w.kind == "B" else 1)
        fixed.append(precision)
    return torch.tensor(groups), torch.tensor(fixed, dtype=torch.float64)


def marglik_groups(
    la: Any,
    groups: torch.Tensor,
    fixed: torch.Tensor | None = None,
    n_steps: int = 100,
    lr: float = 0.1,
    init: float = 1.0,
) -> torch.Tensor:
    """Per-tensor prior precision maximising the marginal likelihood.

    Tensors share one tuned precision per value of `groups`; where `fixed` is
    not NaN the precision is that value. Adam on the log precisions
    (laplace-torch's marglik: `n_steps`, `lr`).

    Returns
    -------
    torch.Tensor
        `(n_tensors,)` prior precision (also set on `la`).
    """
    fixed = torch.full(groups.shape, float("nan")) if fixed is None else fixed
    fixed = fixed.to(la._device, torch.float64)
    groups = groups.to(la._device)
    log_p = torch.full(
        (int(groups.max()) + 1,), math.log(init), dtype=torch.float64, device=la._device
    )
    log_p.requires_grad_(True)
    opt = torch.optim.Adam([log_p], lr=lr)

    def prior() -> torch.Tensor:
        p = torch.where(fixed.isnan(), log_p.exp()[groups], fixed)
        return p.to(la._dtype)

    for _ in range(n_steps):
        opt.zero_grad()
        (-la.log_marginal_likelihood(prior_precision=prior())).backward()
        opt.step()
    la.prior_precision = prior().detach()
    return la.prior_precision


# mean training NLL (nats per example) below which a classifier is saturated
SATURATED_LOSS = 0.01


def _warn_if_saturated(la: Any) -> None:
    """Warn when marglik cannot set the prior: the training loss is ~0.

    With ``p(y|x) ~ 1`` on every training example the GGN / Fisher
    ``diag(p) - p p^T`` vanishes, the posterior is the prior in every
    direction and the evidence barely depends on the data: on the calibration
    battery this made the predictive far too uncertain (BBC news, training
    NLL ~0.002). Validation data fixes it (``method="auto"``).
    """
    if la.likelihood != Likelihood.CLASSIFICATION or not la.n_data:
        return
    mean_loss = float(la.loss) / la.n_data
    if mean_loss < SATURATED_LOSS:
        warnings.warn(
            f"The mean training loss is {mean_loss:.2g} nats: the model is "
            "saturated on its training data, its curvature is nearly zero and "
            "the marginal likelihood cannot set the prior (the predictive tends "
            "to be far too uncertain). Tune the prior on held-out data: "
            "optimize_prior_precision(method='auto', val_loader=...).",
            stacklevel=3,
        )


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y.reshape(out.shape)).square().mean()


class PriorTuning:
    """`optimize_prior_precision` of `LoRALaplace`.

    Mixed in ahead of laplace-torch's class: ``"marglik"`` and the sampling
    predictive's ``"gridsearch"`` are laplace-torch's own.
    """

    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GLM,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: PriorStructure | str = LORA_PRIOR,
        val_loader: Iterable | None = None,
        loss: Any = None,
        log_prior_prec_min: float = -4,
        log_prior_prec_max: float = 4,
        grid_size: int = 100,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        verbose: bool = False,
        progress_bar: bool = False,
        log_prior_prec_base: float = 10.0,
        *,
        trust_region: float | None = TRUST_RATIO,
        train_batches: Iterable | None = None,
    ) -> None:
        """Tune the prior precision (laplace-torch's arguments, plus ``"auto"``).

        ``method="marglik"`` is laplace-torch's, checked on training examples
        (`trust_region`), with the LoRA prior structure by default
        (``prior_structure="lora"``, measured on the calibration battery:
        laplace-torch's scalar prior gives `lora_A`, whose scale the data does
        not set, a variance far above its initialisation's and the
        predictive too much variance). ``method="gridsearch"`` with
        the GLM predictive scores the grid on validation Jacobians computed
        once (`laplace_lora_backend.glm`), with a fresh loss per grid point;
        the grid and the choice (lowest validation loss) are laplace-torch's.
        ``method="auto"`` needs `val_loader`: marglik, kept if its validation
        loss is not worse than MAP's; else the grid point with the lowest
        validation loss, where the grid scales the marglik prior precision by
        ``log_prior_prec_base ** linspace(min, max, grid_size)`` (keeping its
        structure); if no point beats MAP, the posterior is switched off
        (the MAP predictive) with a warning. The choice is kept in
        `prior_choice` (a `PriorChoice`).

        Parameters
        ----------
        pred_type, method, n_steps, lr, init_prior_prec
            See `laplace.ParametricLaplace.optimize_prior_precision`; `method`
            also takes ``"auto"``.
        prior_structure : {'lora', 'scalar', 'layerwise', 'diag'}, default='lora'
            ``"lora"`` (the LoRA classes' default; laplace-torch's is
            ``"scalar"``): `lora_A` keeps the prior it was drawn from at
            initialisation (variance ``1 / (3 in_features)`` for PEFT's
            default), all `lora_B` share one precision tuned by marglik (see
            `lora_prior_groups`). The others are laplace-torch's.
        val_loader : Iterable, optional
            Labelled validation batches (``"gridsearch"`` and ``"auto"``).
        loss : callable or torchmetrics.Metric, optional
            Validation loss ``loss(predictions, targets)``; default: NLL for
            classification, mean squared error for regression.
        log_prior_prec_min, log_prior_prec_max, grid_size, log_prior_prec_base
            The grid.
        link_approx, n_samples
            The predictive scored on validation data.
        verbose, progress_bar : bool
        trust_region : float or None, default=2.0
            Classification: after marglik, check the prior on training
            examples and scale it up until the actual rise of
            the training loss under the posterior is at most this many times
            the rise the Laplace expansion predicts (see
            `laplace_lora_backend.trust_region`; it binds for classifiers
            saturated on their training data). The outcome is kept in
            `trust_region`. ``None``: laplace-torch's plain marglik.
        train_batches : Iterable, optional
            Labelled training batches for the trust region (`JacobianBatch`
            inputs are reused); default: the `trust_region_batches` that
            `fit` kept.

        Raises
        ------
        ValueError
            Unknown `method`, or ``"gridsearch"`` / ``"auto"`` without
            `val_loader`.
        """
        self._check_fitted()
        method = str(getattr(method, "value", method))
        if method not in ("marglik", "gridsearch", "auto"):
            raise ValueError(
                f"Unknown method {method!r}: use 'marglik', 'gridsearch' or 'auto'."
            )
        cached = str(getattr(pred_type, "value", pred_type)) == PredType.GLM
        self.prior_choice = None
        if method == "marglik":
            self.trust_region = None
            self._marglik(n_steps, lr, init_prior_prec, prior_structure)
            if trust_region is not None:
                self._apply_trust_region(trust_region, train_batches)
            if self.trust_region is None or self.trust_region.n_examples == 0:
                _warn_if_saturated(self)
        elif method == "gridsearch" and not cached:
            return super().optimize_prior_precision(
                pred_type,
                method,
                n_steps,
                lr,
                init_prior_prec,
                prior_structure,
                val_loader,
                loss,
                log_prior_prec_min,
                log_prior_prec_max,
                grid_size,
                link_approx,
                n_samples,
                verbose,
                progress_bar,
                log_prior_prec_base=log_prior_prec_base,
            )
        else:
            scales = torch.logspace(
                log_prior_prec_min,
                log_prior_prec_max,
                grid_size,
                base=log_prior_prec_base,
            )

            def marglik() -> None:
                PriorTuning.optimize_prior_precision(
                    self,
                    pred_type,
                    "marglik",
                    n_steps,
                    lr,
                    init_prior_prec,
                    prior_structure,
                    progress_bar=progress_bar,
                    trust_region=trust_region,
                    train_batches=train_batches,
                )

            self._tune_on_validation(
                method,
                cached,
                val_loader,
                loss,
                scales,
                marglik,
                (link_approx, n_samples),
                progress_bar,
            )
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")

    def _marglik(
        self,
        n_steps: int,
        lr: float,
        init_prior_prec: float | torch.Tensor,
        prior_structure: PriorStructure | str,
    ) -> None:
        """Marglik with `prior_structure` (``"lora"``: `marglik_groups`)."""
        if prior_structure == LORA_PRIOR:
            groups, fixed = lora_prior_groups(
                self.lora_weights, lora_init(self.model, self.lora_weights[0].adapter)
            )
            init = float(torch.as_tensor(init_prior_prec).flatten()[0])
            marglik_groups(self, groups, fixed, n_steps, lr, init)
            return
        super().optimize_prior_precision(
            PredType.GLM,
            "marglik",
            n_steps,
            lr,
            init_prior_prec,
            prior_structure,
        )

    def _apply_trust_region(self, ratio: float, train_batches: Iterable | None) -> None:
        """Raise the marglik prior into the trust region of training examples."""
        if self.likelihood != Likelihood.CLASSIFICATION:
            return
        source = self.trust_region_batches if train_batches is None else train_batches
        batches = jacobian_batches(self, source, self.dict_key_y)
        if not batches:
            warnings.warn(
                "No training examples for the prior's trust region (fit keeps "
                "the first batches; a loaded posterior has none): the prior is "
                "marglik's alone. Pass train_batches=... to check it.",
                stacklevel=4,
            )
        group = active_group(self.process_group)
        reduce = None if group is None else (lambda t: reduce_tensor(t, group))
        self.trust_region = trust_region_scale(self, batches, ratio, reduce)

    def _tune_on_validation(
        self,
        method: str,
        cached: bool,
        val_loader: Iterable | None,
        loss: Any,
        scales: torch.Tensor,
        marglik: Callable[[], None],
        predictive: tuple[str, int],
        progress_bar: bool,
    ) -> None:
        """``"gridsearch"`` / ``"auto"`` on validation Jacobians computed once.

        Raises
        ------
        ValueError
            Without `val_loader`, or for the sampling predictive.
        """
        if val_loader is None:
            raise ValueError(
                f"method={method!r} needs labelled validation data: pass "
                "val_loader=... (batches like the training loader's), or use "
                "method='marglik'."
            )
        if not cached:
            raise ValueError(
                "method='auto' scores the GLM predictive: use pred_type='glm'."
            )
        if loss is None:
            loss = nll if self.likelihood == Likelihood.CLASSIFICATION else _mse
        batches = jacobian_batches(
            self, val_loader, self.dict_key_y, progress_bar, "[Validation Jacobians]"
        )
        link_approx, n_samples = predictive
        if method == "gridsearch":
            best, _ = grid_search(
                self, batches, list(scales), loss, link_approx, n_samples
            )
            self.prior_precision = scales[best]
        else:
            self.prior_choice = tune_auto(
                self, batches, marglik, scales.tolist(), loss, link_approx, n_samples
            )
