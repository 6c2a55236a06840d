"""Per-example uncertainty of a classification predictive, from logit samples.

For class probabilities ``p = E_f[softmax(f)]`` under the posterior over the
logits `f`, the total entropy ``H[p]`` splits into the expected entropy
``E_f[H[softmax(f)]]`` (aleatoric: what the model expects to remain uncertain
even with the exact weights) and the mutual information between the label and
the weights ``H[p] - E_f[H[softmax(f)]] >= 0`` (epistemic: what more data
would resolve; BALD). Both are estimated from the same logit samples, so the
split is exact for the sample average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "PredictiveUncertainty",
    "SoftmaxAverage",
    "entropy",
    "mutual_information",
    "uncertainty_from_samples",
]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis, ``0 log 0 = 0``.

    Returns
    -------
    torch.Tensor
        `probs.shape[:-1]`.
    """
    return -torch.special.xlogy(probs, probs).sum(-1)


def mutual_information(
    probs: torch.Tensor, expected_entropy: torch.Tensor
) -> torch.Tensor:
    """``H[probs] - expected_entropy``, clamped at 0 (rounding).

    Parameters
    ----------
    probs : torch.Tensor
        `(..., C)` the model-averaged probabilities ``E_f[softmax(f)]``.
    expected_entropy : torch.Tensor
        `probs.shape[:-1]`: ``E_f[H[softmax(f)]]`` over the same samples.

    Returns
    -------
    torch.Tensor
        `probs.shape[:-1]`.
    """
    return (entropy(probs) - expected_entropy).clamp_min(0)


class SoftmaxAverage:
    """Running Bayesian model average of softmaxes, and of their entropies.

    Adds one sample's logits at a time, so that memory holds two tensors of
    the logits' shape whatever the number of samples (a whole vocabulary at
    every position of a batch, `(batch, tokens, V)`).

    Parameters
    ----------
    dtype : torch.dtype, optional
        Accumulation dtype; default: the logits' dtype, at least float32.
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype
        self.n = 0
        self._probs: torch.Tensor | None = None
        self._entropy: torch.Tensor | None = None

    def add(self, logits: torch.Tensor) -> None:
        """Add one sample's logits `(..., C)`."""
        dtype = self.dtype or torch.promote_types(logits.dtype, torch.float32)
        p = logits.detach().to(dtype).softmax(-1)
        if self._probs is None:
            self._probs, self._entropy = p, entropy(p)
        else:
            self._probs += p
            self._entropy += entropy(p)
        self.n += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The average and its uncertainty.

        Returns
        -------
        probs : torch.Tensor
            `(..., C)` ``mean_k softmax(f_k)``.
        expected_entropy : torch.Tensor
            `(...)` ``mean_k H[softmax(f_k)]`` (aleatoric).
        mutual_information : torch.Tensor
            `(...)` ``H[probs] - expected_entropy`` (epistemic).

        Raises
        ------
        ValueError
            If no sample was added.
        """
        if self._probs is None or self._entropy is None:
            raise ValueError("SoftmaxAverage.result() needs at least one sample.")
        probs, expected = self._probs / self.n, self._entropy / self.n
        return probs, expected, mutual_information(probs, expected)


@dataclass
class PredictiveUncertainty:
    """The predictive of a batch and its uncertainty, per example.

    Attributes
    ----------
    probs : torch.Tensor
        `(batch, C)` predictive probabilities (the requested link's).
    logit_mean : torch.Tensor
        `(batch, C)` mean of the logits (the MAP's for the GLM predictive).
    logit_var : torch.Tensor
        `(batch, C, C)` covariance of the logits.
    entropy : torch.Tensor
        `(batch,)` entropy of `probs` (nats).
    expected_entropy : torch.Tensor
        `(batch,)` aleatoric part, ``E_f[H[softmax(f)]]``.
    mutual_information : torch.Tensor
        `(batch,)` epistemic part, ``H[E_f softmax(f)] - E_f[H[softmax(f)]]``.
    """

    probs: torch.Tensor
    logit_mean: torch.Tensor
    logit_var: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor


def uncertainty_from_samples(
    probs: torch.Tensor,
    samples: torch.Tensor,
    logit_mean: torch.Tensor | None = None,
    logit_var: torch.Tensor | None = None,
) -> PredictiveUncertainty:
    """Entropies and mutual information from logit samples.

    Parameters
    ----------
    probs : torch.Tensor
        `(batch, C)` the predictive probabilities reported (e.g. probit's).
    samples : torch.Tensor
        `(n_samples, batch, C)` logits drawn from the posterior predictive.
    logit_mean, logit_var : torch.Tensor, optional
        The logits' moments when known in closed form (GLM); otherwise the
        samples' mean and covariance.

    Returns
    -------
    PredictiveUncertainty
    """
    if logit_mean is None or logit_var is None:
        logit_mean = samples.mean(0)
        centered = samples - logit_mean
        logit_var = torch.einsum("sbi,sbj->bij", centered, centered) / max(
            samples.shape[0] - 1, 1
        )
    p = samples.softmax(-1)
    expected = entropy(p).mean(0)
    mutual = mutual_information(p.mean(0), expected)
    return PredictiveUncertainty(
        probs=probs,
        logit_mean=logit_mean,
        logit_var=logit_var,
        entropy=entropy(probs),
        expected_entropy=expected,
        mutual_information=mutual,
    )
