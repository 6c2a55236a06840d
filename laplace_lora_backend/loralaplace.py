"""Laplace approximations over the LoRA weights of a PEFT model.

Each class is laplace-torch's parametric Laplace class of the same structure,
with two differences: the parameters are the `lora_A` / `lora_B` weights of the
active adapters, selected by module (not by `requires_grad`), and the default
backend is `LoRAGGN`. Each class has its own `_key`, so importing this package
adds ``("lora", "kron")``, ``("lora", "diag")`` and ``("lora", "full")`` to
`laplace.Laplace` and leaves upstream's keys untouched.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from laplace import DiagLaplace, FullLaplace, KronLaplace
from laplace.baselaplace import ParametricLaplace
from laplace.utils import (
    Kron,
    Likelihood,
    LinkApprox,
    PredType,
    PriorStructure,
    TuningMethod,
)
from torch import distributed as dist
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_lora_backend.curvature.checks import check_targets, first_non_finite
from laplace_lora_backend.curvature.discovery import LoRAWeight, find_lora_weights
from laplace_lora_backend.curvature.lora import (
    LoRAGGN,
    LoRAInterface,
    compute_dtype,
)
from laplace_lora_backend.distributed import (
    DistributedFitError,
    RankReport,
    active_group,
    check_reports,
    gather_reports,
    reduce_factor,
    reduce_tensor,
)
from laplace_lora_backend.errors import (
    BatchKeyError,
    LoRAAdaptersChangedError,
    NonFiniteError,
    NotFittedError,
)
from laplace_lora_backend.glm import JacobianBatch, jacobian_batches, probit
from laplace_lora_backend.hf_models import as_logits_model
from laplace_lora_backend.matrix import LoRAKron
from laplace_lora_backend.prior import PriorChoice, grid_search, nll, tune_auto

__all__ = ["LoRALaplace", "LoRAKronLaplace", "LoRADiagLaplace", "LoRAFullLaplace"]

LoRAModules = str | Sequence[str] | re.Pattern | None


class LoRALaplace:
    """Mixin restricting a laplace-torch parametric class to the LoRA weights.

    Parameters
    ----------
    model : torch.nn.Module
        Model containing PEFT LoRA layers; ``model(x)`` returns
        `(batch, outputs)`.
    likelihood : {'classification', 'regression'}
    *args, **kwargs
        As for the laplace-torch class (`prior_precision`, `backend`,
        `backend_kwargs`, ...). `backend` defaults to `LoRAGGN`.
    lora_modules : str or list[str] or re.Pattern, optional
        Restrict to LoRA layers whose names match (substrings or a regex).
        ``["lm_head"]`` is last-layer LoRA Laplace (LLLA).
    center_logits : bool, default=True
        Classification: apply the probit link to zero-sum logits (the same
        predictive distribution; see `laplace_lora_backend.glm.probit`).
        ``False`` gives laplace-torch's probit, which a variance shared by all
        logits can make reorder the classes.
    process_group : torch.distributed.ProcessGroup, optional
        When `torch.distributed` is initialised, `fit` combines the curvature
        of all ranks of this group (default: the world) so that every rank
        holds the posterior of the union of their shards; see
        `laplace_lora_backend.distributed`. No effect without a process group.

    Attributes
    ----------
    lora_weights : list[LoRAWeight]
        The selected weights, in `model.named_parameters()` order; `params`
        holds their tensors.
    """

    lora_weights: list[LoRAWeight]

    def __init__(
        self,
        model,
        likelihood,
        *args: Any,
        lora_modules: LoRAModules = None,
        process_group: Any = None,
        center_logits: bool = True,
        **kwargs,
    ) -> None:
        self.process_group = process_group
        self.center_logits = bool(center_logits)
        parent_init = super().__init__  # the laplace-torch class next in the MRO
        bound = inspect.signature(parent_init).bind(model, likelihood, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        if arguments["likelihood"] not in (
            Likelihood.CLASSIFICATION,
            Likelihood.REGRESSION,
        ):
            raise ValueError(
                f"{type(self).__name__} supports likelihood='classification' or "
                f"'regression', got {arguments['likelihood']!r}. For reward "
                "modelling use laplace-torch's own classes."
            )
        # transformers / PEFT models take **batch and return ModelOutput
        model = arguments["model"] = as_logits_model(model, arguments["dict_key_y"])
        backend = arguments["backend"] or LoRAGGN
        backend_kwargs = dict(arguments["backend_kwargs"] or {})
        if lora_modules is None:
            lora_modules = backend_kwargs.get("lora_modules")
        elif backend_kwargs.get("lora_modules", lora_modules) != lora_modules:
            raise ValueError(
                "`lora_modules` is given twice with different values (argument and "
                "backend_kwargs); pass it once."
            )
        if isinstance(backend, type) and issubclass(backend, LoRAInterface):
            backend_kwargs["lora_modules"] = lora_modules
            for key, value in self._lora_backend_options().items():
                if backend_kwargs.setdefault(key, value) != value:
                    raise ValueError(
                        f"`{key}` is given twice with different values (argument "
                        "and backend_kwargs); pass it once."
                    )
        weights = find_lora_weights(model, lora_modules)

        prior_precision = arguments["prior_precision"]
        prior_mean = arguments["prior_mean"]
        arguments.update(
            backend=backend,
            backend_kwargs=backend_kwargs,
            prior_precision=1.0,
            prior_mean=0.0,
        )
        parent_init(**arguments)

        self.lora_weights = weights
        self.lora_modules = lora_modules
        self._is_fitted = False
        self._fit_signature: list[tuple[str, tuple[int, ...]]] | None = None
        self.prior_choice: PriorChoice | None = None
        self.params = [w.param for w in weights]
        self.is_subset_params = True
        self.n_params = sum(p.numel() for p in self.params)
        self.n_layers = len(self.params)
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self._init_H()
        self.mean = self.prior_mean
        if self._uses_lora_backend:
            _ = self.backend  # build it now: bad backend_kwargs fail here, not in fit

    def _lora_backend_options(self) -> dict[str, Any]:
        """Options this class adds to a LoRA backend's `backend_kwargs`."""
        return {}

    @property
    def _dtype(self) -> torch.dtype:
        """Posterior dtype: float32 for float16 / bfloat16 LoRA weights."""
        weights = getattr(self, "lora_weights", None)
        p = weights[0].param if weights else next(self.model.parameters())
        return compute_dtype(p.dtype)

    # ------------------------------------------------------------ bad input
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
        # the next class's setter (KronLaplace checks scalar / per-layer shapes,
        # after assigning): keep the previous value if it refuses
        previous = getattr(self, "_prior_precision", None)
        try:
            super(LoRALaplace, type(self)).prior_precision.fset(self, prior_precision)
        except ValueError:
            if previous is not None:
                self._prior_precision = previous
            raise

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
        if getattr(self, "_is_fitted", False):
            return
        if self._unfitted_is_prior and getattr(self, "H", None) is not None:
            return  # zero curvature: the posterior is the prior
        raise self._not_fitted()

    def _check_fitted(self) -> None:
        """Evidence, sampling, prior tuning and saving need a fitted posterior."""
        if not getattr(self, "_is_fitted", False):
            raise self._not_fitted()

    def log_marginal_likelihood(
        self,
        prior_precision: torch.Tensor | None = None,
        sigma_noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Laplace's log marginal likelihood (see laplace-torch); needs `fit`."""
        self._check_fitted()
        return super().log_marginal_likelihood(prior_precision, sigma_noise)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Posterior samples of the LoRA weights `(n_samples, P)`; needs `fit`."""
        self._check_fitted()
        return super().sample(n_samples, generator)

    def _check_predictable(self) -> None:
        """Raise (kron) or warn (diag, full: the prior) before `fit`."""
        if self._is_fitted:
            return
        if not self._unfitted_is_prior:
            raise self._not_fitted()
        warnings.warn(
            f"{type(self).__name__} is not fitted: the predictive is the prior's "
            "(as in laplace-torch). Call la.fit(train_loader) first.",
            stacklevel=3,
        )

    def log_prob(self, value: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        """Log density of `value` under the posterior (the prior before `fit`).

        Parameters
        ----------
        value : torch.Tensor
            `(P,)` LoRA weights.
        normalized : bool, default=True

        Returns
        -------
        torch.Tensor
        """
        if self._is_fitted:
            return super().log_prob(value, normalized)
        delta = self.prior_precision_diag
        diff = value - self.prior_mean
        log_prob = -0.5 * (delta * diff.square()).sum()
        if normalized:
            log_prob = log_prob + 0.5 * (
                delta.log().sum() - self.n_params * math.log(2 * math.pi)
            )
        return log_prob

    def _lora_signature(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the model's selected LoRA weights, now."""
        return _signature(find_lora_weights(self.model, self.lora_modules))

    def _check_lora_unchanged(self) -> None:
        """Raise if the LoRA weights differ from those the posterior is over."""
        if self._fit_signature is None:
            return
        try:
            now = self._lora_signature()
        except ValueError as err:  # no LoRA layer left, merged adapters, ...
            raise LoRAAdaptersChangedError(
                f"The model's LoRA adapters changed since fit: {err}"
            ) from err
        if now != self._fit_signature:
            before = dict(self._fit_signature)
            after = dict(now)
            diff = next(
                (
                    f"'{n}' {before.get(n)} at fit, {after.get(n)} now"
                    for n in list(before) + list(after)
                    if before.get(n) != after.get(n)
                ),
                "the order of the LoRA weights changed",
            )
            raise LoRAAdaptersChangedError(
                "The model's LoRA weights are not those the posterior was fitted on "
                f"(first difference: {diff}; None = absent). Re-activate the "
                "adapter used at fit (model.set_adapter), or call fit again."
            )

    def _check_batch_keys(self, x: Any, need_x: bool) -> None:
        """`dict_key_y` in fit; `dict_key_x` when predicting (if the model reads it).

        Models are called with the whole dict, so `dict_key_x` is only
        required when predicting with a model that reads it: a transformers /
        PEFT model or an `AnswerTokenClassifier` (``input_ids``).
        """
        if not isinstance(x, MutableMapping):
            return
        keys = [self.dict_key_x] if need_x else [self.dict_key_y]
        missing = [k for k in keys if k not in x]
        if missing:
            raise BatchKeyError(
                f"The batch dict has no key(s) {missing} (keys: {sorted(x)}). Set "
                "dict_key_x / dict_key_y when creating the Laplace object, e.g. "
                "Laplace(..., dict_key_x='input_ids', dict_key_y='labels')."
            )

    def _checked_batches(self, loader: Iterable) -> Iterator[Any]:
        """Iterate `loader`, checking keys and targets of every batch."""
        for data in loader:
            if isinstance(data, MutableMapping):
                self._check_batch_keys(data, need_x=False)
                y = data[self.dict_key_y]
            elif isinstance(data, Sequence) and len(data) == 2:
                y = data[1]
            else:
                raise TypeError(
                    "The loader must yield (X, y) pairs or dict batches, got "
                    f"{type(data).__name__}."
                )
            check_targets(y, getattr(self, "n_outputs", None), self.likelihood)
            yield data

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
        """
        self._check_predictable()
        self._check_lora_unchanged()
        self._check_batch_keys(x, need_x=self._reads_dict_key_x)
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

    def functional_samples(self, x, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Function-space samples (see laplace-torch); checks the batch first."""
        self._check_predictable()
        self._check_lora_unchanged()
        self._check_batch_keys(x, need_x=self._reads_dict_key_x)
        return super().functional_samples(x, *args, **kwargs)

    @property
    def _reads_dict_key_x(self) -> bool:
        """Whether the model needs `dict_key_x` in a dict batch."""
        from laplace_lora_backend.hf_models import HFLogitsModel
        from laplace_lora_backend.llm.answer_tokens import AnswerTokenClassifier

        return isinstance(self.model, HFLogitsModel | AnswerTokenClassifier)

    def _init_H(self) -> None:
        if getattr(self, "lora_weights", None) is None:
            # Called by laplace-torch's __init__ before the LoRA weights are
            # selected: its own init would allocate curvature for every
            # parameter that requires grad (a d x d zero factor per wide LoRA
            # weight, or P x P for a full model). Deferred to our __init__.
            self.H = None
            return
        super()._init_H()

    @property
    def _uses_lora_backend(self) -> bool:
        return issubclass(self._backend_cls, LoRAInterface)

    # ------------------------------------------------------------ GLM predictive
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
        if Wb is not None and Wb[0].shape[0] > Wb[0].shape[1]:
            Js, h = self.backend.jacobians(X, features=True)
            W, b = (t.detach().to(h.dtype) if t is not None else None for t in Wb)
            return JacobianBatch(Js, h, (W, b))
        Js, f = self.backend.jacobians(X, enable_backprop=self.enable_backprop)
        return JacobianBatch(Js, f)

    def _glm_predictive_distribution(self, X, joint=False, diagonal_output=False):
        """GLM mean and covariance of the outputs (`X` may be a `JacobianBatch`)."""
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

    # ------------------------------------------------------- prior precision
    def optimize_prior_precision(
        self,
        pred_type: PredType | str = PredType.GLM,
        method: TuningMethod | str = TuningMethod.MARGLIK,
        n_steps: int = 100,
        lr: float = 1e-1,
        init_prior_prec: float | torch.Tensor = 1.0,
        prior_structure: PriorStructure | str = PriorStructure.SCALAR,
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
    ) -> None:
        """Tune the prior precision (laplace-torch's arguments, plus ``"auto"``).

        ``method="marglik"`` is laplace-torch's. ``method="gridsearch"`` with
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
        pred_type, method, n_steps, lr, init_prior_prec, prior_structure
            See `laplace.ParametricLaplace.optimize_prior_precision`; `method`
            also takes ``"auto"``.
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
        if method == "marglik" or (method == "gridsearch" and not cached):
            self.prior_choice = None
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
        scales = torch.logspace(
            log_prior_prec_min, log_prior_prec_max, grid_size, base=log_prior_prec_base
        )
        if method == "gridsearch":
            best, _ = grid_search(
                self, batches, list(scales), loss, link_approx, n_samples
            )
            self.prior_precision = scales[best]
            self.prior_choice = None
        else:

            def marglik() -> None:
                LoRALaplace.optimize_prior_precision(
                    self,
                    pred_type,
                    "marglik",
                    n_steps,
                    lr,
                    init_prior_prec,
                    prior_structure,
                    progress_bar=progress_bar,
                )

            self.prior_choice = tune_auto(
                self, batches, marglik, scales.tolist(), loss, link_approx, n_samples
            )
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")

    # ------------------------------------------------ weight-sampling predictive
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
        self, X, n_samples: int, generator=None, **model_kwargs
    ) -> Iterator[torch.Tensor]:
        """Model outputs with LoRA weights drawn from the posterior."""
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

    def _nn_functional_samples(self, X, n_samples=100, generator=None, **model_kwargs):
        return torch.stack(
            list(self._sampled_outputs(X, n_samples, generator, **model_kwargs))
        )

    def _nn_predictive_classification(self, X, n_samples=100, **model_kwargs):
        probs = 0.0
        for logits in self._sampled_outputs(X, n_samples, **model_kwargs):
            probs = probs + torch.softmax(logits, dim=-1) / n_samples
        return probs

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
    ) -> None:
        """Fit the Laplace approximation over the LoRA weights.

        Parameters
        ----------
        train_loader : torch.utils.data.DataLoader
            Batches of `(X, y)` tensors or dicts with `dict_key_x` and
            `dict_key_y`; `train_loader.dataset` gives the data set size.
        override : bool, default=True
        progress_bar : bool, default=False


        Raises
        ------
        ValueError
            An empty loader, batches without `dict_key_x` / `dict_key_y`,
            labels outside `[0, C)`, NaN / Inf (`NonFiniteError`, naming the
            first LoRA module). After an error the object is not fitted and a
            new `fit` starts from scratch.
        """
        backend_ids = [id(p) for p in self.backend.params]
        if backend_ids != [id(p) for p in self.params]:
            raise ValueError(
                f"Backend {type(self.backend).__name__} computes curvature for the "
                "parameters that require grad, which are not exactly the LoRA "
                "weights selected here. Use a LoRA backend (LoRAGGN, LoRAEF) or "
                "freeze every non-LoRA parameter (model.requires_grad_(False), then "
                "enable the LoRA weights)."
            )
        group = active_group(self.process_group)
        if not override and group is not None:
            raise ValueError(
                "fit(override=False) continues a previous single-process fit; a "
                "distributed fit always starts from scratch. Call fit(train_loader)."
            )
        if not override and not self._is_fitted:
            override = True  # laplace-torch: the first fit starts from the prior
        try:
            empty = len(train_loader) == 0
        except TypeError:  # loaders without __len__ are checked while iterating
            empty = False
        if empty and group is None:
            raise ValueError(_EMPTY_LOADER)
        self._is_fitted = False
        self.n_outputs = None  # set by laplace-torch from the first batch
        self._n_seen = 0
        error: Exception | None = None
        try:
            if not empty:
                loader = _CheckedLoader(train_loader, self._checked_batches)
                super().fit(loader, override=override, progress_bar=progress_bar)
                self._check_factors_finite()
        except StopIteration as err:  # laplace-torch's next(iter(train_loader))
            if group is None:
                raise ValueError(_EMPTY_LOADER) from err
            empty = True
        except Exception as err:
            if group is None:
                raise
            error = err  # reported to every rank before anyone raises
        if group is not None:
            self._combine_ranks(group, train_loader, empty, error)
        self.mean = self.mean.to(self._dtype)
        self._mark_loaded()

    def _curv_closure(self, X: Any, y: torch.Tensor, N: int) -> Any:
        self._n_seen += len(y)
        return super()._curv_closure(X, y, N)

    # ------------------------------------------------------ torch.distributed
    def _combine_ranks(
        self, group: Any, loader: Any, empty: bool, error: Exception | None
    ) -> None:
        """Sum the ranks' curvature so every rank holds the union's posterior.

        See `laplace_lora_backend.distributed`; raises the same error on every
        rank if one failed or the ranks' LoRA weights differ.
        """
        rank = dist.get_rank(group)
        with torch.no_grad():
            theta = parameters_to_vector(self.params).double()
        try:
            n_declared = len(loader.dataset)
        except (AttributeError, TypeError):
            n_declared = self._n_seen
        report = RankReport(
            rank=rank,
            signature=_signature(self.lora_weights),
            checksum=(float(theta.sum()), float(theta.square().sum())),
            n_seen=0 if empty or error else self._n_seen,
            n_declared=n_declared,
            n_outputs=None if empty or error else self.n_outputs,
            error=None if error is None else f"{type(error).__name__}: {error}",
        )
        reports = gather_reports(report, group)
        try:
            check_reports(reports, rank)
        except DistributedFitError as err:
            raise err from error
        if empty:
            self._init_empty_fit(next(r.n_outputs for r in reports if r.n_outputs))
        n_total = sum(r.n_seen for r in reports)
        scale = n_declared / n_total  # input factors were divided by n_declared
        H_facs = getattr(self, "H_facs", None)
        if H_facs is not None:  # Kronecker: [F_out (sum), F_in (mean over N)]
            blocks = []
            for b in H_facs.kfacs:
                scales = (1.0, scale) if len(b) == 2 else (1.0,)  # bias: (F_out,)
                blocks.append(
                    [reduce_factor(F, c, group) for F, c in zip(b, scales, strict=True)]
                )
            self.H_facs = type(H_facs)(blocks)
            self.H = self.H_facs.decompose(damping=self.damping)
        else:
            self.H = reduce_tensor(self.H, group)
        loss = torch.as_tensor(self.loss, dtype=self._dtype, device=self._device)
        self.loss = reduce_tensor(loss, group)
        self.n_data = n_total

    def _init_empty_fit(self, n_outputs: int) -> None:
        """State of a rank whose shard is empty: zero curvature and loss."""
        self.n_outputs = n_outputs
        self.model.output_size = n_outputs
        self.model.eval()  # as laplace-torch's fit does on the other ranks
        if hasattr(self, "_posterior_scale"):
            self._posterior_scale = None
        self._init_H()
        if isinstance(self, KronLaplace):
            self.H_facs = self.H
        self.loss = 0.0
        self.n_data = 0
        with torch.no_grad():
            self.mean = parameters_to_vector(self.params).detach()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a fitted `state_dict`; the object is then fitted."""
        super().load_state_dict(state_dict)
        self._mark_loaded()

    def _mark_loaded(self) -> None:
        self._fit_signature = _signature(self.lora_weights)
        self._is_fitted = True

    def _check_factors_finite(self) -> None:
        """Raise `NonFiniteError` naming the first LoRA weight with a bad factor."""
        H = getattr(self, "H_facs", None)
        H = self.H if H is None else H
        names = [w.name for w in self.lora_weights]
        if isinstance(H, Kron):
            per_weight = [
                torch.stack([_as_dense_sum(F) for F in _factors(block)])
                for block in H.kfacs
            ]
            bad = first_non_finite(per_weight, names)
        else:  # diagonal (P,) or full (P, P): the rows of each weight
            rows = H.split([p.numel() for p in self.params])
            bad = first_non_finite(list(rows), names)
        loss_ok = bool(torch.isfinite(torch.as_tensor(self.loss)).all())
        if bad is not None or not loss_ok:
            self._is_fitted = False
            where = f"LoRA module '{bad.removesuffix('.weight')}'" if bad else "loss"
            raise NonFiniteError(
                f"NaN or Inf in the fitted curvature of {where}. Check the data and "
                "the model's dtype (float16 overflows: use bfloat16 or float32)."
            )

    # ------------------------------------------------------------- save / load
    def state_dict(self) -> dict[str, Any]:
        """laplace-torch's state, with `likelihood` a plain string.

        A `Likelihood` enum would be pickled as a class reference, which
        ``torch.load(..., weights_only=True)`` refuses.
        """
        self._check_fitted()
        state = super().state_dict()
        likelihood = state["likelihood"]
        state["likelihood"] = str(getattr(likelihood, "value", likelihood))
        return state

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the posterior into `directory`, e.g. beside a PEFT adapter.

        Writes ``laplace_posterior.safetensors`` and ``laplace_posterior.json``
        (see `laplace_lora_backend.serialization.save_posterior`); other files
        (``adapter_model.safetensors``, ``adapter_config.json``) are untouched.
        """
        from laplace_lora_backend.serialization import save_posterior

        save_posterior(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, model: torch.nn.Module, **kwargs: Any
    ) -> LoRALaplace:
        """Load a posterior saved by `save_pretrained` onto `model`.

        Parameters
        ----------
        directory : str or os.PathLike
        model : torch.nn.Module
            Model with the adapter the posterior was fitted with.
        **kwargs
            Override saved constructor settings (`backend`, ...); see
            `laplace_lora_backend.serialization.load_posterior`.

        Returns
        -------
        LoRALaplace

        Raises
        ------
        ValueError
            If the saved posterior has another structure than `cls`, or the
            model's LoRA weight names / shapes differ (the first is named).
        """
        from laplace_lora_backend.serialization import (
            load_posterior,
            read_posterior_config,
        )

        saved = read_posterior_config(directory)
        key = getattr(cls, "_key", None)
        if key is not None and tuple(saved["key"]) != tuple(key):
            raise ValueError(
                f"'{directory}' holds a {saved['class']} posterior "
                f"(hessian_structure={saved['key'][1]!r}), not a {cls.__name__}. "
                f"Use {saved['class']}.from_pretrained or LoRALaplace.from_pretrained."
            )
        return load_posterior(directory, model, **kwargs)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y.reshape(out.shape)).square().mean()


_EMPTY_LOADER = "train_loader is empty: fit needs at least one batch of training data."


def _signature(weights: Sequence[LoRAWeight]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of LoRA weights, in order (what a posterior is over)."""
    return [(w.name, tuple(w.param.shape)) for w in weights]


def _factors(block: Any) -> list[Any]:
    return list(block) if isinstance(block, (list, tuple)) else [block]


def _as_dense_sum(F: Any) -> torch.Tensor:
    """A scalar whose finiteness is that of factor `F` (dense or low-rank)."""
    if isinstance(F, torch.Tensor):
        return F.sum()
    state = F.to_state()
    return sum(v.sum() for v in state.values() if isinstance(v, torch.Tensor))


class _CheckedLoader:
    """A loader whose batches are checked as laplace-torch iterates them.

    laplace-torch reads `loader.dataset` (the data set size) and iterates the
    loader twice (one batch for the output size, then all).
    """

    def __init__(self, loader: Iterable, check) -> None:
        self.loader = loader
        self.check = check
        self.dataset = loader.dataset

    def __iter__(self) -> Iterator[Any]:
        return self.check(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


class LoRAKronLaplace(LoRALaplace, KronLaplace):
    """K-FAC Laplace over the LoRA weights (`laplace.KronLaplace` semantics).

    Wide Kronecker factors (the input factor of `lora_A`, the output factor of
    `lora_B` on a wide projection) are kept as streaming low-rank-plus-
    isotropic factors (`LowRankFactor`); see `LoRAKron` / `LoRAKronDecomposed`.

    Parameters
    ----------
    model, likelihood, *args, lora_modules, **kwargs
        See `LoRALaplace` and `laplace.KronLaplace`.
    lowrank_threshold : int or None, default=512
        Factors whose side is `>=` this are low-rank; `None`: all dense.
    lowrank_rank : int, default=16
        Rank `k` kept for each low-rank factor.
    lowrank_residual : {'trace', 'none'}, default='trace'
        Keep the spectrum truncation discards as ``c I`` (trace-preserving) or
        drop it (its directions then fall back to the prior).
    """

    # key to map to this class in laplace.Laplace: (subset_of_weights, structure)
    _key = ("lora", "kron")
    _unfitted_is_prior = False  # as KronLaplace: no factors before fit

    def __init__(
        self,
        model,
        likelihood,
        *args: Any,
        lowrank_threshold: int | None = 512,
        lowrank_rank: int = 16,
        lowrank_residual: str = "trace",
        **kwargs: Any,
    ) -> None:
        self._lowrank_options = {
            "lowrank_threshold": lowrank_threshold,
            "lowrank_rank": lowrank_rank,
            "lowrank_residual": lowrank_residual,
        }
        super().__init__(model, likelihood, *args, **kwargs)

    def _lora_backend_options(self) -> dict[str, Any]:
        return dict(self._lowrank_options)

    def _init_H(self) -> None:
        if getattr(self, "lora_weights", None) is not None and self._uses_lora_backend:
            self.H = self.backend.init_kron()
        else:  # deferred during laplace-torch's __init__; non-LoRA backends
            super()._init_H()

    def state_dict(self) -> dict[str, Any]:
        """State with low-rank factors stored as plain tensors and numbers."""
        state = super().state_dict()
        if isinstance(self.H_facs, LoRAKron):
            state["H"] = self.H_facs.to_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a `state_dict` (dense or low-rank factors)."""
        ParametricLaplace.load_state_dict(self, state_dict)
        if self._uses_lora_backend:
            self.H_facs = LoRAKron.from_state(state_dict["H"])
        else:
            self.H_facs = Kron(state_dict["H"])
        self.H = self.H_facs.decompose(damping=self.damping)
        self._mark_loaded()


class LoRADiagLaplace(LoRALaplace, DiagLaplace):
    """Diagonal Laplace over the LoRA weights (`laplace.DiagLaplace` semantics)."""

    # key to map to this class in laplace.Laplace: (subset_of_weights, structure)
    _key = ("lora", "diag")


class LoRAFullLaplace(LoRALaplace, FullLaplace):
    """Full-covariance Laplace over the LoRA weights (small adapters only)."""

    # key to map to this class in laplace.Laplace: (subset_of_weights, structure)
    _key = ("lora", "full")
