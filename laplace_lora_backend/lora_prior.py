"""The prior of a LoRA Laplace object: a checked precision, and its density.

`LoRAPrior` is a mixin of `LoRALaplace`. Its `prior_precision` setter refuses
values that are not positive and finite numbers or 1-D tensors with a message
that says what the precision is, then defers to the laplace-torch structure
class's setter (shape checks), keeping the previous value if that refuses.
Before `fit`, `log_prob` is the prior's density: laplace-torch's unfitted
diagonal and full posteriors are the prior.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LoRAPrior"]


class LoRAPrior:
    """Prior precision and the unfitted `log_prob`: a mixin of `LoRALaplace`.

    Uses the host's `_is_fitted`, `prior_precision_diag`, `prior_mean` and
    `n_params`; must come before the laplace-torch class in the bases.
    A structure whose host class refuses one precision per parameter (Kron)
    sets `per_parameter_prior` to False.
    """

    per_parameter_prior: bool = True

    @property
    def prior_precision(self) -> torch.Tensor:
        """Prior precision: scalar, per LoRA weight or per parameter (> 0)."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, prior_precision: float | torch.Tensor) -> None:
        try:
            value = torch.as_tensor(prior_precision).detach()
            if value.is_complex() or value.dtype == torch.bool:
                raise TypeError
        except (TypeError, RuntimeError, ValueError):
            raise ValueError(
                "prior_precision must be a positive number or a 1-D tensor (one "
                f"value, one per LoRA weight, or one per parameter); got "
                f"{prior_precision!r} of type {type(prior_precision).__name__}."
            ) from None
        if value.numel() == 0 or not bool((value > 0).all() & value.isfinite().all()):
            raise ValueError(
                f"prior_precision must be positive and finite, got {prior_precision}"
                "; it is the inverse prior variance (e.g. 1.0, or tune it with "
                "optimize_prior_precision)."
            )
        # laplace-torch's setter of the structure class (shape checks after
        # assigning): keep the previous value if it refuses
        previous = self.__dict__.get("_prior_precision")
        try:
            super(LoRAPrior, type(self)).prior_precision.fset(self, prior_precision)
        except ValueError as err:
            if previous is not None:
                self._prior_precision = previous
            if "align" not in str(err) and "per-layer" not in str(err):
                raise
            kinds = [w.kind for w in self.lora_weights]
            heads = sum(w.is_head for w in self.lora_weights)
            per_tensor = (
                f"{self.n_layers} (one per LoRA weight tensor, lora_A and lora_B "
                f"counted apart: {kinds.count('A')} A + {kinds.count('B')} B"
                + (f" + {heads} head weights and biases" if heads else "")
                + ", in la.lora_weights order)"
            )
            if self.per_parameter_prior:
                lengths = f"{per_tensor} or {self.n_params} (one per parameter)"
            else:
                lengths = (
                    f"or {per_tensor}; one value per parameter needs "
                    'hessian_structure="diag" or "full"'
                )
            raise ValueError(
                f"prior_precision has {value.numel()} values; expected 1 (one for "
                f"all), {lengths}."
            ) from None

    def log_prob(self, value: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Log density of `value` `(P,)` under the posterior (the prior before fit).

        Returns
        -------
        torch.Tensor
            A scalar.
        """
        if self._is_fitted:
            return super().log_prob(value, normalized)
        delta = self.prior_precision_diag
        log_prob = -0.5 * (delta * (value - self.prior_mean).square()).sum()
        if normalized:
            log_prob = log_prob + 0.5 * (
                delta.log().sum() - self.n_params * math.log(2 * math.pi)
            )
        return log_prob
