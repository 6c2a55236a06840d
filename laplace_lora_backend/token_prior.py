"""``"gridsearch"`` / ``"auto"`` prior tuning of a causal LM on held-out text.

The classifier's tuning (`laplace_lora_backend.prior_validation`) with the
loss of each candidate prior precision replaced by the token NLL of the
next-token predictive (`TokenValidation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from laplace_lora_backend.prior_validation import grid_search, tune_auto
from laplace_lora_backend.token_validation import TokenValidation, is_token_batch

__all__ = ["is_token_loader", "tune_on_tokens"]


def is_token_loader(val_loader: Iterable | None, dict_key_y: str) -> bool:
    """Whether the first batch of `val_loader` holds next-token labels.

    Returns
    -------
    bool
    """
    if val_loader is None:
        return False
    first = next(iter(val_loader), None)
    return first is not None and is_token_batch(first, dict_key_y)


def tune_on_tokens(
    la: Any,
    method: str,
    val_loader: Iterable,
    predictive: tuple[Any, int],
    marglik: Callable[[], None],
    scales: torch.Tensor,
    loss: Any = None,
) -> None:
    """Tune a causal LM's prior by its token NLL on `val_loader`.

    ``"gridsearch"`` sets the prior precision of lowest token NLL among
    `scales`; ``"auto"`` runs `marglik`, keeps it if its NLL is at most
    MAP's, else tries multiples `scales` of it, else switches the posterior
    off (`la.prior_choice` says which).

    Parameters
    ----------
    la : LoRALaplace
        Fitted on a causal LM.
    method : {'gridsearch', 'auto'}
    val_loader : Iterable
        Re-iterable LM batches with next-token labels.
    predictive : (pred_type, n_samples)
        ``"nn"`` scores the sampling predictive, anything else the
        linearised one.
    marglik : callable
        Sets the marglik prior precision (``"auto"``).
    scales : torch.Tensor
        The grid: prior precisions (``"gridsearch"``) or multiples of
        marglik's (``"auto"``).
    loss : None
        Must be None: the loss is the token NLL.

    Raises
    ------
    ValueError
        For a custom `loss`.
    """
    if loss is not None:
        raise ValueError(
            "A language model's prior is tuned by the token NLL of its "
            "next-token predictive: leave loss=None."
        )
    kind = str(getattr(predictive[0], "value", predictive[0]))
    scorer = TokenValidation(
        la, val_loader, "nn" if kind == "nn" else "glm", predictive[1]
    )
    if method == "gridsearch":
        best, _ = grid_search(scorer.loss, list(scales))
        la.prior_precision = scales[best]
        return
    la.prior_choice = tune_auto(
        la, marglik, scales.tolist(), scorer.loss, scorer.map_loss()
    )
