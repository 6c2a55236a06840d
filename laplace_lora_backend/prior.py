"""`PriorTuning`: `optimize_prior_precision` of the LoRA classes.

laplace-torch's ``"marglik"`` with the ``"lora"`` prior structure by default
(`laplace_lora_backend.prior_groups`), checked on training examples by a trust
region (`laplace_lora_backend.trust_region`); ``"gridsearch"`` and ``"auto"``
scored on validation Jacobians computed once
(`laplace_lora_backend.prior_validation`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from laplace.utils import Likelihood, LinkApprox, PredType, PriorStructure, TuningMethod

from laplace_lora_backend.curvature.discovery import lora_init
from laplace_lora_backend.distributed import active_group, reduce_tensor
from laplace_lora_backend.glm import jacobian_batches
from laplace_lora_backend.prior_groups import (
    LORA_PRIOR,
    lora_prior_groups,
    marglik_groups,
)
from laplace_lora_backend.prior_validation import (
    grid_search,
    map_loss,
    nll,
    score,
    tune_auto,
)
from laplace_lora_backend.token_prior import is_token_loader, tune_on_tokens
from laplace_lora_backend.trust_region import TRUST_RATIO, trust_region_scale

__all__ = ["PriorTuning"]

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
            stacklevel=4,
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
            With next-token labels `(batch, tokens)` (a causal LM), each prior
            is scored by the token NLL of `next_token_predictive`
            (`laplace_lora_backend.token_prior`).
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
        marglik = partial(
            self._checked_marglik,
            n_steps,
            lr,
            init_prior_prec,
            prior_structure,
            trust_region,
            train_batches,
        )
        if val_loader is not None and iter(val_loader) is val_loader:
            val_loader = list(val_loader)  # a one-shot iterator: read it once
        scales = torch.logspace(
            log_prior_prec_min, log_prior_prec_max, grid_size, base=log_prior_prec_base
        )
        if method == "marglik":
            marglik()
        elif is_token_loader(val_loader, self.dict_key_y):
            predictive = (pred_type, n_samples)
            tune_on_tokens(self, method, val_loader, predictive, marglik, scales, loss)
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

    def _checked_marglik(
        self,
        n_steps: int,
        lr: float,
        init_prior_prec: float | torch.Tensor,
        prior_structure: PriorStructure | str,
        trust_region: float | None,
        train_batches: Iterable | None,
    ) -> None:
        """Marglik, then the trust region (a saturation warning without it)."""
        self.trust_region = None
        self._marglik(n_steps, lr, init_prior_prec, prior_structure)
        if trust_region is not None:
            self._apply_trust_region(trust_region, train_batches)
        if self.trust_region is None or self.trust_region.n_examples == 0:
            _warn_if_saturated(self)

    def _marglik(
        self,
        n_steps: int,
        lr: float,
        init_prior_prec: float | torch.Tensor,
        prior_structure: PriorStructure | str,
    ) -> None:
        """Marglik with `prior_structure` (``"lora"``: `marglik_groups`)."""
        if prior_structure == LORA_PRIOR:
            adapter = next((w.adapter for w in self.lora_weights if not w.is_head), "")
            groups, fixed = lora_prior_groups(
                self.lora_weights, lora_init(self.model, adapter)
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
        loss_at = partial(score, self, batches, loss, link_approx, n_samples)
        if method == "gridsearch":
            best, _ = grid_search(loss_at, list(scales))
            self.prior_precision = scales[best]
        else:
            likelihood = str(getattr(self.likelihood, "value", self.likelihood))
            ref = map_loss(batches, likelihood, loss)
            self.prior_choice = tune_auto(self, marglik, scales.tolist(), loss_at, ref)
