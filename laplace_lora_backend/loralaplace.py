"""Laplace approximations over the LoRA weights of a PEFT model.

`LoRALaplace` is laplace-torch's parametric Laplace class with two
differences: the parameters are the `lora_A` / `lora_B` weights of the active
adapters, selected by module (not by `requires_grad`), and the default backend
is `LoRAGGN`. The structure classes are in `laplace_lora_backend.structures`.

The predictives live in `laplace_lora_backend.predictive`, prior tuning in
`laplace_lora_backend.prior`, input checks in `laplace_lora_backend.validation`,
saving in `laplace_lora_backend.serialization` and the combination of ranks in
`laplace_lora_backend.distributed`; this module holds the constructor, the
fitted state and `fit`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from laplace import ParametricLaplace
from laplace.curvature import CurvatureInterface
from laplace.utils import Likelihood
from torch.nn.utils import parameters_to_vector

from laplace_lora_backend.curvature.discovery import find_lora_weights
from laplace_lora_backend.curvature.lora import LoRAGGN, LoRAInterface, compute_dtype
from laplace_lora_backend.distributed import (
    active_group,
    combine_ranks,
    reduce_tensor,
)
from laplace_lora_backend.errors import NotFittedError
from laplace_lora_backend.hf_models import as_logits_model
from laplace_lora_backend.predictive import LoRAPredictive
from laplace_lora_backend.prior import PriorChoice, PriorTuning
from laplace_lora_backend.serialization import PosteriorIO
from laplace_lora_backend.validation import (
    CheckedLoader,
    check_batch_keys,
    check_curvature_finite,
    check_same_weights,
    checked_batches,
    signature,
)

__all__ = ["LoRALaplace"]

LoRAModules = str | Sequence[str] | re.Pattern | None
_EMPTY_LOADER = "train_loader is empty: fit needs at least one batch of training data."


class LoRALaplace(PriorTuning, LoRAPredictive, PosteriorIO, ParametricLaplace):
    """Base of the LoRA Laplace classes: laplace-torch's, over the LoRA weights.

    Parameters
    ----------
    model : torch.nn.Module
        Model containing PEFT LoRA layers; ``model(x)`` returns
        `(batch, outputs)`. transformers / PEFT models are called as
        ``model(**batch).logits`` (`HFLogitsModel`).
    likelihood : {'classification', 'regression'}
    sigma_noise, prior_precision, prior_mean, temperature, enable_backprop
        As in laplace-torch. `prior_precision`: scalar, one per LoRA weight
        tensor, or one per parameter.
    dict_key_x, dict_key_y : str
        Keys of dict batches.
    backend : type, default=LoRAGGN
        A LoRA backend (`LoRAGGN`, `LoRAEF`), or a laplace-torch backend when
        the LoRA weights are the only weights that require grad.
    backend_kwargs, asdl_fisher_kwargs : dict, optional
    lora_modules : str or list[str] or re.Pattern, optional
        Restrict to LoRA layers whose names match (substrings or a regex).
        ``["lm_head"]`` is last-layer LoRA Laplace (LLLA).
    process_group : torch.distributed.ProcessGroup, optional
        When `torch.distributed` is initialised, `fit` combines the curvature
        of all ranks of this group (default: the world); see
        `laplace_lora_backend.distributed`.
    center_logits : bool, default=True
        Classification: apply the probit link to zero-sum logits (the same
        predictive distribution; see `laplace_lora_backend.glm.probit`).
        ``False`` gives laplace-torch's probit.
    **structure_kwargs
        Passed to the structure's laplace-torch class (``damping``).

    Attributes
    ----------
    lora_weights : list[LoRAWeight]
        The selected weights, in `model.named_parameters()` order; `params`
        holds their tensors.
    prior_choice : PriorChoice or None
        What ``optimize_prior_precision(method="auto")`` chose.
    """

    # laplace-torch's contract for an unfitted object: the diagonal and full
    # classes hold zero curvature, so their posterior is the prior (predictive
    # and log_prob work); KronLaplace has no factors before fit and raises.
    _unfitted_is_prior: bool = True

    def __init__(
        self,
        model: torch.nn.Module,
        likelihood: Likelihood | str,
        sigma_noise: float | torch.Tensor = 1.0,
        prior_precision: float | torch.Tensor = 1.0,
        prior_mean: float | torch.Tensor = 0.0,
        temperature: float = 1.0,
        enable_backprop: bool = False,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        backend: type[CurvatureInterface] | None = None,
        backend_kwargs: dict[str, Any] | None = None,
        asdl_fisher_kwargs: dict[str, Any] | None = None,
        *,
        lora_modules: LoRAModules = None,
        process_group: Any = None,
        center_logits: bool = True,
        **structure_kwargs: Any,
    ) -> None:
        if likelihood not in (Likelihood.CLASSIFICATION, Likelihood.REGRESSION):
            raise ValueError(
                f"{type(self).__name__} supports likelihood='classification' or "
                f"'regression', got {likelihood!r}. For reward modelling use "
                "laplace-torch's own classes."
            )
        model = as_logits_model(model, dict_key_y)
        backend = backend or LoRAGGN
        backend_kwargs = dict(backend_kwargs or {})
        if isinstance(backend, type) and issubclass(backend, LoRAInterface):
            given = set(backend_kwargs) & {"lora_modules", *self._lora_options()}
            if given:
                raise ValueError(
                    f"Pass {sorted(given)} to Laplace(...) directly, not in "
                    "backend_kwargs: the Laplace object selects the LoRA weights "
                    "and hands them to its backend."
                )
            backend_kwargs.update(lora_modules=lora_modules, **self._lora_options())
        self.lora_weights = find_lora_weights(model, lora_modules)
        self.lora_modules = lora_modules
        self.process_group = process_group
        self.center_logits = bool(center_logits)
        self.H = None  # laplace-torch's __init__ then leaves _init_H to us
        if asdl_fisher_kwargs is not None:  # FullLaplace does not take it
            structure_kwargs["asdl_fisher_kwargs"] = asdl_fisher_kwargs
        super().__init__(
            model,
            likelihood,
            sigma_noise=sigma_noise,
            prior_precision=1.0,
            prior_mean=0.0,
            temperature=temperature,
            enable_backprop=enable_backprop,
            dict_key_x=dict_key_x,
            dict_key_y=dict_key_y,
            backend=backend,
            backend_kwargs=backend_kwargs,
            **structure_kwargs,
        )
        self._is_fitted = False
        self._fit_signature: list[tuple[str, tuple[int, ...]]] | None = None
        self.prior_choice: PriorChoice | None = None
        self.params = [w.param for w in self.lora_weights]
        self.is_subset_params = True
        self.n_params = sum(p.numel() for p in self.params)
        self.n_layers = len(self.params)
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self._init_H()
        self.mean = self.prior_mean
        if self._uses_lora_backend:
            _ = self.backend  # build it now: bad backend_kwargs fail here, not in fit

    def _lora_options(self) -> dict[str, Any]:
        """Options of this structure that its LoRA backend takes.

        Returns
        -------
        dict[str, Any]
            Empty here; structures with backend options override it.
        """
        return {}

    @property
    def _uses_lora_backend(self) -> bool:
        return issubclass(self._backend_cls, LoRAInterface)

    @property
    def _dtype(self) -> torch.dtype:
        """Posterior dtype: float32 for float16 / bfloat16 LoRA weights."""
        return compute_dtype(self.lora_weights[0].param.dtype)

    @property
    def _reads_dict_key_x(self) -> bool:
        """Whether the model needs `dict_key_x` in a dict batch."""
        return bool(getattr(self.model, "reads_dict_key_x", False))

    # ---------------------------------------------------------- prior
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
            super(LoRALaplace, type(self)).prior_precision.fset(self, prior_precision)
        except ValueError:
            if previous is not None:
                self._prior_precision = previous
            raise

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

    # ---------------------------------------------------------- fitted state
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
        """Before predicting: fitted (or warn), same LoRA weights, batch keys."""
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
                lambda: signature(find_lora_weights(self.model, self.lora_modules)),
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

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        train_loader: Iterable,
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
            ``False`` adds this data's curvature to the previous fit's (the
            first fit starts from the prior, as in laplace-torch).
        progress_bar : bool, default=False

        Raises
        ------
        ValueError
            An empty loader, batches without `dict_key_y` (`BatchKeyError`,
            also a `KeyError`), labels outside `[0, C)`, NaN / Inf
            (`NonFiniteError`, naming the first LoRA module). After an error
            the object is not fitted and a new `fit` starts from scratch.
        """
        if [id(p) for p in self.backend.params] != [id(p) for p in self.params]:
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
        override = override or not self._is_fitted  # the first fit: from the prior
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
                super().fit(
                    CheckedLoader(train_loader, self._checked_batches),
                    override=override,
                    progress_bar=progress_bar,
                )
                check_curvature_finite(
                    self._curvature_per_weight(),
                    [w.name for w in self.lora_weights],
                    self.loss,
                )
        except StopIteration as err:  # laplace-torch's next(iter(train_loader))
            if group is None:
                raise ValueError(_EMPTY_LOADER) from err
            empty = True
        except Exception as err:
            if group is None:
                raise
            error = err  # reported to every rank before anyone raises
        if group is not None:
            combine_ranks(self, group, train_loader, empty, error)
        self.mean = self.mean.to(self._dtype)
        self._mark_loaded()

    def _checked_batches(self, loader: Iterable):
        return checked_batches(
            loader,
            self.dict_key_y,
            lambda: getattr(self, "n_outputs", None),
            self.likelihood,
        )

    def _curv_closure(self, X: Any, y: torch.Tensor, N: int) -> Any:
        self._n_seen += len(y)
        return super()._curv_closure(X, y, N)

    # ------------------------------------------ structure hooks (overridden)
    def _curvature_per_weight(self) -> list[torch.Tensor]:
        """The fitted curvature of each LoRA weight (diag: entries, full: rows).

        Returns
        -------
        list[torch.Tensor]
            One per LoRA weight: its slice of `H` along the first dimension.
        """
        return list(self.H.split([p.numel() for p in self.params]))

    def _reduce_curvature(self, group: Any, input_scale: float) -> None:
        """Sum the curvature over the ranks of `group` (distributed fit)."""
        self.H = reduce_tensor(self.H, group)

    def _init_empty_fit(self, n_outputs: int) -> None:
        """State of a rank whose shard is empty: zero curvature and loss."""
        self.n_outputs = n_outputs
        self.model.output_size = n_outputs
        self.model.eval()  # as laplace-torch's fit does on the other ranks
        self._posterior_scale = None
        self._init_H()
        self.loss = 0.0
        self.n_data = 0
        with torch.no_grad():
            self.mean = parameters_to_vector(self.params).detach()

    # ------------------------------------------------------------ save / load
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

    def constructor_settings(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this object (saved with the posterior).

        Returns
        -------
        dict[str, Any]
            Constructor keyword arguments; the `backend_kwargs` without those
            the constructor derives from the other settings.
        """
        backend_kwargs = dict(self._backend_kwargs)
        if self._uses_lora_backend:  # set by the constructor from the below
            for key in ("lora_modules", *self._lora_options()):
                backend_kwargs.pop(key, None)
        return {
            "temperature": self.temperature,
            "enable_backprop": self.enable_backprop,
            "dict_key_x": self.dict_key_x,
            "dict_key_y": self.dict_key_y,
            "center_logits": self.center_logits,
            "lora_modules": self.lora_modules,
            **self._lora_options(),
            "backend": self._backend_cls,
            "backend_kwargs": backend_kwargs,
            "asdl_fisher_kwargs": self._asdl_fisher_kwargs,
        }
