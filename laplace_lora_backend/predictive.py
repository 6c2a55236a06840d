"""The predictives of the LoRA Laplace classes.

`LoRAPredictive` is mixed into `LoRALaplace` ahead of laplace-torch's class,
as laplace-torch's own subclasses override its predictive hooks:

- GLM: Jacobians come from the LoRA backend (`jacobian_batch`, reusable for
  any prior precision, see `laplace_lora_backend.glm`); with
  ``center_logits=True`` the probit link is applied to zero-sum logits.
- Weight sampling (``pred_type="nn"``): samples are copied into the LoRA
  weights and the MAP weights are written back bit for bit afterwards, also
  when the forward pass raises; with ``enable_backprop=True`` samples enter a
  functional call instead (the model is never modified).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from laplace.utils import Likelihood, LinkApprox, PredType

from laplace_lora_backend.glm import JacobianBatch, gaussian_samples, probit
from laplace_lora_backend.uncertainty import (
    PredictiveUncertainty,
    uncertainty_from_samples,
)

__all__ = ["LoRAPredictive"]


class LoRAPredictive:
    """Predictive methods of `LoRALaplace` (see the module docstring).

    Expects the attributes `LoRALaplace` sets: `model`, `params`,
    `lora_weights`, `center_logits`, and its checks
    `_check_prediction_input`.
    """

    def __call__(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        joint: bool = False,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ):
        """Posterior predictive (see laplace-torch); checks the batch first.

        `x` may also be a `JacobianBatch` (``la.jacobian_batch(x)``) for the
        GLM predictive. With ``center_logits=True`` (the default) the probit
        link is applied to zero-sum logits (`laplace_lora_backend.glm.probit`);
        the other links are laplace-torch's.

        Returns
        -------
        torch.Tensor or tuple[torch.Tensor, torch.Tensor]
            Classification: `(batch, C)` class probabilities. Regression: the
            mean and the predictive variance (covariance with `joint`).
        """
        self._check_prediction_input(x)
        if (
            self.center_logits
            and pred_type == PredType.GLM
            and link_approx == LinkApprox.PROBIT
            and self.likelihood == Likelihood.CLASSIFICATION
        ):
            f_mu, f_var = self._glm_predictive_distribution(x)
            return probit(f_mu, f_var, centered=True)
        return super().__call__(
            x,
            pred_type,
            joint,
            link_approx,
            n_samples,
            diagonal_output,
            generator,
            fitting,
            **model_kwargs,
        )

    def predictive_uncertainty(
        self,
        x: Any,
        pred_type: PredType | str = PredType.GLM,
        link_approx: LinkApprox | str = LinkApprox.PROBIT,
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> PredictiveUncertainty:
        """Predictive probabilities and their uncertainty, per example.

        `probs` is ``la(x, pred_type, link_approx=...)``; the logit moments,
        the expected entropy (aleatoric) and the mutual information
        (epistemic) come from `n_samples` logit samples: drawn from the GLM
        Gaussian ``N(f(x), J Sigma J^T)``, or the model's outputs under
        weights sampled from the posterior (``pred_type="nn"``). See
        `laplace_lora_backend.uncertainty`. Labels are not needed.

        Parameters
        ----------
        x : torch.Tensor or MutableMapping or JacobianBatch
            A batch (a `JacobianBatch` for the GLM predictive).
        pred_type : {'glm', 'nn'}, default='glm'
        link_approx : {'probit', 'mc', 'bridge', 'bridge_norm'}, default='probit'
            The link of `probs` (GLM).
        n_samples : int, default=100
        generator : torch.Generator, optional
            For the samples.

        Returns
        -------
        PredictiveUncertainty

        Raises
        ------
        ValueError
            For regression (no class probabilities).
        """
        if self.likelihood != Likelihood.CLASSIFICATION:
            raise ValueError(
                "predictive_uncertainty is for classification; for regression "
                "la(x) returns the predictive mean and variance."
            )
        pred_type = str(getattr(pred_type, "value", pred_type))
        if pred_type == PredType.NN:
            samples = self.functional_samples(
                x, pred_type="nn", n_samples=n_samples, generator=generator
            ).detach()
            probs = samples.softmax(-1).mean(0)
            return uncertainty_from_samples(probs, samples)
        self._check_prediction_input(x)
        if self._uses_lora_backend and not isinstance(x, JacobianBatch):
            x = self.jacobian_batch(x)  # one Jacobian pass for both uses
        mu, var = self._glm_predictive_distribution(x)
        probs = self(x, pred_type="glm", link_approx=link_approx, n_samples=n_samples)
        samples = gaussian_samples(mu, var, n_samples, generator)
        return uncertainty_from_samples(probs.detach(), samples, mu, var)

    def functional_samples(self, x: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Function-space samples (see laplace-torch); checks the batch first.

        Returns
        -------
        torch.Tensor
            `(n_samples, batch, C)`.
        """
        self._check_prediction_input(x)
        return super().functional_samples(x, *args, **kwargs)

    # ------------------------------------------------------------- GLM
    @torch.enable_grad()
    def jacobian_batch(self, X: Any) -> JacobianBatch:
        """GLM Jacobians and mean of a batch, reusable for any prior precision.

        ``la(la.jacobian_batch(x), link_approx=...)`` equals
        ``la(x, link_approx=...)``; the prior precision can change in between
        (see `laplace_lora_backend.glm`).

        If the model's outputs are a fixed linear map of fewer features
        (``model.linear_head()`` returns `(W, b)` with more rows than columns,
        e.g. many answer tokens read through a frozen `lm_head`), the
        Jacobians are taken w.r.t. the features: `hidden` instead of `C`
        vector-Jacobian products, no `(B, C, P)` tensor.

        Parameters
        ----------
        X : torch.Tensor or MutableMapping
            A batch (labels are not needed).

        Returns
        -------
        JacobianBatch
        """
        head = getattr(self.model, "linear_head", None)
        Wb = head() if callable(head) and self._uses_lora_backend else None
        if any(w.is_head for w in self.lora_weights):
            Wb = None  # a trainable head in the posterior may be that map
        if Wb is not None and Wb[0].shape[0] > Wb[0].shape[1]:
            Js, h = self.backend.jacobians(X, features=True)
            W, b = (t.detach().to(h.dtype) if t is not None else None for t in Wb)
            return JacobianBatch(Js, h, (W, b))
        Js, f = self.backend.jacobians(X, enable_backprop=self.enable_backprop)
        return JacobianBatch(Js, f)

    def _glm_predictive_distribution(
        self, X: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GLM mean and covariance of the outputs (`X` may be a `JacobianBatch`).

        Returns
        -------
        f_mu : torch.Tensor
            `(batch, C)`; `(batch * C,)` with `joint`.
        f_var : torch.Tensor
            `(batch, C, C)`, `(batch, C)` with `diagonal_output`, or
            `(batch * C, batch * C)` with `joint`.

        Raises
        ------
        ValueError
            If `joint` is requested for a `JacobianBatch` of feature Jacobians.
        """
        if not isinstance(X, JacobianBatch):
            if joint or not self._uses_lora_backend:
                return super()._glm_predictive_distribution(X, joint, diagonal_output)
            X = self.jacobian_batch(X)
        if joint:  # regression: N(f, J Sigma J^T) over all outputs of the batch
            if X.head is not None:
                raise ValueError(
                    "The joint predictive needs output Jacobians; this batch holds "
                    "feature Jacobians of a linear head."
                )
            return X.f.flatten().detach(), self.functional_covariance(X.Js).detach()
        return X.moments(self.functional_variance, diagonal_output)

    # ------------------------------------------------------ weight sampling
    @contextmanager
    def _restoring_lora_weights(self) -> Iterator[None]:
        """Snapshot the LoRA weights; write them back bit for bit on exit.

        Also on exceptions. Samples are copied in, so storages never change.
        """
        saved = [p.detach().clone() for p in self.params]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved, strict=True):
                    p.copy_(s)

    def _set_lora_weights(self, vector: torch.Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                p.copy_(vector[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def _sampled_outputs(
        self, X: Any, n_samples: int, generator=None, **model_kwargs: Any
    ) -> Iterator[torch.Tensor]:
        """Model outputs with LoRA weights drawn from the posterior.

        Yields
        ------
        torch.Tensor
            The model's `(batch, C)` outputs for one posterior sample.
        """
        X = X.to(self._device) if isinstance(X, torch.Tensor) else X
        if self.enable_backprop:
            # differentiable: each sample enters a functional call as
            # ``p + (sample - p).detach()`` (the sample's value, gradients to
            # the LoRA weights as laplace-torch gives); nothing is modified
            names = [w.name for w in self.lora_weights]
            for sample in self.sample(n_samples, generator):
                chunks = sample.split([p.numel() for p in self.params])
                weights = {
                    n: p + (c.view_as(p).to(p.dtype) - p).detach()
                    for n, c, p in zip(names, chunks, self.params, strict=True)
                }
                yield torch.func.functional_call(
                    self.model, weights, (X,), model_kwargs, strict=False
                )
            return
        with self._restoring_lora_weights(), torch.no_grad():
            for sample in self.sample(n_samples, generator):
                self._set_lora_weights(sample)
                yield self.model(X, **model_kwargs)

    def _nn_functional_samples(
        self, X: Any, n_samples: int = 100, generator=None, **model_kwargs: Any
    ) -> torch.Tensor:
        return torch.stack(
            list(self._sampled_outputs(X, n_samples, generator, **model_kwargs))
        )

    def _nn_predictive_classification(
        self, X: Any, n_samples: int = 100, **model_kwargs: Any
    ) -> torch.Tensor:
        probs = 0.0
        for logits in self._sampled_outputs(X, n_samples, **model_kwargs):
            probs = probs + torch.softmax(logits, dim=-1) / n_samples
        return probs
