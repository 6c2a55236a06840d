"""Laplace approximations over the LoRA weights of a PEFT model.

`LoRALaplace` is laplace-torch's parametric Laplace class with two
differences: the parameters are the `lora_A` / `lora_B` weights of the active
adapters, selected by module (not by `requires_grad`), and the default backend
is `LoRAGGN`. The structure classes are in `laplace_lora_backend.structures`.

The predictives live in `laplace_lora_backend.predictive` (next-token
predictives of causal LMs in `laplace_lora_backend.next_token`, ``generate``
in `laplace_lora_backend.generation`), prior tuning in
`laplace_lora_backend.prior`, the prior precision's checks in
`laplace_lora_backend.lora_prior`, the fitted / unfitted contract and
`state_dict` in `laplace_lora_backend.fitted_state`, input checks in
`laplace_lora_backend.validation`, saving in `laplace_lora_backend.serialization`
and the combination of ranks in `laplace_lora_backend.distributed`; this module
holds the constructor and `fit`.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    without_sampler_padding,
)
from laplace_lora_backend.fitted_state import FittedState
from laplace_lora_backend.generation import LaplaceGeneration
from laplace_lora_backend.hf_models import as_logits_model
from laplace_lora_backend.lora_prior import LoRAPrior
from laplace_lora_backend.next_token import NextTokenPredictive
from laplace_lora_backend.predictive import LoRAPredictive
from laplace_lora_backend.prior import PriorTuning
from laplace_lora_backend.prior_validation import PriorChoice
from laplace_lora_backend.serialization import PosteriorIO
from laplace_lora_backend.trust_region import TrustRegion
from laplace_lora_backend.validation import (
    CheckedLoader,
    LoRAModules,
    check_curvature_finite,
    check_likelihood,
    checked_batches,
    known_empty,
    lora_backend_kwargs,
)

__all__ = ["LoRALaplace"]

_EMPTY_LOADER = "train_loader is empty: fit needs at least one batch of training data."


class LoRALaplace(
    LoRAPrior,
    FittedState,
    PriorTuning,
    NextTokenPredictive,
    LaplaceGeneration,
    LoRAPredictive,
    PosteriorIO,
    ParametricLaplace,
):
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
        ``["lm_head"]`` is last-layer LoRA Laplace (LLLA); on a
        sequence-classification model ``["classifier"]`` (or ``["score"]``)
        is last-layer Laplace on its head. A trainable `nn.Linear` outside
        PEFT joins when named here.
    modules_to_save : bool or None, default=None
        Whether the heads PEFT trains in full (``modules_to_save``, e.g. the
        classifier of ``task_type="SEQ_CLS"``) join the posterior, their
        `nn.Linear` weights and biases as ordinary Kronecker / diagonal
        blocks. None: yes, with a one-line warning that names them (pass
        True to silence it); False leaves them out.
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
    trust_region : TrustRegion or None
        How ``optimize_prior_precision()`` checked the marglik prior on
        training examples (`laplace_lora_backend.trust_region`).
    trust_region_batches : list[tuple]
        The first training batches of the last `fit`, at least
        `trust_region_examples` examples (references to the loader's
        tensors, not copies, and not saved by `state_dict`).
    """

    # training examples `fit` keeps for the trust region of the prior
    trust_region_examples: int = 32

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
        modules_to_save: bool | None = None,
        process_group: Any = None,
        center_logits: bool = True,
        **structure_kwargs: Any,
    ) -> None:
        check_likelihood(type(self).__name__, likelihood)
        model = as_logits_model(model, dict_key_y)
        backend = backend or LoRAGGN
        selection = {"lora_modules": lora_modules, "modules_to_save": modules_to_save}
        backend_kwargs = lora_backend_kwargs(
            backend, backend_kwargs, {**selection, **self._lora_options()}
        )
        self.lora_weights = find_lora_weights(
            model, lora_modules, modules_to_save, warn=True
        )
        self.lora_modules = lora_modules
        self.modules_to_save = modules_to_save
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
        self.trust_region: TrustRegion | None = None
        # the first training batches (references), for the prior's trust region
        self.trust_region_batches: list[tuple[Any, torch.Tensor]] = []
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
        group = self._fit_group(override)
        train_loader = without_sampler_padding(train_loader, self.dict_key_y)
        override = override or not self._is_fitted  # the first fit: from the prior
        empty = known_empty(train_loader)
        if empty and group is None:
            raise ValueError(_EMPTY_LOADER)
        self._is_fitted = False
        self.n_outputs = None  # set by laplace-torch from the first batch
        self._n_seen = 0
        if override:
            self.trust_region_batches = []
        error: Exception | None = None
        try:
            if not empty:
                super().fit(
                    CheckedLoader(train_loader, self._checked_batches, self.dict_key_y),
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

    def _fit_group(self, override: bool) -> Any:
        """Process group of a distributed fit, after checking the setup.

        Returns
        -------
        torch.distributed.ProcessGroup or None
            None for a single-process fit.

        Raises
        ------
        ValueError
            If the backend's parameters are not the LoRA weights, or
            ``override=False`` in a distributed fit.
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
        return group

    def _checked_batches(self, loader: Iterable):
        return checked_batches(
            loader,
            self.dict_key_y,
            lambda: getattr(self, "n_outputs", None),
            self.likelihood,
        )

    def _curv_closure(self, X: Any, y: torch.Tensor, N: int) -> Any:
        kept = sum(len(b[1]) for b in self.trust_region_batches)
        if kept < self.trust_region_examples:  # references, no copy
            self.trust_region_batches.append((X, y))
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
