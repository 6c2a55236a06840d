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


CHUNK_ELEMENTS = 2**18
"""Elements of one slice of a wide tensor (1 MiB of float32): the entropy
and the running softmax average work slice by slice of whole rows, so their
temporaries stay this small, and in cache, whatever the vocabulary."""


def _row_slices(n_rows: int, width: int) -> list[slice]:
    """Slices of whole rows holding about `CHUNK_ELEMENTS` entries each.

    Returns
    -------
    list[slice]
    """
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis, ``0 log 0 = 0``.

    ``-<p, log max(p, tiny)>``, `tiny` the dtype's smallest normal number
    (an entry below it is off by less than ``tiny * |log tiny|`` nats).
    Computed slice by slice of rows (`CHUNK_ELEMENTS`), so a
    vocabulary-wide `probs` needs no temporary of its size.

    Returns
    -------
    torch.Tensor
        `probs.shape[:-1]`.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    tiny = torch.finfo(probs.dtype).tiny if probs.is_floating_point() else 0.0
    parts = [  # 0 log 0 = 0: log of the smallest normal float times 0
        -torch.linalg.vecdot(flat[rows], flat[rows].clamp_min(tiny).log())
        for rows in _row_slices(flat.shape[0], flat.shape[1])
    ]
    out = torch.cat(parts) if parts else flat.sum(-1)
    return out.reshape(probs.shape[:-1])


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

    Adds one sample's logits at a time into one accumulator of the logits'
    shape (a whole vocabulary at every position of a batch,
    `(batch, tokens, V)`), whatever the number of samples. Each sample is
    processed slice by slice of rows (`CHUNK_ELEMENTS`): per slice one
    softmax `p`, added into the accumulator, and the entropy
    ``lse - <p, f>`` with ``lse = max f - log max p`` (no logarithm over the
    vocabulary), so no other tensor of the logits' size is ever allocated.
    Logits of ``-inf`` get probability 0 and add 0 to the entropy (a row of
    only ``-inf`` counts as uniform, where a plain softmax gives NaN); NaN
    logits give NaN.

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
        self._shape: torch.Size | None = None

    def add(self, logits: torch.Tensor) -> None:
        """Add one sample's logits `(..., C)` (not modified).

        Raises
        ------
        ValueError
            If the shape differs from the first sample's, or after `result`.
        """
        if self.n < 0:
            raise ValueError("SoftmaxAverage.result() was called: start a new one.")
        f = logits.detach()
        dtype = self.dtype or torch.promote_types(f.dtype, torch.float32)
        flat = f.reshape(-1, f.shape[-1])
        if self._probs is None or self._entropy is None:
            self._shape = f.shape
            self._probs = torch.zeros(flat.shape, dtype=dtype, device=f.device)
            self._entropy = flat.new_zeros(flat.shape[0], dtype=dtype)
        elif f.shape != self._shape:
            raise ValueError(
                f"Every sample's logits must have the first one's shape "
                f"{tuple(self._shape or ())}, got {tuple(f.shape)}."
            )
        lowest = torch.finfo(dtype).min
        for rows in _row_slices(*flat.shape):
            # -inf -> the lowest float: probability 0 and 0 * f = 0 (NaN stays)
            f_rows = flat[rows].to(dtype).clamp_min(lowest)
            p = f_rows.softmax(-1)
            # H = lse - <p, f>, with lse = max f - log max p (p's largest entry
            # is exp(max f - lse)): no logarithm over the vocabulary
            lse = f_rows.amax(-1) - p.amax(-1).log()
            self._entropy[rows] += lse - torch.linalg.vecdot(p, f_rows)
            self._probs[rows] += p
        self.n += 1

    def result(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The average and its uncertainty; ends the accumulation.

        The accumulator becomes the returned `probs` (divided in place, no
        copy), so no sample can be added afterwards.

        Returns
        -------
        probs : torch.Tensor
            `(..., C)` ``mean_k softmax(f_k)``.
        entropy : torch.Tensor
            `(...)` ``H[probs]`` (total).
        expected_entropy : torch.Tensor
            `(...)` ``mean_k H[softmax(f_k)]`` (aleatoric).
        mutual_information : torch.Tensor
            `(...)` ``H[probs] - expected_entropy`` (epistemic), >= 0.

        Raises
        ------
        ValueError
            If no sample was added, or `result` was already called.
        """
        if self.n < 0:
            raise ValueError("SoftmaxAverage.result() was already called.")
        if self._probs is None or self._entropy is None or self._shape is None:
            raise ValueError("SoftmaxAverage.result() needs at least one sample.")
        probs = self._probs.div_(self.n).view(self._shape)
        expected = self._entropy.div_(self.n).view(self._shape[:-1])
        total = entropy(probs)
        self.n, self._probs, self._entropy = -1, None, None
        return probs, total, expected, (total - expected).clamp_min(0)


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
