"""Input checks of the curvature backend: targets and finite values.

Bad input must fail with a message that names the problem and the fix, not
with a deep traceback from torch and never with silently wrong numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from laplace.utils import Likelihood

from laplace_lora_backend.curvature.token_loss import IGNORE_INDEX
from laplace_lora_backend.errors import NonFiniteError

__all__ = ["check_targets", "check_finite", "first_non_finite"]


def check_targets(y: torch.Tensor, n_outputs: int | None, likelihood: str) -> None:
    """Targets of one batch against the model's number of outputs.

    Parameters
    ----------
    y : torch.Tensor
        Class indices `(batch,)`, next-token ids `(batch, tokens)` (-100
        where none) or class probabilities `(batch, C)` (classification), or
        `(batch, C)` targets (regression).
    n_outputs : int or None
        `C`; `None` skips the range check.
    likelihood : {'classification', 'regression'}

    Raises
    ------
    TypeError
        `y` is not a tensor, or class indices are not integers.
    ValueError
        Class indices outside `[0, C)`, or shapes that do not match.
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"Targets must be a torch.Tensor, got {type(y).__name__}; convert them "
            "with torch.as_tensor (class indices as int64)."
        )
    if likelihood == Likelihood.REGRESSION:
        if n_outputs is not None and (y.ndim != 2 or y.shape[1] != n_outputs):
            raise ValueError(
                f"Regression targets must be (batch, {n_outputs}) like the model "
                f"outputs, got {tuple(y.shape)}; reshape them, e.g. y[:, None]."
            )
        return
    if y.is_floating_point():
        if y.ndim == 2 and (n_outputs is None or y.shape[1] == n_outputs):
            return  # class probabilities (soft labels)
        raise TypeError(
            f"Classification targets must be int64 class indices (batch,), got "
            f"{y.dtype} of shape {tuple(y.shape)}; use y.long()."
        )
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(
            f"Classification targets must be int64 class indices, got {y.dtype}."
        )
    if y.ndim not in (1, 2):
        raise ValueError(
            f"Classification targets must be class indices of shape (batch,), or "
            f"(batch, tokens) next-token ids, got {tuple(y.shape)}."
        )
    if y.ndim == 2:  # next-token ids: IGNORE_INDEX (-100) where there is none
        y = y[y != IGNORE_INDEX]
    if n_outputs is None or y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= n_outputs:
        raise ValueError(
            f"Class labels must lie in [0, {n_outputs}) for a model with "
            f"{n_outputs} outputs, got labels in [{lo}, {hi}]. Map the labels to "
            "0..C-1 (and check that the model returns one logit per class)."
        )


def first_non_finite(
    tensors: Sequence[torch.Tensor | None], names: Sequence[str]
) -> str | None:
    """Name of the first tensor holding NaN or Inf, or None.

    Returns
    -------
    str or None
        The entry of `names` of the first such tensor (None entries of
        `tensors` are skipped); None if all are finite.
    """
    for t, name in zip(tensors, names, strict=True):
        if t is not None and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(
    tensors: Sequence[torch.Tensor | None], names: Sequence[str], what: str
) -> None:
    """Raise `NonFiniteError` naming the first tensor with NaN or Inf.

    Parameters
    ----------
    tensors : Sequence[torch.Tensor or None]
        One per LoRA weight (None: skipped).
    names : Sequence[str]
        The LoRA weights' parameter names.
    what : str
        What the tensors are ("inputs", "output gradients", ...).

    Raises
    ------
    NonFiniteError
        If a tensor holds NaN or Inf.
    """
    name = first_non_finite(tensors, names)
    if name is not None:
        raise NonFiniteError(
            f"NaN or Inf in the {what} of LoRA module '{name.removesuffix('.weight')}'"
            " (the first such module). Check the batch (padding, token ids), "
            "the model's dtype (float16 overflows: use bfloat16 or float32) and "
            "that the model gives finite outputs on it."
        )
