"""Input checks of the LoRA Laplace classes, as functions of explicit arguments.

Batch keys and targets (checked per batch while laplace-torch iterates the
loader), the LoRA weights a posterior is over (names and shapes, compared
between fit and predict), finiteness of fitted curvature, and the
constructor's likelihood and backend arguments.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from laplace.curvature import CurvatureInterface
from laplace.utils import Likelihood

from laplace_lora_backend.curvature.checks import check_targets, first_non_finite
from laplace_lora_backend.curvature.discovery import LoRAWeight
from laplace_lora_backend.curvature.lora import LoRAInterface
from laplace_lora_backend.errors import (
    BatchKeyError,
    LoRAAdaptersChangedError,
    NonFiniteError,
)

__all__ = [
    "CheckedLoader",
    "LoRAModules",
    "Signature",
    "check_batch_keys",
    "check_curvature_finite",
    "check_likelihood",
    "check_prediction_batch",
    "check_same_weights",
    "checked_batches",
    "first_difference",
    "known_empty",
    "lora_backend_kwargs",
    "signature",
]

Signature = list[tuple[str, tuple[int, ...]]]
# the `lora_modules` argument: substrings, a regex, or None for every LoRA layer
LoRAModules = str | Sequence[str] | re.Pattern | None


def signature(weights: Sequence[LoRAWeight]) -> Signature:
    """Names and shapes of LoRA weights, in order (what a posterior is over).

    Returns
    -------
    Signature
        ``[(name, shape), ...]``.
    """
    return [(w.name, tuple(w.param.shape)) for w in weights]


def first_difference(before: Signature, after: Signature) -> str | None:
    """The first weight whose shape differs (or that is absent), else None.

    Returns
    -------
    str or None
        ``"'name' (8, 64) before, None now"``; if only the order differs,
        says so; None if the signatures are equal.
    """
    if before == after:
        return None
    a, b = dict(before), dict(after)
    return next(
        (
            f"'{n}' {a.get(n)} before, {b.get(n)} now"
            for n in list(a) + list(b)
            if a.get(n) != b.get(n)
        ),
        "the order of the LoRA weights changed",
    )


def check_same_weights(fitted: Signature, now: Callable[[], Signature]) -> None:
    """Raise `LoRAAdaptersChangedError` if the model's LoRA weights changed.

    Parameters
    ----------
    fitted : Signature
        The weights at fit.
    now : callable
        Finds the model's weights now (may raise `ValueError`, e.g. no LoRA
        layer left after merging).

    Raises
    ------
    LoRAAdaptersChangedError
        If `now` raises a `ValueError`, or its weights differ from `fitted`.
    """
    try:
        current = now()
    except ValueError as err:
        raise LoRAAdaptersChangedError(
            f"The model's LoRA adapters changed since fit: {err}"
        ) from err
    diff = first_difference(fitted, current)
    if diff is not None:
        raise LoRAAdaptersChangedError(
            "The model's LoRA weights are not those the posterior was fitted on "
            f"(first difference: {diff.replace('before', 'at fit')}; None = "
            "absent). Re-activate the adapter used at fit (model.set_adapter), "
            "or call fit again."
        )


def check_batch_keys(x: Any, keys: Sequence[str]) -> None:
    """Raise `BatchKeyError` if dict batch `x` lacks one of `keys`.

    Raises
    ------
    BatchKeyError
        If `x` is a dict without one of `keys` (other batches pass).
    """
    if not isinstance(x, MutableMapping):
        return
    missing = [k for k in keys if k not in x]
    if missing:
        raise BatchKeyError(
            f"The batch dict has no key(s) {missing} (keys: {sorted(x)}). Set "
            "dict_key_x / dict_key_y when creating the Laplace object, e.g. "
            "Laplace(..., dict_key_x='input_ids', dict_key_y='labels')."
        )


def checked_batches(
    loader: Iterable,
    dict_key_y: str,
    n_outputs: Callable[[], int | None],
    likelihood: str,
) -> Iterator[Any]:
    """Iterate `loader`, checking the keys and targets of every batch.

    Yields
    ------
    Any
        The batches of `loader`; an `(dict, y)` pair becomes one dict batch
        with `y` under `dict_key_y`.

    Raises
    ------
    TypeError
        A batch that is neither an `(X, y)` pair nor a dict.
    ValueError
        Missing `dict_key_y`, or targets that do not fit the likelihood.
    """  # noqa: DOC502 (ValueError: raised by check_batch_keys, check_targets)
    for data in loader:
        if (
            isinstance(data, Sequence)
            and len(data) == 2
            and isinstance(data[0], MutableMapping)
        ):  # (dict, y) pairs: one dict batch, as laplace-torch reads dicts
            data = {**data[0], dict_key_y: data[1]}
        if isinstance(data, MutableMapping):
            check_batch_keys(data, [dict_key_y])
            y = data[dict_key_y]
        elif isinstance(data, Sequence) and len(data) == 2:
            y = data[1]
        else:
            raise TypeError(
                "The loader must yield (X, y) pairs or dict batches, got "
                f"{type(data).__name__}."
            )
        check_targets(y, n_outputs(), likelihood)
        yield data


class CheckedLoader:
    """A loader whose batches are checked as laplace-torch iterates them.

    laplace-torch reads `loader.dataset` (the data set size) and iterates the
    loader twice (one batch for the output size, then all).
    """

    def __init__(
        self,
        loader: Iterable,
        check: Callable[[Iterable], Iterator],
        dict_key_y: str = "labels",
    ):
        self.loader = loader
        self.check = check
        self.dataset = getattr(loader, "dataset", None)
        if self.dataset is None:
            self.dataset = range(_count_examples(loader, dict_key_y))

    def __iter__(self) -> Iterator[Any]:
        return self.check(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def _count_examples(loader: Iterable, dict_key_y: str) -> int:
    """Examples in a list of batches (laplace-torch reads `len(loader.dataset)`).

    Returns
    -------
    int
        The number of labels over all batches.

    Raises
    ------
    TypeError
        For a one-pass iterable without `.dataset` (it cannot be counted
        without being consumed).
    """
    if not isinstance(loader, Sequence):
        raise TypeError(
            f"train_loader ({type(loader).__name__}) has no `.dataset`: fit reads "
            "the number of training examples from len(train_loader.dataset), as "
            "laplace-torch does. Pass a torch DataLoader, or a list of batches."
        )
    n = 0
    for data in loader:
        if isinstance(data, MutableMapping):
            n += len(data[dict_key_y]) if dict_key_y in data else 0
        elif isinstance(data, Sequence) and len(data) == 2:
            n += len(data[1])
    return n


def check_curvature_finite(
    per_weight: Sequence[torch.Tensor], names: Sequence[str], loss: Any
) -> None:
    """Raise `NonFiniteError` naming the first LoRA weight with bad curvature.

    Parameters
    ----------
    per_weight : Sequence[torch.Tensor]
        One tensor per LoRA weight whose finiteness is that weight's.
    names : Sequence[str]
    loss : float or torch.Tensor

    Raises
    ------
    NonFiniteError
        If a weight's curvature or the loss is NaN or Inf.
    """
    bad = first_non_finite(list(per_weight), list(names))
    loss_ok = bool(torch.isfinite(torch.as_tensor(loss)).all())
    if bad is not None or not loss_ok:
        where = f"LoRA module '{bad.removesuffix('.weight')}'" if bad else "loss"
        raise NonFiniteError(
            f"NaN or Inf in the fitted curvature of {where}. Check the data and "
            "the model's dtype (float16 overflows: use bfloat16 or float32)."
        )


def check_likelihood(name: str, likelihood: Likelihood | str) -> None:
    """Refuse likelihoods other than classification and regression.

    Raises
    ------
    ValueError
        If `likelihood` is another one (e.g. reward modelling).
    """
    if likelihood not in (Likelihood.CLASSIFICATION, Likelihood.REGRESSION):
        raise ValueError(
            f"{name} supports likelihood='classification' or "
            f"'regression', got {likelihood!r}. For reward modelling use "
            "laplace-torch's own classes."
        )


def lora_backend_kwargs(
    backend: type[CurvatureInterface],
    backend_kwargs: dict[str, Any] | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """`backend_kwargs`, with the weight selection for a LoRA backend.

    Returns
    -------
    dict[str, Any]
        A copy; for a `LoRAInterface` backend with the `options` added: the
        weight selection (`lora_modules`, `modules_to_save`) and the
        structure's own (`LoRALaplace._lora_options`).

    Raises
    ------
    ValueError
        If `backend_kwargs` already sets one of those.
    """
    backend_kwargs = dict(backend_kwargs or {})
    if isinstance(backend, type) and issubclass(backend, LoRAInterface):
        given = set(backend_kwargs) & set(options)
        if given:
            raise ValueError(
                f"Pass {sorted(given)} to Laplace(...) directly, not in "
                "backend_kwargs: the Laplace object selects the LoRA weights "
                "and hands them to its backend."
            )
        backend_kwargs.update(options)
    return backend_kwargs


def known_empty(loader: Iterable) -> bool:
    """Whether `loader` has no batches, as far as its length tells.

    Returns
    -------
    bool
        False for loaders without ``__len__`` (checked while iterating).
    """
    try:
        return len(loader) == 0
    except TypeError:
        return False


def check_prediction_batch(x: Any, model_training: bool) -> None:
    """A predictive takes one batch; warn if the model would sample dropout.

    Parameters
    ----------
    x : Any
        What was passed to ``la(x)``.
    model_training : bool
        `model.training`.

    Raises
    ------
    TypeError
        For a list, tuple, or loader instead of one batch, saying how to
        predict over a loader.
    """
    if isinstance(x, torch.Tensor | MutableMapping) or hasattr(x, "Js"):
        pass  # a tensor, a dict batch, or a JacobianBatch
    elif isinstance(x, Iterable) and not isinstance(x, str | bytes):
        raise TypeError(
            f"la(x) predicts one batch (a tensor or a dict of tensors such as a "
            f"tokenizer's output), got a {type(x).__name__}. For a loader: "
            "torch.cat([la(batch) for batch in loader]); labels in a batch are "
            "ignored."
        )
    if model_training:
        warnings.warn(
            "The model is in training mode: dropout (e.g. LoRA dropout) is active "
            "and the predictive is stochastic. Call model.eval() (fit leaves the "
            "model in eval mode).",
            stacklevel=4,
        )
