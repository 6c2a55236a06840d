"""Validation loss of a causal LM's next-token predictive, per prior precision.

`optimize_prior_precision(method="gridsearch" | "auto", val_loader=...)` of a
Laplace object over a language model's LoRA weights scores each candidate
prior precision by the mean negative log predictive probability of the true
next token over every position with a target (`TokenValidation.loss`),
computed with `next_token_predictive` (sampling or linearised) rather than
from validation Jacobians, which would need one backward pass per position
and vocabulary entry. The posterior draws use the same seeds at every grid
point (common random numbers), so the grid compares priors, not draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, MutableMapping
from typing import Any

import torch

from laplace_lora_backend.curvature.token_loss import target_mask

__all__ = ["TokenValidation", "is_token_batch"]


def is_token_batch(batch: Any, dict_key_y: str) -> bool:
    """Whether a labelled batch holds next-token labels `(batch, tokens)`.

    Returns
    -------
    bool
        True for a dict batch whose `dict_key_y` entry is a 2-D integer
        tensor (`next_token_labels`); class labels are 1-D.
    """
    y = batch.get(dict_key_y) if isinstance(batch, MutableMapping) else None
    return isinstance(y, torch.Tensor) and y.ndim == 2 and not y.is_floating_point()


class TokenValidation:
    """Mean token NLL of the next-token predictive on validation batches.

    Parameters
    ----------
    la : LoRALaplace
        Fitted on a causal LM (its model returns `(batch, tokens, V)`).
    val_loader : Iterable
        Dict batches with `la.dict_key_y` next-token labels (-100 where
        none), e.g. from `next_token_labels`.
    pred_type : {'glm', 'nn'}, default='glm'
        The predictive scored (`next_token_predictive`).
    n_samples : int, default=10
        Posterior samples per batch.
    seed : int, default=0
        Batch `i` draws with seed ``seed + i`` at every prior precision.

    Raises
    ------
    ValueError
        If a batch has no next-token labels, or no position has a target.
    """

    def __init__(
        self,
        la: Any,
        val_loader: Iterable,
        pred_type: str = "glm",
        n_samples: int = 10,
        seed: int = 0,
    ) -> None:
        self.la, self.pred_type = la, str(pred_type)
        self.n_samples, self.seed = int(n_samples), int(seed)
        self.batches = list(val_loader)
        key = la.dict_key_y
        for i, batch in enumerate(self.batches):
            if not is_token_batch(batch, key):
                raise ValueError(
                    f"Validation batch {i} has no next-token labels under "
                    f"{key!r}: pass dict batches with {key}=next_token_labels("
                    "input_ids, attention_mask), shape (batch, tokens)."
                )
        self.n_targets = sum(int(target_mask(b[key]).sum()) for b in self.batches)
        if self.n_targets == 0:
            raise ValueError(
                "The validation batches have no position with a target "
                "(every label is -100)."
            )

    def _mean_nll(self, pred_type: str) -> float:
        total = 0.0
        key = self.la.dict_key_y
        for i, batch in enumerate(self.batches):
            x = {k: v for k, v in batch.items() if k != key}
            g = torch.Generator().manual_seed(self.seed + i)
            p = self.la.next_token_predictive(x, pred_type, self.n_samples, g)
            total -= float(p.target_log_probs(batch[key]).sum())
        return total / self.n_targets

    def loss(self, prior_precision: torch.Tensor | float | None = None) -> float:
        """Mean token NLL at `prior_precision` (set on the object).

        Without `prior_precision`: at the current one.

        Returns
        -------
        float
            Nats per target token; ``inf`` if not finite.
        """
        if prior_precision is not None:
            self.la.prior_precision = prior_precision
        value = self._mean_nll(self.pred_type)
        return value if math.isfinite(value) else float("inf")

    def map_loss(self) -> float:
        """MAP's mean token NLL on the same batches.

        Returns
        -------
        float
        """
        return self._mean_nll("map")
