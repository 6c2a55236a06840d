"""The fitted state of a LoRA Laplace object: what needs `fit`, and loading it.

`FittedState` is a mixin of `LoRALaplace`. Evidence, sampling, prior tuning
and saving need a fitted posterior and raise `NotFittedError` otherwise. An
unfitted diagonal or full posterior is the prior (laplace-torch's contract):
it predicts, with a warning. Predictions also check that the LoRA weights are
still those the posterior was fitted on, and the batch keys the model reads.
A loaded `state_dict` counts as fitted.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from laplace_lora_backend.curvature.discovery import find_lora_weights
from laplace_lora_backend.errors import NotFittedError
from laplace_lora_backend.validation import (
    check_batch_keys,
    check_prediction_batch,
    check_same_weights,
    signature,
)

__all__ = ["FittedState"]


class FittedState:
    """Fitted / unfitted contract and `state_dict`: a mixin of `LoRALaplace`.

    Uses the host's `_is_fitted`, `_fit_signature`, `H`, `lora_weights`,
    `lora_modules`, `model`, `dict_key_x` and `_reads_dict_key_x`; must come
    before the laplace-torch class in the bases.
    """

    # laplace-torch's contract for an unfitted object: the diagonal and full
    # classes hold zero curvature, so their posterior is the prior (predictive
    # and log_prob work); KronLaplace has no factors before fit and raises.
    _unfitted_is_prior: bool = True

    def _not_fitted(self) -> NotFittedError:
        return NotFittedError(
            f"{type(self).__name__} is not fitted: call la.fit(train_loader) "
            "before predicting, sampling, computing the evidence or tuning "
            "the prior (or load a fitted state with load_state_dict)."
        )

    def _check_H_init(self) -> None:
        if self._is_fitted or (self._unfitted_is_prior and self.H is not None):
            return  # unfitted diag / full: zero curvature, the prior
        raise self._not_fitted()

    def _check_fitted(self) -> None:
        """Evidence, sampling, prior tuning and saving need a fitted posterior."""
        if not self._is_fitted:
            raise self._not_fitted()

    def _check_prediction_input(self, x: Any) -> None:
        """Before predicting: one batch, fitted (or warn), same weights, keys."""
        check_prediction_batch(x, any(m.training for m in self.model.modules()))
        if not self._is_fitted:
            if not self._unfitted_is_prior:
                raise self._not_fitted()
            warnings.warn(
                f"{type(self).__name__} is not fitted: the predictive is the "
                "prior's (as in laplace-torch). Call la.fit(train_loader) first.",
                stacklevel=3,
            )
        if self._fit_signature is not None:
            check_same_weights(
                self._fit_signature,
                lambda: signature(
                    find_lora_weights(
                        self.model, self.lora_modules, self.modules_to_save
                    )
                ),
            )
        if self._reads_dict_key_x:
            check_batch_keys(x, [self.dict_key_x])

    def log_marginal_likelihood(
        self,
        prior_precision: torch.Tensor | None = None,
        sigma_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Laplace's log marginal likelihood (see laplace-torch); needs `fit`.

        Returns
        -------
        torch.Tensor
            Scalar.
        """
        self._check_fitted()
        return super().log_marginal_likelihood(prior_precision, sigma_noise)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior samples of the LoRA weights `(n_samples, P)`; needs `fit`.

        Returns
        -------
        torch.Tensor
            `(n_samples, P)`.
        """
        self._check_fitted()
        return super().sample(n_samples, generator)

    def _mark_loaded(self) -> None:
        self._fit_signature = signature(self.lora_weights)
        self._is_fitted = True

    def state_dict(self) -> dict[str, Any]:
        """laplace-torch's state, with `likelihood` a plain string.

        A `Likelihood` enum would be pickled as a class reference, which
        ``torch.load(..., weights_only=True)`` refuses.

        Returns
        -------
        dict[str, Any]
        """
        self._check_fitted()
        state = super().state_dict()
        likelihood = state["likelihood"]
        state["likelihood"] = str(getattr(likelihood, "value", likelihood))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fitted `state_dict`; the object is then fitted."""
        super().load_state_dict(state_dict)
        self._mark_loaded()
